"""Greedy (or seeded sampled) answers of one model, or of K members in the same generate calls.

Decoding comes from the config alone (`evaluation.decoding`, greedy by default); each question's
`max_new_tokens` was fixed by `prepared.token_budget`; generation stops at the end of the turn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import GenerationConfig

from ERO_EGGROLL.config import Config
from ERO_EGGROLL.evaluation.decoding import GENERATE_DEFAULTS
from ERO_EGGROLL.evaluation.prepared import (
    END_OF_TURN,
    EvaluationError,
    PreparedQuestion,
    collate,
    pad_id_of,
    replicate,
)

OOM_ADVICE = (
    "out of GPU memory during generation. With evaluation.members_per_batch K > 1 (or auto), K members share "
    "each generate call, so the batch is K times larger: lower members_per_batch first (at 1 members are evaluated "
    "one at a time and the population size does not matter); then lower evaluation.batch_size, "
    "evaluation.max_new_tokens_cap or data.max_train_examples, or use data.input_mode: text. `python -m "
    "ERO_EGGROLL.memory --config <yaml>` predicts the peak."
)


def generation_config(decoding: dict, max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> GenerationConfig:
    """A GenerationConfig with every generation parameter set (transformers' global defaults, then ours), so that
    generate() fills nothing in from the checkpoint's generation_config.json."""
    values = dict(GENERATE_DEFAULTS)  # max_new_tokens, not max_length, decides the length
    values.update(
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        do_sample=decoding["do_sample"],
        repetition_penalty=decoding["repetition_penalty"],
    )
    if decoding["do_sample"]:  # set only where they act: transformers warns about sampling values under greedy decoding
        values.update(temperature=decoding["temperature"], top_p=decoding["top_p"], top_k=decoding["top_k"])
    return GenerationConfig(**values)


def sampling_seed(seed: int, stream: Sequence[int], question: int) -> int:
    """The torch seed of one sampled generate call, a pure function of integers (never Python's salted hash()):
    the run's seed, the evaluation's stream (e.g. epoch and member) and the index of the call's first question."""
    return int(np.random.SeedSequence([seed, *stream, question]).generate_state(1, np.uint64)[0] >> 1)


@torch.no_grad()
def generate_answers(
    model, processor, prepared: Sequence[PreparedQuestion], cfg: Config, replicas: int = 1, stream: Sequence[int] = ()
) -> list[list[tuple[str, int]]]:
    """(decoded text, new-token count) per replica and question, `evaluation.batch_size` prompts per generate call.

    With replicas K > 1 every prompt batch is repeated K times, member-major, so that K members
    (see Perturber.members) answer in one generate call; replica k sees exactly the rows that a
    one-member call would. Sampled decoding draws from torch's global generator (generate takes no
    generator), so each call runs inside `fork_rng` after `torch.manual_seed(sampling_seed(...))`:
    the answers are a function of (seed, stream, question), and the caller's RNG state is untouched.
    """
    tokenizer = processor.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    pad_id = pad_id_of(tokenizer)
    param = next(model.parameters())
    decoding = prepared[0].decoding if prepared else {}
    out: list[list[tuple[str, int]]] = [[] for _ in range(replicas)]
    bs = cfg.evaluation.batch_size
    for start in range(0, len(prepared), bs):
        batch = prepared[start : start + bs]
        inputs = replicate(collate(batch, pad_id, param.device), replicas, param.dtype)
        config = generation_config(decoding, max(p.max_new_tokens for p in batch), end_of_turn, pad_id)
        try:
            with torch.random.fork_rng(
                devices=[param.device] if param.device.type == "cuda" else [], enabled=decoding["do_sample"]
            ):
                if decoding["do_sample"]:
                    torch.manual_seed(sampling_seed(cfg.seed, stream, start))
                generated = model.generate(**inputs, generation_config=config)
        except torch.OutOfMemoryError:
            raise EvaluationError(OOM_ADVICE) from None
        new = generated[:, inputs["input_ids"].shape[1] :]
        for replica in range(replicas):
            for row, p in enumerate(batch):
                tokens = new[replica * len(batch) + row, : p.max_new_tokens].tolist()
                if end_of_turn in tokens:
                    tokens = tokens[: tokens.index(end_of_turn)]
                tokens = [t for t in tokens if t != pad_id]
                out[replica].append((tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)))
    return out
