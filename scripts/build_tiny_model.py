"""Build an embedded Qwen2.5-VL (random weights + backprop pretraining on ARC-1 training tasks) into checkpoints/.

python scripts/build_tiny_model.py [--size tiny|small] [--out DIR] [--seed 0] [--steps N]

`tiny` (the default, checkpoints/tiny-qwen2.5-vl) is what `make run` and the tests use; `small`
(checkpoints/small-qwen2.5-vl, 4.5M parameters, 12.8 CPU-minutes) is built only on request, for
scripts/bench/ero_miniature.py.
"""

import argparse
import time

from ERO_EGGROLL.config import ROOT
from ERO_EGGROLL.model.tiny import BUILD_RECORD, MODEL_DIRS, SIZES, build_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--out", help="the model's folder (default checkpoints/<size>-qwen2.5-vl)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="backprop pretraining steps (default: the size's preset)")
    args = parser.parse_args()
    start = time.perf_counter()
    out = build_tiny_model(
        args.out or str(ROOT / MODEL_DIRS[args.size]), seed=args.seed, pretrain_steps=args.steps, size=args.size
    )
    print(f"built {out} in {time.perf_counter() - start:.1f}s")
    print((out / BUILD_RECORD).read_text(), end="")


if __name__ == "__main__":
    main()
