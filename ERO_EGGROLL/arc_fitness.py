"""Scoring a model's answer against the target grid. Every metric maps text -> [0, 1].

`char_similarity` is ERO's fitness; `exact` and `cell_accuracy` say whether the grid is right,
which the positional metric alone does not (an all-zero grid of the right size scores well).
"""

from __future__ import annotations

import json
import re
from typing import Callable

from rapidfuzz.distance import Indel

from .arc_task import Grid

_NOT_GRID_CHARS = re.compile(r"[^0-9\[\],]")


def reduce_to_grid_chars(text: str) -> str:
    """Keep only the characters [0-9[],] (whitespace, prose and everything else dropped)."""
    return _NOT_GRID_CHARS.sub("", text)


def _as_padded_grid(value) -> Grid | None:
    if not isinstance(value, list) or not value or not all(isinstance(row, list) and row for row in value):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for row in value for v in row):
        return None
    width = max(len(row) for row in value)
    return [row + [0] * (width - len(row)) for row in value]


def parse_grid(text: str) -> Grid | None:
    """The answer as a grid (ragged rows padded with 0), or None when no grid can be read.

    Tries the whole reduced text, then the first '[[' ... ']]' span (digits in prose around the
    grid survive the reduction and would otherwise spoil the parse).
    """
    reduced = reduce_to_grid_chars(text)
    candidates = [reduced]
    start, end = reduced.find("[["), reduced.rfind("]]")
    if 0 <= start < end:
        candidates.append(reduced[start : end + 2])
    for candidate in candidates:
        try:
            grid = _as_padded_grid(json.loads(candidate))
        except (json.JSONDecodeError, RecursionError):
            continue
        if grid is not None:
            return grid
    return None


def canonical_text(grid: Grid) -> str:
    return "[" + ",".join("[" + ",".join(str(v) for v in row) + "]" for row in grid) + "]"


def char_similarity(prediction: str, target: Grid) -> float:
    """ERO's metric: positional character matches over the longer length of the reduced texts."""
    grid = parse_grid(prediction)
    a = canonical_text(grid) if grid is not None else reduce_to_grid_chars(prediction)
    b = canonical_text(target)
    longest = max(len(a), len(b))
    if longest == 0:
        return 0.0
    return sum(x == y for x, y in zip(a, b)) / longest


def exact(prediction: str, target: Grid) -> float:
    return float(parse_grid(prediction) == target)


def cell_accuracy(prediction: str, target: Grid) -> float:
    """Cells equal at the same (row, column), over the larger of the two grids' cell counts."""
    grid = parse_grid(prediction)
    if grid is None:
        return 0.0
    matches = sum(
        grid[r][c] == target[r][c]
        for r in range(min(len(grid), len(target)))
        for c in range(min(len(grid[0]), len(target[0])))
    )
    return matches / max(len(grid) * len(grid[0]), len(target) * len(target[0]))


def sequence(prediction: str, target: Grid) -> float:
    """Indel (LCS-based) similarity of the reduced texts: forgives shifts the positional metric punishes."""
    grid = parse_grid(prediction)
    a = canonical_text(grid) if grid is not None else reduce_to_grid_chars(prediction)
    return float(Indel.normalized_similarity(a, canonical_text(target)))


METRICS: dict[str, Callable[[str, Grid], float]] = {
    "char_similarity": char_similarity,
    "exact": exact,
    "cell_accuracy": cell_accuracy,
    "sequence": sequence,
}
