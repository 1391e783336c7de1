"""scripts/bench/ero_miniature.py's parts run, on the tiny model (never the small one): the task rule, the copy
baseline, and each search (under one protocol or the other), which must hand the model back exactly as it found it."""

import argparse
import sys

import torch

from ERO_EGGROLL.config import ROOT

sys.path.insert(0, str(ROOT / "scripts" / "bench"))
import ero_miniature  # noqa: E402


def test_the_task_rule_and_the_copy_baseline():
    assert len(ero_miniature.fitting_tasks(16)) == 11 and len(ero_miniature.fitting_tasks(10)) == 1
    task = ero_miniature.fitting_tasks(10)[0]
    copied = ero_miniature.copy_scores(task)
    assert 0 < copied["char_similarity"] < 1 and copied["exact"] == 0.0


def test_every_search_runs_and_leaves_the_base_model(tiny, tiny_model_dir, one_torch_thread):
    model, processor = tiny
    task = ero_miniature.fitting_tasks(10)[0]
    args = argparse.Namespace(population=4, epochs=1, token_factor=1.0, calibration_epochs=2.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sources = ["test", "train_loo", "test"]  # each search once, both protocols among them
    for source, name in zip(sources, ero_miniature.SEARCHES):
        row = ero_miniature.search_task(model, processor, task, source, name, 1, args, tiny_model_dir)
        assert row["member_evaluations"] == 4 and len(row["epochs"]) == 1 and row["sigma"] > 0
        assert 0 <= row["after"]["char_similarity"] <= 1 and row["protocol"] == source
        assert (row["calibration_evaluations"] > 0) == (name == "EGGROLL")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
