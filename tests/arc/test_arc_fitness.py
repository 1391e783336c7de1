"""Fitness functions against hand-computed values, and ERO's metric against a reference written from its description."""

import ast
import random

import pytest

from ERO_EGGROLL.arc.fitness import (
    METRICS,
    cell_accuracy,
    char_similarity,
    exact,
    grid_char_similarity,
    parse_grid,
    reduce_to_grid_chars,
    sequence,
)

TARGET = [[1, 2], [3, 4]]  # canonical text "[[1,2],[3,4]]", 13 characters


def test_identical():
    assert char_similarity("[[1, 2], [3, 4]]", TARGET) == 1.0
    assert exact("[[1, 2], [3, 4]]", TARGET) == 1.0
    assert cell_accuracy("[[1,2],[3,4]]", TARGET) == 1.0
    assert sequence("[[1,2],[3,4]]", TARGET) == 1.0


def test_empty_prediction():
    assert char_similarity("", TARGET) == 0.0
    assert exact("", TARGET) == 0.0 and cell_accuracy("", TARGET) == 0.0 and sequence("", TARGET) == 0.0


def test_garbage_without_grid_characters():
    assert char_similarity("hello there!", TARGET) == 0.0


def test_prose_around_the_grid_is_ignored():
    assert char_similarity("The answer is:\n[[1, 2],\n [3, 4]]\nDone.", TARGET) == 1.0
    # digits in prose would survive the reduction; the lenient reading still finds the grid span
    assert exact("Output (2 by 2): [[1,2],[3,4]] ok", TARGET) == 1.0
    assert grid_char_similarity("Output (2 by 2): [[1,2],[3,4]] ok", TARGET) == 1.0


def test_ero_scores_prose_digits_as_they_stand():
    # "Example 1 output is [[1, 2], [3, 4]]." reduces to "1[[1,2],[3,4]]", which does not parse:
    # ERO compares it as it is, shifted by one character: matches only where the shift agrees
    a = "1[[1,2],[3,4]]"
    expected = sum(x == y for x, y in zip(a, "[[1,2],[3,4]]")) / len(a)
    assert char_similarity("Example 1 output is [[1, 2], [3, 4]].", TARGET) == pytest.approx(expected)
    assert expected < 0.5


def test_ero_parses_trailing_commas_as_python_does():
    assert char_similarity("[[1, 2], [3, 4],]", TARGET) == 1.0
    assert char_similarity("[[1, 2,], [3, 4,],]", TARGET) == 1.0
    assert parse_grid("[[1, 2], [3, 4],]") is None  # the lenient (JSON) reading refuses it


def test_ero_pads_empty_rows_and_nested_lists():
    # [[8], [], [1]] -> [[8], [0], [1]]
    assert char_similarity("[[8], [], [1]]", [[8], [0], [1]]) == 1.0
    assert parse_grid("[[8], [], [1]]") is None
    # a nested list counts as one entry of its row: [[[1, 2]], [3, 4]] -> [[[1, 2], 0], [3, 4]]
    a = "[[[1,2],0],[3,4]]"
    assert char_similarity("[[[1, 2]], [3, 4]]", TARGET) == pytest.approx(
        sum(x == y for x, y in zip(a, "[[1,2],[3,4]]")) / len(a)
    )


def test_ero_keeps_the_text_of_what_is_not_a_list_of_lists():
    # two grids side by side are a tuple: kept as reduced text, "[[1,2],[3,4]],[[5]]"
    a = "[[1,2],[3,4]],[[5]]"
    assert char_similarity("[[1, 2], [3, 4]], [[5]]", TARGET) == pytest.approx(13 / len(a))
    # a list with a non-list element is kept as it is (no padding): "[[1],2]"
    assert char_similarity("[[1], 2]", [[1, 2]]) == pytest.approx(sum(x == y for x, y in zip("[[1],2]", "[[1,2]]")) / 7)


def test_pathological_answers_do_not_raise():
    for text in ["[" * 100_000, "[" * 300 + "]" * 300, "[[" + "1" * 5000 + "]]", "[[01, 2]]", "1,2,", "[]", "[[]]"]:
        for metric in METRICS.values():
            assert 0.0 <= metric(text, TARGET) <= 1.0


