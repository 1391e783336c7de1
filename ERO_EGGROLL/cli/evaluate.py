"""Score the base model, an exported model or a run checkpoint on the config's ARC tasks, as a table.

python -m ERO_EGGROLL.arc_evaluator --config configs/default.yaml [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ERO_EGGROLL.arc.tasks import load_tasks
from ERO_EGGROLL.cli.common import command
from ERO_EGGROLL.config import load_config
from ERO_EGGROLL.evaluation.evaluator import (
    earlier_table,
    evaluate,
    prepare,
    questions_for,
    results_table,
    table_paths,
    write_table,
)
from ERO_EGGROLL.io.disk import NOTHING_ELSE_CHANGED, check_output, writing
from ERO_EGGROLL.run.record import load_evaluated_model


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Evaluate the base model, or an evolved checkpoint, on the config's ARC tasks."
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", help="a run checkpoint directory or an exported model directory")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", help="output stem (default results/<run name>/eval_<base|checkpoint>)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    if args.out is not None and str(args.out).strip() in ("", "."):
        check_output(args.out, "--out", earlier_table)  # refused: '' and '.' name no file
    stem = Path(args.out) if args.out else cfg.run_dir / ("eval_checkpoint" if args.checkpoint else "eval_base")
    protected = [cfg.resolve_path(cfg.model.path)] + ([Path(args.checkpoint)] if args.checkpoint else [])
    for path in table_paths(stem):
        check_output(path, "--out", earlier_table, protected)
    tasks = load_tasks(cfg.data.source, cfg.data.split, cfg.data.task_ids)
    model, processor = load_evaluated_model(cfg, args.checkpoint)
    result = evaluate(model, processor, prepare(questions_for(tasks, cfg, "test"), processor, cfg), cfg, report=True)
    with writing(stem, NOTHING_ELSE_CHANGED):
        csv_path, md_path = write_table(results_table([t.id for t in tasks], result), stem)
    print(md_path.read_text(), end="")
    print(f"wrote {csv_path} and {md_path} ({result.seconds:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
