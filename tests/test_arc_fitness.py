"""Fitness functions against hand-computed values."""

import pytest

from ERO_EGGROLL.arc_fitness import cell_accuracy, char_similarity, exact, parse_grid, reduce_to_grid_chars, sequence

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
    # digits in prose would survive the reduction; the grid span is still found
    assert exact("Output (2 by 2): [[1,2],[3,4]] ok", TARGET) == 1.0


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
