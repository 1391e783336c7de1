"""Evolve Qwen2.5-VL on ARC-1 with EGGROLL: the training script users run by its path.

    python ERO_EGGROLL/arc_evolution_single_gpu.py --config configs/default.yaml

The command itself lives in ERO_EGGROLL/cli/train.py.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: the repository root, not this folder, is where imports start
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from ERO_EGGROLL.cli.train import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
