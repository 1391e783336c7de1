"""ARC questions as Qwen2.5-VL chat messages, in three input modes.

A Question is one query grid with its demonstration pairs and target. Which pairs are the
demonstrations decides honesty: with `fitness_source: test` the search sees the test output
(ERO's test-time search); with `train_loo` each training pair in turn is the question and the
test output is only used for the reported test score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from PIL import Image

from ERO_EGGROLL.arc.tasks import ArcDataError, ArcTask, Grid, Pair, grid_to_text, render_grid

InputMode = Literal["image+text", "image", "text"]
INPUT_MODES = ("image+text", "image", "text")

SYSTEM_PROMPT = (
    "You are solving an abstract reasoning puzzle. Every example turns an input grid into an output grid by the same "
    "hidden rule. Grids hold colours 0-9. Work out the rule and apply it to the test input. Reply with the output "
    "grid only, as a list of rows of integers, for example [[0, 1], [2, 3]]."
)


@dataclass(frozen=True)
class Question:
    task_id: str
    examples: tuple[Pair, ...]
    query: Grid
    target: Grid


def held_out_test_questions(task: ArcTask, max_examples: int | None = None) -> list[Question]:
    """One question per test pair, with the training pairs (the first `max_examples`) as demonstrations."""
    examples = task.train[:max_examples]
    return [Question(task.id, examples, pair.input, pair.answer) for pair in task.test]


def leave_one_out_questions(task: ArcTask, max_examples: int | None = None) -> list[Question]:
    """Each training pair in turn is the question; the others are the demonstrations (a task with one pair has none
    to give: refused, as max_train_examples: 1 is)."""
    if len(task.train) < 2:
        raise ArcDataError(
            f"task {task.id} has {len(task.train)} training pair(s): data.fitness_source 'train_loo' holds one out "
            "and needs at least one other as a demonstration; leave the task out or use fitness_source: test"
        )
    questions = []
    for i, held_out in enumerate(task.train):
        others = (task.train[:i] + task.train[i + 1 :])[:max_examples]
        questions.append(Question(task.id, others, held_out.input, held_out.answer))
    return questions


def _grid_content(
    grid: Grid, mode: InputMode, images: list[Image.Image], cell_size: int, max_pixels: int
) -> list[dict]:
    content = []
    if mode in ("image+text", "image"):
        image = render_grid(grid, cell_size, max_pixels=max_pixels)
        images.append(image)
        content.append({"type": "image", "image": image})
    if mode in ("image+text", "text"):
        content.append({"type": "text", "text": grid_to_text(grid) + "\n"})
    return content


def build_messages(
    question: Question, mode: InputMode = "image+text", cell_size: int = 28, max_pixels: int = 512 * 28 * 28
):
    """(messages, images): chat messages for the processor's chat template, and the PIL images in order."""
    if mode not in INPUT_MODES:
        raise ValueError(f"input mode must be one of {INPUT_MODES}, got {mode!r}")
    images: list[Image.Image] = []
    content: list[dict] = []
    for i, pair in enumerate(question.examples, start=1):
        content.append({"type": "text", "text": f"Example {i} input:\n"})
        content += _grid_content(pair.input, mode, images, cell_size, max_pixels)
        content.append({"type": "text", "text": f"Example {i} output:\n"})
        content += _grid_content(pair.answer, mode, images, cell_size, max_pixels)
    content.append({"type": "text", "text": "Test input:\n"})
    content += _grid_content(question.query, mode, images, cell_size, max_pixels)
    content.append({"type": "text", "text": "Test output:"})
    messages = [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": content},
    ]
    return messages, images


def answer_text(grid: Grid) -> str:
    """What a perfect model replies (used to size max_new_tokens and to pretrain the tiny model)."""
    return grid_to_text(grid)
