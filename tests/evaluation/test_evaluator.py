"""The sequential evaluator on the tiny model: deterministic, batched like one-at-a-time, honest about sources."""

import json
import shutil

import pytest
import torch

from ERO_EGGROLL.arc.prompts import answer_text
from ERO_EGGROLL.arc.tasks import load_tasks
from ERO_EGGROLL.config import ROOT, load_config
from ERO_EGGROLL.evaluation.decoding import GENERATE_DEFAULTS, DecodingError
from ERO_EGGROLL.evaluation.evaluator import (
    evaluate,
    prepare,
    questions_for,
    resolved_decoding,
    results_table,
    write_table,
)
from ERO_EGGROLL.model.loading import load_model_from_dir


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


def test_ero_rule_is_twice_the_reduced_target_text_capped(setup):
    _, processor, cfg, tasks = setup
    cfg.evaluation.max_new_tokens_rule, cfg.evaluation.max_new_tokens_cap = "ero", 10_000
    for p in prepare(questions_for(tasks, cfg, "test"), processor, cfg):
        reduced = str(p.question.target).replace(" ", "")  # Python list notation reduced to [0-9[],]
        assert p.max_new_tokens == 2 * len(reduced)
    cfg.evaluation.max_new_tokens_cap = 7
    assert all(p.max_new_tokens == 7 for p in prepare(questions_for(tasks, cfg, "test"), processor, cfg))


@pytest.fixture
def penalised_copy(tiny_model_dir, tmp_path):
    """A copy of the tiny model whose generation_config.json asks for a strong repetition penalty."""
    copy = tmp_path / "tiny-with-penalty"
    shutil.copytree(tiny_model_dir, copy)
    saved = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**saved, "repetition_penalty": 3.0}))
    return copy


def test_greedy_default_ignores_the_checkpoints_generation_config(tiny, penalised_copy):
    model, processor = tiny
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        ["data.task_ids=[b1fc8b8e]", f"model.path={penalised_copy}", "evaluation.max_new_tokens_cap=24"],
    )
    prepared = prepare(questions_for(load_tasks(ids=cfg.data.task_ids), cfg, "test"), processor, cfg)
    penalised_model, _ = load_model_from_dir(penalised_copy)
    assert penalised_model.generation_config.repetition_penalty == 3.0
    reference = [a.text for a in evaluate(model, processor, prepared, cfg).answers]
    assert [a.text for a in evaluate(penalised_model, processor, prepared, cfg).answers] == reference
    # the ero preset decodes as the checkpoint says, and the penalty changes the answers (so the line above can fail)
    cfg.evaluation.decoding.preset = "ero"
    assert resolved_decoding(cfg) == {
        "do_sample": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 50,
        "repetition_penalty": 3.0,
    }
    prepared = prepare(questions_for(load_tasks(ids=cfg.data.task_ids), cfg, "test"), processor, cfg)
    (penalised_copy / "generation_config.json").unlink()  # resolved once by prepare: generation reads no file
    assert [a.text for a in evaluate(penalised_model, processor, prepared, cfg).answers] != reference


def test_ero_preset_without_a_generation_config_is_a_clear_error(tmp_path):
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"model.path={tmp_path}", "evaluation.decoding.preset=ero"])
    with pytest.raises(DecodingError, match="generation_config.json.*preset 'explicit'"):
        resolved_decoding(cfg)


def test_pinned_generate_defaults_are_what_the_installed_transformers_fills_in():
    """GENERATE_DEFAULTS stands in for a private transformers API; a transformers upgrade that changes it fails
    here (the test may read the private API, the product does not)."""
    from transformers import GenerationConfig

    defaults = GenerationConfig._get_default_generation_params()
    del defaults["max_length"]  # max_new_tokens decides the length
    assert GENERATE_DEFAULTS == defaults


def test_sampled_answers_are_a_function_of_seed_stream_and_question(setup):
    model, processor, cfg, tasks = setup
    cfg.evaluation.decoding.do_sample, cfg.evaluation.max_new_tokens_cap = True, 24
    prepared = prepare(questions_for(tasks, cfg, "test"), processor, cfg)
    before = torch.get_rng_state()

    def answers(stream):
        return [a.text for a in evaluate(model, processor, prepared, cfg, stream).answers]

    first = answers((0, 1, 2))
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator is left alone
    assert answers((0, 1, 2)) == first
    assert answers((0, 1, 3)) != first


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
    result = evaluate(model, processor, prepare(questions_for(tasks, cfg, "test"), processor, cfg), cfg, report=True)
    rows = results_table([t.id for t in tasks], result)
    assert all(r["answer_logprob"] < 0 for r in rows)  # a report scores the answer's likelihood whatever the fitness
    assert [r["task"] for r in rows] == ["T1", "T2", "mean"] and rows[-1]["id"].endswith("solved exactly")
    csv_path, md_path = write_table(rows, tmp_path / "table")
    assert "| T1 | b1fc8b8e |" in md_path.read_text() and csv_path.read_text().startswith("task,id,char_similarity")
