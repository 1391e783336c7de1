"""The sequential evaluator: one model (one member) answers ARC questions; answers are scored.

Prompts are tokenized (and images processed) once per run by `prepare`; each member then only
runs `generate`, several prompts per call (left padding). Decoding comes from the config alone
(`evaluation.decoding`, greedy by default); `max_new_tokens` follows `evaluation.max_new_tokens_rule`
(twice the target's tokens, or ERO's twice the reduced target's characters) with a cap; stop at end of turn.

    python -m ERO_EGGROLL.arc_evaluator --config configs/default.yaml [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import GenerationConfig

from .arc_fitness import METRICS, canonical_text, cell_accuracy, char_similarity, exact
from .arc_task import ArcTask, Grid
from .config import Config, EvaluationConfig
from .prompts import Question, answer_text, build_messages, leave_one_out_questions, held_out_test_questions

__all__ = ["char_similarity", "evaluate", "evaluate_members", "prepare", "EvalResult", "EvaluationError", "PreparedQuestion"]


class EvaluationError(RuntimeError):
    """Generation or scoring failed in a way the user can fix (out of memory, a bad fitness value)."""


OOM_ADVICE = (
    "out of GPU memory during generation. With evaluation.members_per_batch K > 1 (or auto), K members share "
    "each generate call, so the batch is K times larger: lower members_per_batch first (at 1 members are evaluated "
    "one at a time and the population size does not matter); then lower evaluation.batch_size, "
    "evaluation.max_new_tokens_cap or data.max_train_examples, or use data.input_mode: text. `python -m ERO_EGGROLL.memory --config <yaml>` predicts the peak."
)


@dataclass
class PreparedQuestion:
    """A question with its processor inputs, built once and reused for every member."""

    question: Question
    inputs: dict  # input_ids, attention_mask (1-D), plus pixel_values / image_grid_thw for image modes
    max_new_tokens: int


@dataclass
class AnswerRecord:
    task_id: str
    text: str
    score: float  # the configured fitness metric
    char_similarity: float
    exact: float
    cell_accuracy: float
    prompt_tokens: int
    new_tokens: int


@dataclass
class EvalResult:
    """Scores of one model on a set of questions; a task's score is the mean over its questions."""

    per_task: dict[str, float]
    answers: list[AnswerRecord] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def fitness(self) -> float:
        return sum(self.per_task.values()) / len(self.per_task)

    def metric(self, name: str) -> dict[str, float]:
        """Per-task mean of another metric (exact, cell_accuracy, char_similarity)."""
        out: dict[str, list[float]] = {}
        for a in self.answers:
            out.setdefault(a.task_id, []).append(getattr(a, name))
        return {t: sum(v) / len(v) for t, v in out.items()}


def questions_for(tasks: Sequence[ArcTask], cfg: Config, purpose: str) -> list[Question]:
    """Questions for the search's fitness ('fitness') or for the reported score ('test')."""
    k = cfg.data.max_train_examples
    if purpose == "fitness" and cfg.data.fitness_source == "train_loo":
        return [q for t in tasks for q in leave_one_out_questions(t, k)]
    return [q for t in tasks for q in held_out_test_questions(t, k)]


def token_budget(ev: EvaluationConfig, target: Grid, target_tokens: int) -> int:
    """max_new_tokens of one question: `target_tokens` rule (factor x the target answer's tokens) or ERO's
    (2 x the characters of the target in Python list notation reduced to [0-9[],]), capped by max_new_tokens_cap."""
    wanted = 2 * len(canonical_text(target)) if ev.max_new_tokens_rule == "ero" else math.ceil(ev.max_new_tokens_factor * target_tokens)
    return min(ev.max_new_tokens_cap, max(1, wanted))


def prepare(questions: Sequence[Question], processor, cfg: Config) -> list[PreparedQuestion]:
    """Chat template, tokens and pixels of every question, and its max_new_tokens."""
    prepared = []
    tokenizer = processor.tokenizer
    for q in questions:
        messages, images = build_messages(q, cfg.data.input_mode, cfg.data.cell_size, cfg.data.max_pixels)
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=images or None, return_tensors="pt")
        inputs = {k: (v[0] if k in ("input_ids", "attention_mask") else v) for k, v in inputs.items()}
        target_tokens = len(tokenizer(answer_text(q.target), add_special_tokens=False)["input_ids"])
        prepared.append(PreparedQuestion(q, dict(inputs), token_budget(cfg.evaluation, q.target, target_tokens)))
    return prepared