def test_spaces_and_newlines():
    assert char_similarity("[ [1 ,2 ]\n,\t[3,4] ]", TARGET) == 1.0


def test_one_wrong_cell():
    # "[[1,2],[3,5]]": 12 of 13 positions match
    assert char_similarity("[[1,2],[3,5]]", TARGET) == pytest.approx(12 / 13)
    assert cell_accuracy("[[1,2],[3,5]]", TARGET) == 0.75
    assert exact("[[1,2],[3,5]]", TARGET) == 0.0


def test_ragged_rows_are_padded_with_zero():
    assert parse_grid("[[1,2],[3]]") == [[1, 2], [3, 0]]
    # "[[1,2],[3,0]]" vs "[[1,2],[3,4]]": 12/13
    assert char_similarity("[[1,2],[3]]", TARGET) == pytest.approx(12 / 13)
    assert grid_char_similarity("[[1,2],[3]]", TARGET) == pytest.approx(12 / 13)


def test_wrong_shape():
    # "[[1,2,3]]" (9 chars) vs "[[1,2],[3,4]]" (13): only the prefix "[[1,2" matches
    a, b = "[[1,2,3]]", "[[1,2],[3,4]]"
    expected = sum(x == y for x, y in zip(a, b)) / 13
    assert char_similarity("[[1, 2, 3]]", TARGET) == pytest.approx(expected) == pytest.approx(5 / 13)
    assert cell_accuracy("[[1, 2, 3]]", TARGET) == pytest.approx(2 / 4)


def test_longer_than_target():
    # "[[1,2],[3,4],[5,6]]" (19 chars): the first 12 positions match, over a length of 19
    a = "[[1,2],[3,4],[5,6]]"
    expected = sum(x == y for x, y in zip(a, "[[1,2],[3,4]]")) / 19
    assert char_similarity(a, TARGET) == pytest.approx(expected) == pytest.approx(12 / 19)
    assert cell_accuracy(a, TARGET) == pytest.approx(4 / 6)


def test_unicode_is_dropped():
    assert reduce_to_grid_chars("→ [[1,2],[3,4]] ✓ ١٢") == "[[1,2],[3,4]]"
    # a full-width digit is not a grid character: "[[,2],[3,4]]" does not parse and matches
    # "[[1,2],[3,4]]" only at positions 0, 1 and 11
    assert char_similarity("→ [[１,2],[3,4]] ✓", TARGET) == pytest.approx(3 / 13)


def test_unparseable_falls_back_to_reduced_text():
    # "[[1,2],[3,4" does not parse; positional on the reduced text: 11 of 13 positions match
    assert parse_grid("[[1,2],[3,4") is None
    assert char_similarity("[[1,2],[3,4", TARGET) == pytest.approx(11 / 13)


def test_sequence_forgives_a_shift_that_positional_punishes():
    shifted = "[[0,1,2],[3,4]]"
    assert sequence(shifted, TARGET) > char_similarity(shifted, TARGET)


# --- ERO's published pipeline, re-derived from its description, checked on generated answers ------


def ero_reference(answer: str, target: list[list[int]]) -> float:
    """Written from the description, independently of arc_fitness: keep [0-9[],]; a Python literal that is
    a non-empty list of lists gets every inner list padded with 0 to the longest and is written back with
    str(); anything else stays as reduced; reduce again; the target is str(grid) reduced the same way;
    positional matches over the longer length."""
    keep = set("0123456789[],")

    def reduce(text):
        return "".join(ch for ch in text if ch in keep)

    text = reduce(answer)
    try:
        parsed = ast.literal_eval(text)
    except Exception:
        parsed = None
    if type(parsed) is list and len(parsed) > 0 and all(type(item) is list for item in parsed):
        longest = max(map(len, parsed))
        text = reduce(str([item + [0] * (longest - len(item)) for item in parsed]))
    goal = reduce(str(target))
    if not text and not goal:
        return 0.0
    return sum(1 for j in range(min(len(text), len(goal))) if text[j] == goal[j]) / max(len(text), len(goal))


