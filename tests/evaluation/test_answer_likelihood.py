"""The answer_logprob fitness: a direct computation, batching (questions and K members), its true gradient, the
held-out token budget, and a CI-sized run that raises the held-out answer log-prob."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import in_process, run_args

from ERO_EGGROLL.arc.prompts import Question, build_messages
from ERO_EGGROLL.arc.tasks import Pair, load_tasks
from ERO_EGGROLL.config import ROOT, load_config
from ERO_EGGROLL.evaluation import evaluator as arc_evaluator
from ERO_EGGROLL.evaluation.evaluator import EvaluationError, evaluate, evaluate_members
from ERO_EGGROLL.evaluation.likelihood import answer_logprob_objective, answer_logprobs, fitness_gradient
from ERO_EGGROLL.evaluation.prepared import prepare, questions_for
from ERO_EGGROLL.model.qwen import run_perturber

HELD_OUT = [
    "data.fitness_source=train_loo",
    "evaluation.max_new_tokens_rule=demonstrations",
    "evaluation.fitness=answer_logprob",
]


def _cfg(*overrides: str):
    return load_config(ROOT / "configs" / "smoke.yaml", [*HELD_OUT, *overrides])


def _handcrafted() -> list[Question]:
    demo = (Pair([[1, 0], [0, 1]], [[0, 1], [1, 0]]), Pair([[2, 2], [0, 0]], [[0, 0], [2, 2]]))
    return [
        Question("handmade", demo, [[3, 0], [0, 3]], [[0, 3], [3, 0]]),
        Question("handmade", demo, [[4, 4, 4]], [[4, 4, 4], [4, 4, 4], [4, 4, 4]]),
    ]  # a longer answer: padding differs


def test_answer_logprob_equals_log_softmax_gather_on_the_models_logits(tiny):
    model, processor = tiny
    cfg = _cfg("evaluation.batch_size=1")
    tokenizer = processor.tokenizer
    for question, value in zip(
        _handcrafted(), answer_logprobs(model, processor, prepare(_handcrafted(), processor, cfg), cfg)[0]
    ):
        messages, _ = build_messages(question, "text")
        prompt = tokenizer(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))[
            "input_ids"
        ]
        answer = tokenizer(
            "[[" + "], [".join(", ".join(map(str, row)) for row in question.target) + "]]<|im_end|>",
            add_special_tokens=False,
        )["input_ids"]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        picked = log_probs[:-1].gather(-1, ids[0, 1:, None])[-len(answer) :]  # position t predicts token t + 1
        assert value == pytest.approx(picked.mean().item(), abs=1e-5)
        assert value < 0


def test_batched_questions_and_k_members_equal_one_at_a_time(tiny):
    model, processor = tiny
    cfg = _cfg("evolution.population_size=4", "evolution.sigma=2.0", "evaluation.batch_size=1")
    prepared = prepare(questions_for(load_tasks(ids=["b1fc8b8e"]), cfg, "fitness")[:3] + _handcrafted(), processor, cfg)
    perturber = run_perturber(model, cfg)
    try:
        single = []
        for member in range(4):
            with perturber.member(0, member):
                single.append(answer_logprobs(model, processor, prepared, cfg)[0])
        cfg.evaluation.batch_size = len(prepared)
        with perturber.members(0, range(4)):
            batched = answer_logprobs(model, processor, prepared, cfg, replicas=4)
            results = evaluate_members(model, processor, prepared, cfg, 4)
    finally:
        perturber.remove_hooks()
    assert len({round(row[0], 4) for row in single}) == 4  # the members really differ, so equality below can fail
    for one, many, result in zip(single, batched, results):
        assert many == pytest.approx(one, abs=2e-5)
        assert result.fitness == pytest.approx(
            sum(one[:3]) / 3 * 0.5 + sum(one[3:]) / 2 * 0.5, abs=2e-5
        )  # per-task means
        assert all(a.text is None for a in result.answers)  # members are scored without generating


def test_fitness_gradient_matches_finite_differences(tiny):
    model, processor = tiny
    cfg = _cfg("evaluation.batch_size=2")
    prepared = prepare(_handcrafted(), processor, cfg)
    name = "model.language_model.layers.0.mlp.down_proj.weight"
    gradient = fitness_gradient(model, processor, prepared, cfg, [name])[name]
    weight = dict(model.named_parameters())[name]
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    saved, h = weight.detach().clone(), 1e-3
    values = []
    try:
        for step in (h, -h):
            with torch.no_grad():
                weight.copy_(saved + step * direction)
                values.append(answer_logprob_objective(model, processor, prepared, cfg).item())
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert (values[0] - values[1]) / (2 * h) == pytest.approx(float((gradient * direction).sum()), rel=2e-2)
    assert weight.grad is None and not weight.requires_grad


def test_held_out_budget_does_not_depend_on_the_hidden_answer(tiny):
    _, processor = tiny
    task = load_tasks(ids=["b1fc8b8e"])[0]
    changed = type(task)(task.id, task.train, tuple(Pair(p.input, [[7] * 20] * 20) for p in task.test))

    def budgets(cfg, t):
        return [p.max_new_tokens for p in prepare(questions_for([t], cfg, "test"), processor, cfg)]

    cfg = _cfg("evaluation.max_new_tokens_cap=10000")
    assert budgets(cfg, changed) == budgets(cfg, task)
    cfg.evaluation.max_new_tokens_rule = (
        "target_tokens"  # ERO's protocol reads the answer: the same change moves its budget
    )
    assert budgets(cfg, changed) != budgets(cfg, task)


def test_the_range_check_takes_log_probabilities_and_refuses_nan(tiny, monkeypatch):
    model, processor = tiny
    cfg = _cfg()
    prepared = prepare(_handcrafted(), processor, cfg)
    assert evaluate(model, processor, prepared, cfg).fitness < 0
    monkeypatch.setattr(arc_evaluator, "answer_logprobs", lambda *args: [[math.nan, -1.0]])
    with pytest.raises(EvaluationError, match="'answer_logprob' returned nan .* a finite float <= 0"):
        evaluate(model, processor, prepared, cfg)


def test_a_held_out_run_raises_the_held_out_answer_logprob(tmp_path, tiny_model_dir):
    """Two epochs, population 8 (all in one batch), relative sigma 0.5 (smoke.yaml), on b1fc8b8e's leave-one-out
    pairs; the test answer is never seen.

    Calibrated on this project's 2-core CPU with today's tiny build: over seeds 0-3 the held-out answer log-prob
    rose by 0.114, 0.048, 0.083 and 0.066 (from -1.3742); the margin 0.02 is under half the smallest rise. The
    gradient cosine was positive in all 8 epochs (0.0028-0.0054)."""
    args = run_args(
        tmp_path,
        "heldout",
        *HELD_OUT,
        "evolution.sigma=0.5",
        "evolution.population_size=8",
        "evaluation.members_per_batch=8",
        "evaluation.batch_size=8",
        "evolution.lr=1.0",
        "evaluation.max_new_tokens_cap=16",
        "evolution.log_gradient_cosine=true",
        "seed=0",
    )
    code, _, err = in_process(args)
    assert code == 0, err[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results" / "heldout" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["max_new_tokens_rule"] == "demonstrations"
    assert rows[-1]["mean_model_answer_logprob"] >= rows[0]["mean_model_answer_logprob"] + 0.02, rows
    assert (
        rows[-1]["mean_model_test_score"] == rows[-1]["mean_model_answer_logprob"]
    )  # the test score is the held-out log-prob
    cosines = [r["gradient_cosine"] for r in rows[1:]]
    assert all(-1 <= c <= 1 for c in cosines) and sum(cosines) > 0, cosines


def test_members_per_batch_is_part_of_an_answer_logprob_runs_identity(tiny):
    """Batched members' log-probs differ from one-at-a-time in the last fp32 bits,
    so resuming with another K is not exact."""
    from ERO_EGGROLL.model.qwen import classify_model
    from ERO_EGGROLL.storage.identity import identity_of

    model, _ = tiny

    def identity(cfg):
        return identity_of(
            cfg,
            classify_model(model, cfg),
            device_type="cpu",
            dtype=torch.float32,
            members_per_batch=4,
            base_weights="abc",
        )

    assert identity(_cfg())["evaluation.members_per_batch"] == 4
    assert "evaluation.members_per_batch" not in identity(load_config(ROOT / "configs" / "smoke.yaml"))