DECODING_FIELDS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


def resolved_decoding(cfg: Config) -> dict:
    """The decoding values in force: the config's, or (preset 'ero') the base checkpoint's generation_config.json
    as transformers would complete it, which is what ERO's evaluation used. Recorded in the run's metrics."""
    dec = cfg.evaluation.decoding
    if dec.preset == "explicit":
        return {name: getattr(dec, name) for name in DECODING_FIELDS}
    path = cfg.resolve_path(cfg.model.path) / "generation_config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise EvaluationError(f"evaluation.decoding.preset 'ero' reads the base checkpoint's {path}, which cannot be read "
                              f"({err}); copy it from the downloaded checkpoint, or use preset 'explicit'") from None
    defaults = GenerationConfig._get_default_generation_params()  # what generate() fills in for unset values
    return {name: saved.get(name, defaults[name]) for name in DECODING_FIELDS}


def generation_config(decoding: dict, max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> GenerationConfig:
    """A GenerationConfig with every generation parameter set (transformers' global defaults, then ours), so that
    generate() fills nothing in from the checkpoint's generation_config.json."""
    values = GenerationConfig._get_default_generation_params()
    del values["max_length"]  # max_new_tokens decides the length
    values.update(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                  do_sample=decoding["do_sample"], repetition_penalty=decoding["repetition_penalty"])
    if decoding["do_sample"]:  # set only where they act: transformers warns about sampling values under greedy decoding
        values.update(temperature=decoding["temperature"], top_p=decoding["top_p"], top_k=decoding["top_k"])
    return GenerationConfig(**values)


def sampling_seed(seed: int, stream: Sequence[int], question: int) -> int:
    """The torch seed of one sampled generate call, a pure function of integers (never Python's salted hash()):
    the run's seed, the evaluation's stream (e.g. epoch and member) and the index of the call's first question."""
    return int(np.random.SeedSequence([seed, *stream, question]).generate_state(1, np.uint64)[0] >> 1)


def _collate(batch: Sequence[PreparedQuestion], pad_id: int, device) -> dict:
    width = max(p.inputs["input_ids"].shape[0] for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, p in enumerate(batch):
        n = p.inputs["input_ids"].shape[0]
        ids[row, width - n :] = p.inputs["input_ids"]  # left padding: every prompt ends where generation starts
        mask[row, width - n :] = 1
    out = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if "pixel_values" in batch[0].inputs:
        out["pixel_values"] = torch.cat([p.inputs["pixel_values"] for p in batch]).to(device)
        out["image_grid_thw"] = torch.cat([p.inputs["image_grid_thw"] for p in batch]).to(device)
    return out


@torch.no_grad()
def generate_answers(model, processor, prepared: Sequence[PreparedQuestion], cfg: Config, replicas: int = 1,
                     stream: Sequence[int] = ()) -> list[list[tuple[str, int]]]:
    """(decoded text, new-token count) per replica and question, `evaluation.batch_size` prompts per generate call.

    With replicas K > 1 every prompt batch is repeated K times, member-major, so that K members
    (see Perturber.members) answer in one generate call; replica k sees exactly the rows that a
    one-member call would. Sampled decoding draws from torch's global generator (generate takes no
    generator), so each call runs inside `fork_rng` after `torch.manual_seed(sampling_seed(...))`:
    the answers are a function of (seed, stream, question), and the caller's RNG state is untouched.
    """
    tokenizer = processor.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn
    device = next(model.parameters()).device
    decoding = resolved_decoding(cfg)
    out: list[list[tuple[str, int]]] = [[] for _ in range(replicas)]
    bs = cfg.evaluation.batch_size
    for start in range(0, len(prepared), bs):
        batch = prepared[start : start + bs]
        inputs = _collate(batch, pad_id, device)
        if replicas > 1:
            inputs = {k: torch.cat([v] * replicas) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
        config = generation_config(decoding, max(p.max_new_tokens for p in batch), end_of_turn, pad_id)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=decoding["do_sample"]):
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


def _score(prepared: Sequence[PreparedQuestion], answers: Sequence[tuple[str, int]], cfg: Config) -> EvalResult:
    metric = METRICS[cfg.evaluation.fitness]
    records = []
    for p, (text, n_new) in zip(prepared, answers):
        target = p.question.target
        score = metric(text, target)
        if not (isinstance(score, float) and 0.0 <= score <= 1.0):  # NaN fails this too
            raise EvaluationError(f"fitness {cfg.evaluation.fitness!r} returned {score!r} for task {p.question.task_id}; "
                                  "a fitness must be a finite float in [0, 1] (NaN would poison the update)")
        records.append(AnswerRecord(
            p.question.task_id, text, score, char_similarity(text, target), exact(text, target),
            cell_accuracy(text, target), int(p.inputs["input_ids"].shape[0]), n_new,
        ))
    per_task: dict[str, list[float]] = {}
    for a in records:
        per_task.setdefault(a.task_id, []).append(a.score)
    return EvalResult({t: sum(v) / len(v) for t, v in per_task.items()}, records)


def evaluate(model, processor, prepared: Sequence[PreparedQuestion], cfg: Config, stream: Sequence[int] = ()) -> EvalResult:
    """Scores of `model` on prepared questions (see `prepare`). Deterministic: sampled decoding is seeded
    from the run's seed, `stream` (integers naming this evaluation, e.g. epoch and member) and the question."""
    start = time.perf_counter()
    result = _score(prepared, generate_answers(model, processor, prepared, cfg, stream=stream)[0], cfg)
    result.seconds = time.perf_counter() - start
    return result


def evaluate_members(model, processor, prepared: Sequence[PreparedQuestion], cfg: Config, members: int,
                     stream: Sequence[int] = ()) -> list[EvalResult]:
    """Scores of `members` members answering in the same generate calls (inside `Perturber.members`)."""
    start = time.perf_counter()
    results = [_score(prepared, answers, cfg) for answers in generate_answers(model, processor, prepared, cfg, members, stream)]
    for r in results:
        r.seconds = (time.perf_counter() - start) / members
    return results


# --- the per-task table in ERO's layout -------------------------------------------------------------

def results_table(task_ids: Sequence[str], result: EvalResult) -> list[dict]:
    """Rows T1..Tn with the fitness metric, exact match and cell accuracy, then the mean row."""
    ex, cells, chars = result.metric("exact"), result.metric("cell_accuracy"), result.metric("char_similarity")
    rows = [{"task": f"T{i}", "id": t, "char_similarity": chars[t], "cell_accuracy": cells[t], "exact": ex[t]}
            for i, t in enumerate(task_ids, start=1)]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)
    rows.append({"task": "mean", "id": f"{sum(r['exact'] == 1.0 for r in rows)}/{len(rows)} solved exactly",
                 "char_similarity": mean("char_similarity"), "cell_accuracy": mean("cell_accuracy"), "exact": mean("exact")})
    return rows


def write_table(rows: list[dict], out_stem: Path) -> tuple[Path, Path]:
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_stem.with_suffix(".csv"), out_stem.with_suffix(".md")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| task | id | char similarity | cell accuracy | exact |", "|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['id']} | {r['char_similarity']:.4f} | {r['cell_accuracy']:.4f} | {r['exact']:.4f} |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def main(argv: Sequence[str] | None = None) -> int:
    from .arc_task import ArcDataError, load_tasks
    from .checkpointing import CheckpointError, load_evaluated_model
    from .config import ConfigError, load_config
    from .model_loading import ModelLoadError

    parser = argparse.ArgumentParser(description="Evaluate the base model, or an evolved checkpoint, on the config's ARC tasks.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", help="a run checkpoint directory or an exported model directory")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", help="output stem (default results/<run name>/eval_<base|checkpoint>)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        tasks = load_tasks(cfg.data.source, cfg.data.split, cfg.data.task_ids)
        model, processor = load_evaluated_model(cfg, args.checkpoint)
        result = evaluate(model, processor, prepare(questions_for(tasks, cfg, "test"), processor, cfg), cfg)
    except (ConfigError, ArcDataError, ModelLoadError, CheckpointError, EvaluationError) as err:
        parser.exit(2, f"error: {err}\n")
    rows = results_table([t.id for t in tasks], result)
    stem = Path(args.out) if args.out else cfg.run_dir / ("eval_checkpoint" if args.checkpoint else "eval_base")
    csv_path, md_path = write_table(rows, stem)
    print(md_path.read_text(), end="")
    print(f"wrote {csv_path} and {md_path} ({result.seconds:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
