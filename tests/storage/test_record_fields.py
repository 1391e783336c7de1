"""The run record's one list of fields (storage/record_fields.py) is the table in docs/checkpoints.md, and the seal
names the field and the epoch of any edit, removal or addition. Pure: no run needed."""

from __future__ import annotations

import copy
import re

import pytest

from ERO_EGGROLL.config import ROOT
from ERO_EGGROLL.storage.record_fields import ROW_FIELDS, STATE_FIELDS, broken_seal, seal_of


def documented() -> dict[str, dict[str, str]]:
    """docs/checkpoints.md's two tables: {'state'|'row': {field: kind}}."""
    tables: dict[str, dict[str, str]] = {"state": {}, "row": {}}
    current = None
    for line in (ROOT / "docs" / "checkpoints.md").read_text().splitlines():
        if line.startswith("| field of state.json"):
            current = "state"
        elif line.startswith("| field of a history row"):
            current = "row"
        elif current and (match := re.fullmatch(r"\| `(\w+)` \| ([^|]+) \| ([^|]+) \|", line)):
            tables[current][match[1]] = match[2].strip()
        elif current and not line.startswith("|"):
            current = None
    return tables


def test_the_docs_table_is_the_list_of_fields():
    tables = documented()
    assert tables["state"] == {k: kind for k, (kind, _) in STATE_FIELDS.items()}
    assert tables["row"] == {k: kind for k, (kind, _) in ROW_FIELDS.items()}


def record() -> dict:
    state = {
        "epoch": 1,
        "config": {"seed": 0},
        "history": [{"epoch": 0, "mean_model_test_score": 0.5}, {"epoch": 1, "mean_model_test_score": 0.6}],
        "weight_digests": ["a", "b"],
    }
    return {**state, "seal": seal_of(state)}


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda r: r["history"][1].update(mean_model_test_score=5.0), "epoch 1: mean_model_test_score does not match"),
        (lambda r: r["history"][0].pop("mean_model_test_score"), r"epoch 0: mean_model_test_score .* \(removed\)"),
        (lambda r: r["history"][1].update(calibrated_sigma=0.1), r"epoch 1: calibrated_sigma .* \(added\)"),
        (lambda r: r["weight_digests"].__setitem__(0, "x"), r"epoch 0: weight_digests\[0\] does not match"),
        (lambda r: r["config"].update(seed=1), "config does not match the record's seal"),
        (lambda r: r.update(sigma_calibration={"w": 0.1}), "sigma_calibration does not match"),
        (lambda r: r["history"].reverse(), "epoch 0: "),  # rows swapped: each field is bound to its epoch
    ],
)
def test_a_broken_seal_names_the_field_and_the_epoch(edit, message):
    edited = copy.deepcopy(record())
    assert broken_seal(edited) is None
    edit(edited)
    assert re.search(message, broken_seal(edited) or "")
