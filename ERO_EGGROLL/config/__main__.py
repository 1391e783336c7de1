"""python -m ERO_EGGROLL.config --config configs/default.yaml [--set evolution.population_size=8]: the resolved
config."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import yaml

from ERO_EGGROLL.config.loading import load_config
from ERO_EGGROLL.core.errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the resolved config.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
