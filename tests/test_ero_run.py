"""A run with ERO's search (evolution.search: ero) replays and resumes bit for bit, through a reset to the base
weights and its seed move, like EGGROLL's search (tests/test_run_record.py)."""

from __future__ import annotations

from pathlib import Path

from test_run_record import record, resume, run, without_timings

ERO_RUN = ["evolution.search=ero", "evolution.antithetic=false", "evolution.elites=2", "evolution.reset_after=1",
           "evolution.clamp=10.0", "evolution.epochs=4", "evaluation.max_new_tokens_cap=16"]


def test_ero_search_gone_back_past_a_reset_and_continued_equals_the_first_line(tmp_path: Path, tiny_model_dir):
    """Resumed at epoch 3, the replay rebuilds epochs 1-3 (a reset to base among them; rebuild checks the recorded
    digest) and epoch 4 must draw the moved seed's noise again, as the uninterrupted run did."""
    run(tmp_path, "ero", *ERO_RUN)
    first = record(tmp_path / "checkpoints" / "ero")
    resets = [row["epoch"] for row in first.history[1:] if row["reset_to_base"]]
    assert resets and resets[0] <= 3, f"no reset before epoch 4 ({resets}): the seed move is not exercised"
    assert first.weight_digests[resets[0]] == first.weight_digests[0]  # a reset is exactly the base weights
    resume(tmp_path / "checkpoints" / "ero" / "epoch_0003")
    again = record(tmp_path / "checkpoints" / "ero")
    assert without_timings(again) == without_timings(first)
    assert again.weight_digests == first.weight_digests and again.tensor_digests == first.tensor_digests
