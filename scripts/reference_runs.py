"""Record, or check, the numbers of a few small runs, so that a restructuring provably changes none of them.

    python scripts/reference_runs.py --record tests/reference/runs.json   # before the change
    python scripts/reference_runs.py --check tests/reference/runs.json    # after it: exit 1 on any difference

Each case is the tests' small run (tests/conftest.py SMALL) plus a few settings that walk a different
path of the code (optimizer, strategy, clip, bf16 rounding, batched members, per-task mode with the
degeneration guard). What is recorded: every metrics row without its timings, and the per-tensor
digest of the final checkpoint's weights (from its tensors, or from the run record of a replay-mode run).
The numbers hold for one build of the embedded tiny model (its base-weight digest is recorded too):
a rebuild on another machine rounds differently.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import differences, outcome, run_args  # noqa: E402  (the tests' small run and how it is compared)

from ERO_EGGROLL.config import ROOT as REPO  # noqa: E402
from ERO_EGGROLL.config import load_config  # noqa: E402
from ERO_EGGROLL.storage.identity import base_weights_digest  # noqa: E402

CASES: dict[str, list[str]] = {
    "reference": [],  # exactly the suite's shared `reference` run
    "adam_inplace_clipped": [
        "evolution.optimizer=adam",
        "evolution.strategy=inplace",
        "evolution.max_update_norm=0.001",
    ],
    "bf16_rounding_batched": [
        "model.dtype=bfloat16",
        "evolution.stochastic_rounding=true",
        "evaluation.members_per_batch=2",
    ],
    "per_task_guard": [
        "evolution.mode=per_task",
        "data.task_ids=[b1fc8b8e,e6de6e8f]",
        "evolution.epochs=3",
        "run.degeneration_patience=1",
        "evolution.optimizer=adamw",
        "evolution.weight_decay=0.1",
    ],
}


def run_case(tmp: Path, name: str) -> dict:
    done = subprocess.run(run_args(tmp, name, *CASES[name]), capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise SystemExit(f"case {name} failed:\n{done.stderr[-3000:]}")
    return outcome(tmp, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path, help="write the outcomes to this JSON file")
    mode.add_argument("--check", type=Path, help="compare the outcomes with this JSON file")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases (default: all)")
    parser.add_argument(
        "--write-current",
        type=Path,
        help="with --check: also write today's outcomes here (to re-record "
        "after a change that adds metrics on purpose, once the check shows only 'unexpected' new fields)",
    )
    args = parser.parse_args(argv)
    base = base_weights_digest(load_config(REPO / "configs" / "smoke.yaml"))
    cases = args.case or list(CASES)
    with tempfile.TemporaryDirectory() as tmp:
        current = {name: run_case(Path(tmp), name) for name in cases}
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps({"base_weights": base, "cases": current}, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(current)} case(s) in {args.record}")
        return 0
    saved = json.loads(args.check.read_text())
    if saved["base_weights"] != base:
        print(
            f"the tiny model here (base weights {base}) is not the recorded build ({saved['base_weights']}); re-record"
        )
        return 2
    found = differences({n: saved["cases"][n] for n in cases}, current)
    if args.write_current:
        args.write_current.write_text(
            json.dumps({"base_weights": base, "cases": current}, indent=1, sort_keys=True) + "\n"
        )
    print("\n".join(found[:40]) if found else f"{len(cases)} case(s) identical to {args.check}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
