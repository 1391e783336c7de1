"""`python -m ERO_EGGROLL.config`: the command lives in ERO_EGGROLL.cli.show_config."""

from ERO_EGGROLL.cli.show_config import main

raise SystemExit(main())
