"""`python -m ERO_EGGROLL.memory --config <yaml>`: the memory model's prediction, phase by phase (no weights)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ERO_EGGROLL.cli.common import add_config_arguments, command, config_of
from ERO_EGGROLL.memory.model import report


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Predict a run's peak memory (no weights needed).")
    add_config_arguments(parser)
    print(report(config_of(parser.parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
