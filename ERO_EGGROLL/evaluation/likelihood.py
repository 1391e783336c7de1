"""The `answer_logprob` fitness: how likely the model finds the right answer, teacher-forced, without generating.

For one question, with prompt tokens p (the chat template up to the assistant turn's start) and the
target's assistant turn a = tokens(answer_text(target)) + <|im_end|> (the grid written as the prompts
write grids), the score is the mean over the answer's tokens of log P(a_j | p, a_<j): a value <= 0,
0 only for a model certain of the whole answer. One forward pass per question scores every answer
token at once; it separates members even when their greedy answers are identical, and a longer or
shorter answer cannot score better than the right one. The same code, with gradients, is the
objective that backprop follows (`scripts/bench/es_vs_backprop.py`, `evolution.log_gradient_cosine`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ERO_EGGROLL.config import Config
from ERO_EGGROLL.evaluation.generation import OOM_ADVICE
from ERO_EGGROLL.evaluation.prepared import EvaluationError, PreparedQuestion, collate, pad_id_of, replicate


def _batch_logprobs(model, batch: Sequence[PreparedQuestion], pad_id: int, replicas: int) -> torch.Tensor:
    """Mean answer-token log-probability of each row, (replicas * len(batch),), member-major like generation."""
    param = next(model.parameters())
    inputs = replicate(collate(batch, pad_id, param.device, answers=True), replicas, param.dtype)
    lengths = [len(p.answer_ids) for p in batch] * replicas
    keep = max(lengths) + 1  # left padding: every answer ends at the last position; logits at t predict token t + 1
    try:
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits.float()
    except torch.OutOfMemoryError:
        raise EvaluationError(OOM_ADVICE) from None
    log_probs = torch.log_softmax(
        logits[:, :-1], dim=-1
    )  # (rows, keep - 1, vocab): predictions of the last keep - 1 tokens
    targets = inputs["input_ids"][:, -(keep - 1) :]
    token_lp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    positions = torch.arange(keep - 1, device=token_lp.device)
    in_answer = positions.unsqueeze(0) >= (keep - 1 - torch.tensor(lengths, device=token_lp.device)).unsqueeze(1)
    return (token_lp * in_answer).sum(1) / in_answer.sum(1)


def answer_logprobs(
    model, processor, prepared: Sequence[PreparedQuestion], cfg: Config, replicas: int = 1
) -> list[list[float]]:
    """Per replica (member) and question, the mean answer-token log-probability; `evaluation.batch_size`
    questions per forward pass, repeated `replicas` times member-major for `Perturber.members`."""
    pad_id = pad_id_of(processor.tokenizer)
    out: list[list[float]] = [[] for _ in range(replicas)]
    bs = cfg.evaluation.batch_size
    with torch.no_grad():
        for start in range(0, len(prepared), bs):
            batch = prepared[start : start + bs]
            values = _batch_logprobs(model, batch, pad_id, replicas).tolist()
            for replica in range(replicas):
                out[replica] += values[replica * len(batch) : (replica + 1) * len(batch)]
    return out


def answer_logprob_objective(model, processor, prepared: Sequence[PreparedQuestion], cfg: Config) -> torch.Tensor:
    """The answer_logprob fitness of `model` as a differentiable scalar: per-task means of the questions'
    mean answer-token log-probabilities, averaged over tasks (what `EvalResult.fitness` reports)."""
    pad_id = pad_id_of(processor.tokenizer)
    per_task: dict[str, int] = {}
    for p in prepared:
        per_task[p.question.task_id] = per_task.get(p.question.task_id, 0) + 1
    total = torch.zeros((), device=next(model.parameters()).device)
    bs = cfg.evaluation.batch_size
    for start in range(0, len(prepared), bs):
        batch = prepared[start : start + bs]
        weights = torch.tensor(
            [1.0 / (len(per_task) * per_task[p.question.task_id]) for p in batch], device=total.device
        )
        total = total + (_batch_logprobs(model, batch, pad_id, 1) * weights).sum()
    return total


def gradient_cosine(gradient: dict[str, torch.Tensor], change: dict[str, torch.Tensor]) -> float:
    """Cosine between two directions given tensor by tensor over the same names (fp32 sums), e.g. an ES update
    and the true gradient of the fitness; 0 where either is zero."""
    dot = sum(float((gradient[n].float() * change[n].float()).sum()) for n in gradient)
    g2 = sum(float(gradient[n].float().pow(2).sum()) for n in gradient)
    c2 = sum(float(change[n].float().pow(2).sum()) for n in gradient)
    return dot / (g2 * c2) ** 0.5 if g2 > 0 and c2 > 0 else 0.0


def fitness_gradient(
    model, processor, prepared: Sequence[PreparedQuestion], cfg: Config, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The true gradient of the answer_logprob fitness with respect to the named parameters (one backward pass);
    the parameters' requires_grad flags are restored and their .grad left untouched."""
    params = dict(model.named_parameters())
    chosen = [params[n] for n in names]
    flags = [p.requires_grad for p in chosen]
    try:
        for p in chosen:
            p.requires_grad_(True)
        with torch.enable_grad():
            grads = torch.autograd.grad(
                answer_logprob_objective(model, processor, prepared, cfg), chosen, allow_unused=True
            )
    finally:
        for p, flag in zip(chosen, flags):
            p.requires_grad_(flag)
    return {n: (g if g is not None else torch.zeros_like(p)).detach() for n, p, g in zip(names, chosen, grads)}


def update_with_gradient_cosine(
    update: Callable[[], dict], perturber, model, processor, prepared: Sequence[PreparedQuestion], cfg: Config
) -> dict:
    """`update()`'s statistics (the epoch step's update) plus `gradient_cosine`: the cosine between the change the
    update
    made to the evolvable tensors and the true gradient of the answer_logprob fitness on `prepared` at the weights
    before it (one backward pass; nothing else changes, so a run's numbers are the same with or without it)."""
    before = {n: t.clone() for n, t in perturber.evolvable_state().items()}
    gradient = fitness_gradient(model, processor, prepared, cfg, list(before))
    stats = update()
    change = {n: t.float() - before[n].float() for n, t in perturber.evolvable_state().items()}
    return {**stats, "gradient_cosine": gradient_cosine(gradient, change)}
