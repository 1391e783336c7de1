"""Scoring a model's answer against the target grid. Every metric maps text -> [0, 1].

`char_similarity` is ERO's fitness, exactly as ERO's published pipeline computes it, so that this
project's numbers can be set beside ERO's table. The other metrics read the answer leniently
(`parse_grid`: the grid is found wherever it stands, digits in prose around it do not matter):
`grid_char_similarity` is the same positional score on that reading; `exact` and `cell_accuracy`
say whether the grid is right, which a positional metric alone does not (an all-zero grid of the
right size scores well); `sequence` forgives shifts.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable

from rapidfuzz.distance import Indel

from ERO_EGGROLL.arc.tasks import Grid, grid_to_text

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
        except (ValueError, RecursionError):  # malformed JSON, an integer over Python's 4300-digit limit, deep nesting
            continue
        if grid is not None:
            return grid
    return None


def canonical_text(grid: Grid) -> str:
    """The grid in Python list notation reduced to [0-9[],] (ERO's target text), e.g. "[[1,2],[3,4]]"."""
    return grid_to_text(grid).replace(" ", "")


def ero_answer_text(prediction: str) -> str:
    """The answer text as ERO's pipeline compares it.

    Reduce to [0-9[],]; if that parses as a Python literal (so trailing commas are fine) that is
    a non-empty list whose elements are all lists, pad each of them with 0 to the longest one's
    length (whatever they hold, nested lists included) and write it back with str(); otherwise
    (no parse, a non-list element, an empty list, a tuple) keep the reduced text; reduce again.
    Digits in prose around a grid make the parse fail, and the reduced text is scored as it is.
    """
    reduced = reduce_to_grid_chars(prediction)
    try:
        value = ast.literal_eval(reduced)
    except Exception:  # SyntaxError, ValueError, and RecursionError/MemoryError on pathological nesting: no parse
        return reduced
    if not (isinstance(value, list) and value and all(isinstance(row, list) for row in value)):
        return reduced
    width = max(len(row) for row in value)
    return reduce_to_grid_chars(str([row + [0] * (width - len(row)) for row in value]))


def _positional(a: str, b: str) -> float:
    """Positions where the two texts agree, over the longer length (0 for two empty texts)."""
    longest = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / longest if longest else 0.0


def char_similarity(prediction: str, target: Grid) -> float:
    """ERO's fitness as published: `ero_answer_text` against the reduced target, positionally."""
    return _positional(ero_answer_text(prediction), canonical_text(target))


def _lenient_text(prediction: str) -> str:
    grid = parse_grid(prediction)
    return canonical_text(grid) if grid is not None else reduce_to_grid_chars(prediction)


def grid_char_similarity(prediction: str, target: Grid) -> float:
    """The positional score on the lenient reading: the grid span is scored even with prose digits around it (not
    ERO's)."""
    return _positional(_lenient_text(prediction), canonical_text(target))


def exact(prediction: str, target: Grid) -> float:
    """1 if the lenient reading (`parse_grid`) is the target grid, wherever it stands in the answer."""
    return float(parse_grid(prediction) == target)


def cell_accuracy(prediction: str, target: Grid) -> float:
    """Cells of the lenient reading (`parse_grid`) equal at the same (row, column), over the larger grid's cell
    count."""
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
    """Indel (LCS-based) similarity on the lenient reading (`parse_grid`): forgives shifts the positional metrics
    punish."""
    return float(Indel.normalized_similarity(_lenient_text(prediction), canonical_text(target)))


METRICS: dict[str, Callable[[str, Grid], float]] = {
    "char_similarity": char_similarity,
    "grid_char_similarity": grid_char_similarity,
    "exact": exact,
    "cell_accuracy": cell_accuracy,
    "sequence": sequence,
}
