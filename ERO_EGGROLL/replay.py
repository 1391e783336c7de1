"""`python -m ERO_EGGROLL.replay`: the command lives in ERO_EGGROLL.cli.replay."""

from ERO_EGGROLL.cli.replay import main

if __name__ == "__main__":
    raise SystemExit(main())
