"""Benchmark: what perturbed generation costs against plain generation, measured fairly.

Every generate call produces exactly its max_new_tokens (end-of-sequence ignored: min_new_tokens =
max_new_tokens), so a member and the unperturbed model do the same work. Per model (the embedded
tiny one, a ~26M and a ~100M random Qwen2.5-VL), in one run, timings interleaved and medians taken:
  * one member: ms per generated token of plain generate, `forward` and `inplace`;
  * K = 1, 2, 4, 8, 16 members in one generate call (`evaluation.members_per_batch: K`) against the
    ceiling: the same call, same rows and prompts, with no noise installed.
The last line is `ratio_to_ceiling=<~26M model at K=8>` (tiny model with --quick).

    python scripts/bench/bench_population.py [--quick] [--reps 3] [--profile] [--compile] [--device cuda]
        -> results/bench/population.json

--profile prints torch.profiler's operator table for one member (plain, then `forward`) on the ~26M
model. --compile instead times one member of the ~26M model eagerly and with its language model
under torch.compile (-> results/bench/population_compile.json).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench_common import write_results  # noqa: E402
from bench_member import RANDOM_MODEL_SIGMA, config_for  # noqa: E402

from ERO_EGGROLL.arc.tasks import load_tasks  # noqa: E402
from ERO_EGGROLL.config import EMBEDDED_MODEL_DIR  # noqa: E402
from ERO_EGGROLL.evaluation import generation  # noqa: E402
from ERO_EGGROLL.evaluation.evaluator import evaluate_members, prepare, questions_for  # noqa: E402
from ERO_EGGROLL.model.loading import load_model_from_dir  # noqa: E402
from ERO_EGGROLL.model.qwen import run_perturber  # noqa: E402
from ERO_EGGROLL.model.random_model import SHAPES, random_model  # noqa: E402

KS = (1, 2, 4, 8, 16)


@contextlib.contextmanager
def fixed_length():
    """Every generate call of the evaluator produces exactly max_new_tokens tokens (no early stop)."""
    original = generation.generation_config

    def fixed(*args, **kwargs):
        config = original(*args, **kwargs)
        config.min_new_tokens = config.max_new_tokens
        return config

    generation.generation_config = fixed
    try:
        yield
    finally:
        generation.generation_config = original


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of returning it to the system: otherwise every large tensor of
    prefill and of the growing KV cache is a fresh mmap whose page faults add seconds of noise (to both sides)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: large blocks from the heap
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: do not give the heap back


def interleaved_medians(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each function, run in turn (one warm-up each), so that drift hits every side alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class Bench:
    """One model, its prompts, and a Perturber per strategy."""

    def __init__(self, name: str, model, processor, extra: tuple[str, ...]):
        self.name, self.model, self.processor = name, model, processor
        self.cfg = config_for(max(KS), extra=extra)
        self.prepared = prepare(
            questions_for(load_tasks(ids=self.cfg.data.task_ids), self.cfg, "fitness"), processor, self.cfg
        )
        bs = self.cfg.evaluation.batch_size
        batches = [self.prepared[i : i + bs] for i in range(0, len(self.prepared), bs)]
        self.tokens_per_member = sum(len(b) * max(p.max_new_tokens for p in b) for b in batches)  # fixed length
        self.perturbers = {s: run_perturber(model, config_for(max(KS), s, extra)) for s in ("forward", "inplace")}

    def generate(self, k: int = 1) -> None:
        evaluate_members(self.model, self.processor, self.prepared, self.cfg, k)

    def member(self, strategy: str):
        def run():
            with self.perturbers[strategy].member(0, 1):
                self.generate()

        return run

    def members(self, k: int):
        def run():
            with self.perturbers["forward"].members(0, range(k)):
                self.generate(k)

        return run

    def one_member_row(self, reps: int) -> dict:
        t = interleaved_medians(
            {"plain": self.generate, "forward": self.member("forward"), "inplace": self.member("inplace")}, reps
        )
        per_token = {k: 1000 * v / self.tokens_per_member for k, v in t.items()}
        return {
            "model": self.name,
            "plain ms/token": per_token["plain"],
            "forward ms/token": per_token["forward"],
            "inplace ms/token": per_token["inplace"],
            "forward / plain": t["forward"] / t["plain"],
            "inplace / plain": t["inplace"] / t["plain"],
        }

    def batched_row(self, k: int, reps: int) -> dict:
        t = interleaved_medians({"ceiling": lambda: self.generate(k), "members": self.members(k)}, reps)
        return {
            "model": self.name,
            "K": k,
            "call s": t["members"],
            "members/s": k / t["members"],
            "ceiling call s": t["ceiling"],
            "ratio to ceiling": t["ceiling"] / t["members"],
        }

    def close(self) -> None:
        for perturber in self.perturbers.values():
            perturber.remove_hooks()


def show(row: dict) -> None:
    print(json.dumps({key: (round(v, 3) if isinstance(v, float) else v) for key, v in row.items()}), flush=True)


def profile(bench: Bench) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for label, fn in (("plain", bench.generate), ("forward", bench.member("forward"))):
        fn()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n## torch.profiler, one member, {label} ({bench.name})")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def compiled(bench: Bench, reps: int) -> dict:
    language_model = bench.model.model.language_model
    eager = language_model.forward
    language_model.forward = torch.compile(eager, dynamic=True)
    try:
        start = time.perf_counter()
        bench.generate()
        bench.member("forward")()
        first = time.perf_counter() - start
        row = bench.one_member_row(reps)
    finally:
        language_model.forward = eager
    return {**row, "model": f"{bench.name}, torch.compile", "first plain + forward call (compiling) s": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, K in 1 and 8, one repetition")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per measurement (median)")
    parser.add_argument(
        "--profile", action="store_true", help="also print torch.profiler's table for one member (~26M)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="only: one member of the ~26M model, eager and under torch.compile"
    )
    parser.add_argument("--device", default="cpu", help="where the models run (cuda: scripts/gpu_check.py)")
    args = parser.parse_args()
    keep_freed_memory()
    reps = 1 if args.quick else args.reps
    ks = (1, 8) if args.quick else KS
    tiny_dir = ROOT / EMBEDDED_MODEL_DIR
    tiny, processor = load_model_from_dir(tiny_dir, device=args.device)
    if args.compile:
        with fixed_length():
            bench = Bench("random ~26M", random_model(tiny_dir, SHAPES["26m"]), processor, RANDOM_MODEL_SIGMA)
            rows = [bench.one_member_row(reps), compiled(bench, reps)]
        for row in rows:
            show(row)
        write_results("population_compile", rows, False)
        return
    models = [("tiny (embedded)", lambda: tiny, ())]
    if not args.quick:
        models += [
            (
                f"random ~{size.upper()}",
                lambda size=size: random_model(tiny_dir, SHAPES[size]).to(args.device),
                RANDOM_MODEL_SIGMA,
            )
            for size in ("26m", "100m")
        ]
    print(
        "## Fixed length: 3 ARC questions per member, every call generates its max_new_tokens (<= 64); median of "
        f"{reps}"
    )
    rows = []
    with fixed_length():
        for name, build, extra in models:
            bench = Bench(name, build(), processor, extra)
            rows.append(bench.one_member_row(reps))
            show(rows[-1])
            for k in ks:
                rows.append(bench.batched_row(k, reps))
                show(rows[-1])
            if name.endswith("26M") and args.profile:
                profile(bench)
            bench.close()
    write_results("population", rows, args.quick)
    headline = [r for r in rows if r.get("K") == 8]
    print(f"ratio_to_ceiling={headline[min(1, len(headline) - 1)]['ratio to ceiling']:.3f}")


if __name__ == "__main__":
    main()
