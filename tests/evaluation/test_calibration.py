"""sigma: auto (evaluation/calibration.py) and the divergence verdicts (evaluation/divergence.py), measured on the
tiny model: the target is met on held-out questions with fresh members, and another model gets another sigma."""

from __future__ import annotations

import pytest

from ERO_EGGROLL.arc.tasks import load_tasks
from ERO_EGGROLL.config import ROOT, load_config
from ERO_EGGROLL.evaluation.calibration import calibrate, check_kl
from ERO_EGGROLL.evaluation.divergence import measure, reference_of
from ERO_EGGROLL.evaluation.prepared import prepare, questions_for
from ERO_EGGROLL.model.qwen import run_perturber
from ERO_EGGROLL.model.random_model import TextShape, random_model

HELD_OUT = [
    "data.fitness_source=train_loo",
    "evaluation.max_new_tokens_rule=demonstrations",
    "evaluation.fitness=answer_logprob",
    "evaluation.batch_size=8",
]


def _questions(cfg, processor):
    tasks = load_tasks(cfg.data.source, cfg.data.split, cfg.data.task_ids)
    return prepare(questions_for(tasks, cfg, "fitness"), processor, cfg), prepare(
        questions_for(tasks, cfg, "test"), processor, cfg
    )


def test_calibration_meets_its_target_on_held_out_questions_and_each_model_gets_its_own_sigma(
    tiny, tiny_model_dir, one_torch_thread
):
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        [
            *HELD_OUT,
            "evolution.sigma=auto",
            "evolution.sigma_mode=absolute",
            "evolution.population_size=16",
        ],
    )
    other = random_model(tiny_model_dir, TextShape(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2))
    chosen = {}
    for name, model in (("tiny", tiny[0]), ("random", other)):
        fitness_q, held_out = _questions(cfg, tiny[1])
        result = calibrate(model, tiny[1], fitness_q, cfg)
        assert result.member_evaluations <= 2 * cfg.evolution.population_size  # the budget: two epochs' members
        achieved = check_kl(model, tiny[1], held_out, cfg, result.sigma, 32)  # other questions, other members
        assert abs(achieved / cfg.evolution.calibration.target_kl - 1) <= 0.25, (name, result, achieved)
        chosen[name] = result.sigma
    # the trained tiny model and a random one need other sigmas: KL grows as sigma squared, so either model at the
    # other's sigma would miss its target by more than 1.25**2 - 1 = 56%; a rule returning one constant fails here
    assert max(chosen.values()) / min(chosen.values()) > 1.25, chosen


@pytest.mark.parametrize(("sigma", "verdict"), [(20.0, "collapse"), (1e-5, "no signal"), (0.5, "ok")])
def test_divergence_calls_a_huge_sigma_collapse_a_tiny_one_no_signal_and_the_defaults_ok(
    tiny, one_torch_thread, sigma, verdict
):
    cfg = load_config(ROOT / "configs" / "default.yaml", ["data.task_ids=[b1fc8b8e]"])  # 0.5 relative: its own
    model, processor = tiny
    fitness_q, _ = _questions(cfg, processor)
    perturber = run_perturber(model, cfg.with_sigma(sigma))
    try:
        figures = measure(
            perturber, model, processor, fitness_q, cfg, reference_of(model, processor, fitness_q, cfg), [0, 1, 2, 3]
        )
    finally:
        perturber.remove_hooks()
    assert figures.verdict() == verdict, figures.line()
