"""The suite's shared run against numbers recorded before a restructuring (scripts/reference_runs.py).

Restructurings must not change a run's numbers: the metrics and the final weights' per-tensor digests
of the `reference` run must equal tests/reference/runs.json, recorded from the code before the change.
The other recorded cases (Adam + in-place + clip, bf16 rounding with batched members, per-task mode
with the degeneration guard) are checked by `python scripts/reference_runs.py --check tests/reference/runs.json`.
"""

from __future__ import annotations

import json
import sys

import pytest

from ERO_EGGROLL.config import ROOT, load_config
from ERO_EGGROLL.run_identity import base_weights_digest

sys.path.insert(0, str(ROOT / "scripts"))
from reference_runs import differences, outcome  # noqa: E402

RECORDED = json.loads((ROOT / "tests" / "reference" / "runs.json").read_text())


def test_reference_run_equals_the_recorded_numbers(reference):
    here = base_weights_digest(load_config(ROOT / "configs" / "smoke.yaml"))
    if here != RECORDED["base_weights"]:
        pytest.skip(f"this machine's tiny-model build ({here}) is not the recorded one ({RECORDED['base_weights']}); "
                    "the recorded numbers hold for that build only")
    assert differences(RECORDED["cases"]["reference"], outcome(reference, "reference")) == []