def _grid(rng: random.Random, rows=None, cols=None) -> list[list[int]]:
    rows, cols = rows or rng.randint(1, 8), cols or rng.randint(1, 8)
    return [[rng.choice([0, 0, 0, rng.randint(0, 9)]) for _ in range(cols)] for _ in range(rows)]


def _near(rng: random.Random, target):
    """The target with a few cells changed, a row dropped or a column added: what a model gets nearly right."""
    grid = [row[:] for row in target]
    for _ in range(rng.randint(0, 3)):
        r = rng.randrange(len(grid))
        grid[r][rng.randrange(len(grid[r]))] = rng.randint(0, 9)
    if rng.random() < 0.2 and len(grid) > 1:
        grid.pop(rng.randrange(len(grid)))
    if rng.random() < 0.2:
        grid = [row + [rng.randint(0, 9)] for row in grid]
    return grid


def _text(grid, sep=", ") -> str:
    return "[" + sep.join("[" + sep.join(str(v) for v in row) + "]" for row in grid) + "]"


def _styles(rng: random.Random, target) -> dict:
    g = _near(rng, target)
    text = _text(g)
    rows = [_text([row])[1:-1] for row in g]
    return {
        "clean": text,
        "compact": _text(g, ","),
        "prose with digits": f"Example {rng.randint(1, 4)} output is {text}.",
        "prose without digits": f"The answer is:\n{text}\nHope this helps!",
        "trailing comma": text[:-1] + ",]" if rng.random() < 0.5 else text.replace("]", ",]", 1),
        "empty rows": "[" + ", ".join(r if rng.random() < 0.7 else "[]" for r in rows) + "]",
        "ragged rows": _text([row[: rng.randint(1, len(row))] for row in g]),
        "nested lists": "[" + ", ".join(f"[{r}]" if rng.random() < 0.3 else r for r in rows) + "]",
        "non-integer entries": "["
        + ", ".join(
            "[" + ", ".join(rng.choice([f"{v}.0", f"'{v}'", str(v), "None", "-1", "1e3"]) for v in row) + "]"
            for row in g
        )
        + "]",
        "truncated": text[: rng.randint(0, len(text))],
        "several grids": text + rng.choice(["\n", ", ", "\n\nor maybe\n", " "]) + _text(_grid(rng)),
        "no brackets": "\n".join(rng.choice([" ", ",", ""]).join(str(v) for v in row) for row in g),
        "whitespace and newlines": "[\n"
        + ",\n".join("  " + r.replace(", ", rng.choice([" , ", ",\t", ",  "])) for r in rows)
        + "\n]\n\n",
        "markdown fence": f"```{rng.choice(['', 'python', 'json'])}\n{text}\n```",
        "leading zeros and signs": text.replace(" 0", rng.choice([" 00", " -0", " +0"]), 1),
        "random grid characters": "".join(rng.choice("[[]],,0123456789 \n") for _ in range(rng.randint(0, 60))),
    }


def _generated(n: int, seed: int = 11):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        target = _grid(rng)
        for style, answer in _styles(rng, target).items():
            out.append((style, answer, target))
    return out[:n]


def test_char_similarity_is_eros_pipeline_on_generated_answers():
    cases = _generated(3000)
    assert len({style for style, _, _ in cases}) >= 12
    mismatches = [
        (style, answer, target, char_similarity(answer, target), ero_reference(answer, target))
        for style, answer, target in cases
        if char_similarity(answer, target) != ero_reference(answer, target)
    ]
    assert not mismatches, mismatches[:5]
    # the generated styles reach every branch: parsed and padded, parsed but not a list of lists, not parsed
    parsed = sum(1 for _, answer, _ in cases if _parses_as_rows(answer))
    assert 0.2 * len(cases) < parsed < 0.9 * len(cases)


def _parses_as_rows(answer: str) -> bool:
    try:
        value = ast.literal_eval(reduce_to_grid_chars(answer))
    except Exception:
        return False
    return isinstance(value, list) and bool(value) and all(isinstance(row, list) for row in value)


def test_the_lenient_metric_differs_from_eros_on_the_styles_the_issue_names():
    cases = _generated(3000)
    differ = {
        style
        for style, answer, target in cases
        if grid_char_similarity(answer, target) != char_similarity(answer, target)
    }
    assert {"prose with digits", "trailing comma", "empty rows"} <= differ
