"""`python -m ERO_EGGROLL.memory`: the command lives in ERO_EGGROLL.cli.memory."""

from ERO_EGGROLL.cli.memory import main

raise SystemExit(main())
