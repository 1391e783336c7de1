"""Prompts in all three input modes go through the real processor, image tokens included."""

import pytest

from ERO_EGGROLL.arc.prompts import build_messages, held_out_test_questions, leave_one_out_questions
from ERO_EGGROLL.arc.tasks import load_tasks


@pytest.fixture(scope="module")
def task():
    return load_tasks(ids=["e6de6e8f"])[0]


def test_test_questions_use_training_pairs_as_examples(task):
    (q,) = held_out_test_questions(task)
    assert q.examples == task.train and q.target == task.test[0].output
    assert len(held_out_test_questions(task, max_examples=1)[0].examples) == 1


def test_leave_one_out_never_shows_the_test_output(task):
    questions = leave_one_out_questions(task)
    assert len(questions) == len(task.train)
    for i, q in enumerate(questions):
        assert q.target == task.train[i].output and task.train[i] not in q.examples
        assert all(p.output != task.test[0].output for p in q.examples)


@pytest.mark.parametrize(
    "mode,images_per_grid,has_text", [("image+text", 1, True), ("image", 1, False), ("text", 0, True)]
)
def test_processor_accepts_each_mode_and_image_tokens_match(tiny, task, mode, images_per_grid, has_text):
    _, processor = tiny
    (q,) = held_out_test_questions(task, max_examples=2)
    messages, images = build_messages(q, mode, cell_size=14)
    assert len(images) == images_per_grid * (2 * 2 + 1)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ("[[" in text.split("Test input:")[1]) == has_text
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == processor.image_token_id).sum())
    if images:
        assert n_image_tokens == int(sum(thw.prod() for thw in inputs["image_grid_thw"])) // 4
        assert n_image_tokens > 0
    else:
        assert n_image_tokens == 0


def test_unknown_mode(task):
    with pytest.raises(ValueError, match="input mode"):
        build_messages(held_out_test_questions(task)[0], "audio")
