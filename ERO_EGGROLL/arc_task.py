"""`python -m ERO_EGGROLL.arc_task`: the command lives in ERO_EGGROLL.cli.render_task."""

from ERO_EGGROLL.cli.render_task import main

if __name__ == "__main__":
    raise SystemExit(main())
