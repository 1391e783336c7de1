"""Build the embedded tiny Qwen2.5-VL (random weights + short pretraining) into checkpoints/.

python scripts/build_tiny_model.py [--out checkpoints/tiny-qwen2.5-vl] [--seed 0] [--steps 150]
"""

import argparse
import time

from ERO_EGGROLL.config import EMBEDDED_MODEL_DIR, ROOT
from ERO_EGGROLL.model.tiny import BUILD_RECORD, build_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / EMBEDDED_MODEL_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=150, help="backprop pretraining steps on ARC-1 training tasks")
    args = parser.parse_args()
    start = time.perf_counter()
    out = build_tiny_model(args.out, seed=args.seed, pretrain_steps=args.steps)
    print(f"built {out} in {time.perf_counter() - start:.1f}s")
    print((out / BUILD_RECORD).read_text(), end="")


if __name__ == "__main__":
    main()
