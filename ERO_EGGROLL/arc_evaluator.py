"""`python -m ERO_EGGROLL.arc_evaluator`: the command lives in ERO_EGGROLL.cli.evaluate."""

from ERO_EGGROLL.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
