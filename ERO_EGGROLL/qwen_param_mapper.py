"""`python -m ERO_EGGROLL.qwen_param_mapper`: the command lives in ERO_EGGROLL.cli.param_mapper."""

from ERO_EGGROLL.cli.param_mapper import main

if __name__ == "__main__":
    raise SystemExit(main())
