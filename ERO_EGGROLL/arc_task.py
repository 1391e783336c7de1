"""`python -m ERO_EGGROLL.arc_task`: the command lives in ERO_EGGROLL.arc.tasks."""

from ERO_EGGROLL.arc.tasks import main

if __name__ == "__main__":
    raise SystemExit(main())
