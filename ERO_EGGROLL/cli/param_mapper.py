"""`python -m ERO_EGGROLL.qwen_param_mapper --config <yaml> [--list]`: which tensors are FROZEN, LORA or FULL."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ERO_EGGROLL.cli.common import add_config_arguments, command, config_of
from ERO_EGGROLL.model.qwen import (
    architecture_json,
    classify_model,
    format_summary,
    meta_model_from_config_json,
    summarize,
)


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Summarize the FROZEN/LORA/FULL classes of a config's model (no weights needed)."
    )
    add_config_arguments(parser)
    parser.add_argument("--list", action="store_true", help="also list every tensor with its class")
    args = parser.parse_args(argv)
    cfg = config_of(args)
    source = architecture_json(cfg)
    specs = classify_model(meta_model_from_config_json(source), cfg)
    print(f"architecture: {source}\nrank {cfg.evolution.rank}, noise drawn in float32\n")
    print(format_summary(summarize(specs, cfg.evolution.rank)))
    if args.list:
        for s in specs:
            print(f"{s.cls.value:6s} {s.name} {list(s.shape)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
