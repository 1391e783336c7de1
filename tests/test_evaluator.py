"""The sequential evaluator on the tiny model: deterministic, batched like one-at-a-time, honest about sources."""

import pytest

from ERO_EGGROLL.arc_evaluator import evaluate, prepare, questions_for, results_table, write_table
from ERO_EGGROLL.arc_task import load_tasks
from ERO_EGGROLL.config import ROOT, load_config
from ERO_EGGROLL.prompts import answer_text


@pytest.fixture
def setup(tiny):
    model, processor = tiny
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    tasks = load_tasks(ids=cfg.data.task_ids)
    return model, processor, cfg, tasks


def test_evaluation_is_deterministic_and_scored(setup):
    model, processor, cfg, tasks = setup
    prepared = prepare(questions_for(tasks, cfg, "fitness"), processor, cfg)
    first, second = evaluate(model, processor, prepared, cfg), evaluate(model, processor, prepared, cfg)
    assert [a.text for a in first.answers] == [a.text for a in second.answers]
    assert first.per_task == second.per_task and set(first.per_task) == {t.id for t in tasks}
    assert 0.0 <= first.fitness <= 1.0
    for a in first.answers:
        assert a.new_tokens <= cfg.evaluation.max_new_tokens_cap and a.prompt_tokens > 100


def test_max_new_tokens_is_twice_the_answer_capped(setup):
    _, processor, cfg, tasks = setup
    cfg.evaluation.max_new_tokens_cap = 10_000
    prepared = prepare(questions_for(tasks, cfg, "test"), processor, cfg)
    for p in prepared:
        answer_tokens = len(processor.tokenizer(answer_text(p.question.target), add_special_tokens=False)["input_ids"])
        assert p.max_new_tokens == 2 * answer_tokens  # ERO: twice the answer's length
    cfg.evaluation.max_new_tokens_cap = 7
    assert all(p.max_new_tokens == 7 for p in prepare(questions_for(tasks, cfg, "test"), processor, cfg))


def test_batched_prompts_match_one_at_a_time(setup):
    model, processor, cfg, tasks = setup
    prepared = prepare(questions_for(tasks, cfg, "fitness"), processor, cfg)
    cfg.evaluation.batch_size = 1
    single = evaluate(model, processor, prepared, cfg)
    cfg.evaluation.batch_size = len(prepared)
    batched = evaluate(model, processor, prepared, cfg)
    assert [a.text for a in single.answers] == [a.text for a in batched.answers]


def test_train_loo_never_uses_the_test_output(setup):
    _, _, cfg, tasks = setup
    cfg.data.fitness_source = "train_loo"
    fitness_questions = questions_for(tasks, cfg, "fitness")
    assert len(fitness_questions) == sum(len(t.train) for t in tasks)
    train_pairs = {t.id: [(p.input, p.output) for p in t.train] for t in tasks}
    for q in fitness_questions:
        assert (q.query, q.target) in train_pairs[q.task_id]  # the question is a training pair...
        assert all((p.input, p.output) in train_pairs[q.task_id] for p in q.examples)  # ...and so is every example
    assert [q.target for q in questions_for(tasks, cfg, "test")] == [p.output for t in tasks for p in t.test]


def test_results_table_layout(setup, tmp_path):
    model, processor, cfg, tasks = setup
    result = evaluate(model, processor, prepare(questions_for(tasks, cfg, "test"), processor, cfg), cfg)
    rows = results_table([t.id for t in tasks], result)
    assert [r["task"] for r in rows] == ["T1", "T2", "mean"] and rows[-1]["id"].endswith("solved exactly")
    csv_path, md_path = write_table(rows, tmp_path / "table")
    assert "| T1 | b1fc8b8e |" in md_path.read_text() and csv_path.read_text().startswith("task,id,char_similarity")
