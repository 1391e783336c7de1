"""`python -m ERO_EGGROLL.doctor`: the command lives in ERO_EGGROLL.cli.doctor."""

from ERO_EGGROLL.cli.doctor import main

if __name__ == "__main__":
    raise SystemExit(main())
