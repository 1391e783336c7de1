"""python -m ERO_EGGROLL.memory --config configs/qwen2_5_vl_7b.yaml: the memory model's report."""

from ERO_EGGROLL.memory.model import main

raise SystemExit(main())
