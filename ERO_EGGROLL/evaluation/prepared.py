"""Questions made ready for a model once per run: chat template, tokens, pixels, the answer's tokens and the token
budget.

Both readers of a question build on this module: generation (`arc_evaluator`) and teacher-forced
scoring (`likelihood`). Prompts are left-padded into batches so that every prompt ends
where the answer starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ERO_EGGROLL.arc.fitness import canonical_text
from ERO_EGGROLL.arc.prompts import (
    Question,
    answer_text,
    build_messages,
    held_out_test_questions,
    leave_one_out_questions,
)
from ERO_EGGROLL.arc.tasks import ArcTask, Grid
from ERO_EGGROLL.config import Config, EvaluationConfig
from ERO_EGGROLL.core.errors import EggrollError
from ERO_EGGROLL.evaluation.decoding import resolved_decoding

END_OF_TURN = "<|im_end|>"


class EvaluationError(EggrollError):
    """Generation or scoring failed in a way the user can fix (out of memory, a bad fitness value)."""


@dataclass
class PreparedQuestion:
    """A question with its processor inputs, built once and reused for every member."""

    question: Question
    inputs: dict  # input_ids, attention_mask (1-D), plus pixel_values / image_grid_thw for image modes
    max_new_tokens: int
    answer_ids: list[int]  # the target's assistant turn: answer_text(target) then <|im_end|>; read only by scoring
    decoding: dict  # decoding.resolved_decoding, resolved once by `prepare` for all its questions


def questions_for(tasks: Sequence[ArcTask], cfg: Config, purpose: str) -> list[Question]:
    """Questions for the search's fitness ('fitness') or for the reported score ('test')."""
    k = cfg.data.max_train_examples
    if purpose == "fitness" and cfg.data.fitness_source == "train_loo":
        return [q for t in tasks for q in leave_one_out_questions(t, k)]
    return [q for t in tasks for q in held_out_test_questions(t, k)]


def demonstrated_size(question: Question, count_tokens: Callable[[Grid], int]) -> int:
    """The answer's token count as far as the question itself tells it, without its target: the largest
    demonstration output, or the query scaled by the largest output/input ratio of the demonstrations."""
    ratio = max(count_tokens(p.answer) / count_tokens(p.input) for p in question.examples) if question.examples else 1.0
    outputs = [count_tokens(p.answer) for p in question.examples]
    return max([math.ceil(ratio * count_tokens(question.query)), *outputs])


def token_budget(ev: EvaluationConfig, question: Question, count_tokens: Callable[[Grid], int]) -> int:
    """max_new_tokens of one question, capped by max_new_tokens_cap. `target_tokens`: factor x the target's tokens;
    `ero`: 2 x the characters of the reduced target text (ERO's budget); both read the target, so they are for
    fitness_source 'test' only. `demonstrations`: factor x `demonstrated_size`, which never reads the target."""
    if ev.max_new_tokens_rule == "ero":
        wanted = 2 * len(canonical_text(question.target))
    elif ev.max_new_tokens_rule == "target_tokens":
        wanted = math.ceil(ev.max_new_tokens_factor * count_tokens(question.target))
    else:
        wanted = math.ceil(ev.max_new_tokens_factor * demonstrated_size(question, count_tokens))
    return min(ev.max_new_tokens_cap, max(1, wanted))


def prepare(questions: Sequence[Question], processor, cfg: Config) -> list[PreparedQuestion]:
    """Chat template, tokens and pixels of every question, its max_new_tokens and its answer's tokens."""
    prepared = []
    decoding = resolved_decoding(cfg)
    tokenizer = processor.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)

    def count_tokens(grid):
        return len(tokenizer(answer_text(grid), add_special_tokens=False)["input_ids"])

    for q in questions:
        messages, images = build_messages(q, cfg.data.input_mode, cfg.data.cell_size, cfg.data.max_pixels)
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=images or None, return_tensors="pt")
        inputs = {k: (v[0] if k in ("input_ids", "attention_mask") else v) for k, v in inputs.items()}
        answer_ids = tokenizer(answer_text(q.target), add_special_tokens=False)["input_ids"] + [end_of_turn]
        prepared.append(
            PreparedQuestion(q, dict(inputs), token_budget(cfg.evaluation, q, count_tokens), answer_ids, decoding)
        )
    return prepared


def pad_id_of(tokenizer) -> int:
    """The padding token (end of turn where the tokenizer names none)."""
    return (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.convert_tokens_to_ids(END_OF_TURN)
    )


def collate(batch: Sequence[PreparedQuestion], pad_id: int, device, answers: bool = False) -> dict:
    """Left-padded model inputs of a batch of prompts (followed by their answers when `answers`)."""
    sequences = [
        p.inputs["input_ids"] if not answers else torch.cat([p.inputs["input_ids"], torch.tensor(p.answer_ids)])
        for p in batch
    ]
    width = max(s.shape[0] for s in sequences)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, width - s.shape[0] :] = s
        mask[row, width - s.shape[0] :] = 1
    out = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if "pixel_values" in batch[0].inputs:
        out["pixel_values"] = torch.cat([p.inputs["pixel_values"] for p in batch]).to(device)
        out["image_grid_thw"] = torch.cat([p.inputs["image_grid_thw"] for p in batch]).to(device)
    return out


def replicate(inputs: dict, replicas: int, dtype: torch.dtype) -> dict:
    """The batch repeated `replicas` times, member-major (as Perturber.members lays out its rows); pixels in the model's
    dtype."""
    if replicas > 1:
        inputs = {k: torch.cat([v] * replicas) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs
