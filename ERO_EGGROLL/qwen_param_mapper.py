"""`python -m ERO_EGGROLL.qwen_param_mapper`: the command lives in ERO_EGGROLL.model.qwen."""

from ERO_EGGROLL.model.qwen import main

if __name__ == "__main__":
    raise SystemExit(main())
