"""Each epoch's cheap signs of no signal / collapse (evaluation/divergence.epoch_signs), the one warning line after
`evolution.signal_check.patience` epochs of it, and the stop it may trigger, recomputed by the record check."""

from __future__ import annotations

from ERO_EGGROLL.config import ROOT, load_config
from ERO_EGGROLL.evaluation.divergence import epoch_signs
from ERO_EGGROLL.run.loop import signal_warning
from ERO_EGGROLL.storage.checkpoints import RunState
from ERO_EGGROLL.storage.record_check import is_finished

GRID = "[[1, 2], [3, 4]]"


def _history(cfg, member_fitness: list[list[float]]) -> list[dict]:
    rows = [{"epoch": 0, "mean_model_fitness": 0.5, "answers": [GRID]}]
    for epoch, fitness in enumerate(member_fitness, start=1):
        row = {"epoch": epoch, "fitness": fitness, "mean_model_fitness": 0.5, "answers": [GRID]}
        row.update(epoch_signs(row, rows[0], cfg.evaluation.fitness))
        rows.append(row)
    return rows


def test_a_run_without_signal_warns_once_at_the_patience_with_the_figure_and_the_change():
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["evolution.signal_check.patience=2"])  # char similarity
    at_base = [0.5, 0.5, 0.5, 0.5]  # every member's greedy answers the base's: no signal
    history = _history(cfg, [at_base])
    assert history[1]["signal"] == "no signal" and history[1]["members_at_base_fitness"] == 1.0
    assert signal_warning(history, cfg) is None  # one epoch of it: not yet
    history = _history(cfg, [at_base, at_base])
    line = signal_warning(history, cfg)
    assert line is not None and line.startswith("warning: no signal for 2 epochs")
    assert "spread 0" in line and "100% of members at the base's fitness" in line and "raise evolution.sigma" in line
    assert signal_warning(_history(cfg, [at_base, at_base, at_base]), cfg) is None  # said once, not every epoch
    assert signal_warning(_history(cfg, [at_base, [0.4, 0.6, 0.5, 0.55]]), cfg) is None  # a spread: signal


def test_collapse_is_named_and_the_stop_is_recomputed_from_the_history():
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        ["evolution.signal_check.patience=2", "evolution.signal_check.stop=true", "evolution.epochs=5"],
    )
    far_below = [0.1, 0.0, 0.2, 0.1]  # members' mean 0.1 against the base's 0.5
    history = _history(cfg, [far_below, far_below])
    assert "warning: collapse for 2 epochs" in (signal_warning(history, cfg) or "")
    state = RunState(epoch=2, history=history, config=cfg.to_dict())
    assert is_finished(state, cfg.evolution, cfg.run.target_fitness)  # the stop the record check accepts
    healthy = RunState(epoch=2, history=_history(cfg, [[0.4, 0.6, 0.5, 0.55]] * 2), config=cfg.to_dict())
    assert not is_finished(healthy, cfg.evolution, cfg.run.target_fitness)  # and a forged one it refuses
