"""`python -m ERO_EGGROLL.config --config <yaml> [--set SECTION.KEY=VALUE]`: the resolved config, as YAML."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import yaml

from ERO_EGGROLL.cli.common import add_config_arguments, command, config_of


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the resolved config.")
    add_config_arguments(parser)
    print(yaml.safe_dump(config_of(parser.parse_args(argv)).to_dict(), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
