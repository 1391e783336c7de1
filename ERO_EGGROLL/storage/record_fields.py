"""Every field of a run record, what vouches for it, and the seal that covers them all.

A run record (each epoch's state.json) is what users share and cite, so each of its fields is either recomputed
(by every check, by replay, or by `replay --check --full`), or sealed only, or informational (read by nothing that
decides or publishes). The seal covers every field whatever its kind, listed here or not: `seal_of` keeps a digest of
each field of state.json and of each field of each history row, bound to its name and epoch, so `broken_seal` names
the field and the epoch that an edit changed. It is an unkeyed sha256 (docs/checkpoints.md, "What vouches for a run
record"): it stops accidents and hand edits, not a user who reruns this code; recomputation is what holds against
that one.

STATE_FIELDS and ROW_FIELDS are the one list of the record's fields: a field another change adds to the record is
sealed without being listed, and tests/storage/test_record_fields.py refuses a recorded field missing here or from
the table in docs/checkpoints.md.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

CHECK = "recomputed on every check"  # storage/record_check.check_record: resume, replay, the evaluator
REPLAY = "recomputed by replay"  # run/record.rebuild: replay-mode resume, the guard, replay, --export
FULL = "recomputed by replay --check --full"  # the mean model evaluated again at every epoch
SEALED = "sealed"  # only the seal vouches for it
INFORMATIONAL = "informational"  # sealed too, but nothing that decides or publishes reads it

# field of state.json -> (kind, how it is checked)
STATE_FIELDS: dict[str, tuple[str, str]] = {
    "epoch": (CHECK, "one history row and one weight digest per epoch"),
    "identity": (CHECK, "resume and replay compare it with this machine's (storage/identity.py)"),
    "config": (SEALED, "read to rebuild, evaluate and export; its effect on the weights is checked by replay"),
    "history": (CHECK, "its rows, below"),
    "best_fitness": (CHECK, "the highest mean_model_fitness of the history"),
    "best_epoch": (CHECK, "the epoch of best_fitness"),
    "epochs_since_best": (CHECK, "counted from the history with run.degeneration_patience"),
    "optimizer_step": (CHECK, "one optimizer step per epoch: equals epoch"),
    "finished": (CHECK, "all epochs ran, or the search's stop score reached run.target_fitness"),
    "weight_digests": (REPLAY, "replay rebuilds every epoch's weights and compares each digest"),
    "tensor_digests": (CHECK, "their combined digest is the last weight digest; replay compares each tensor's"),
    "sigma": (REPLAY, "recomputed from the base weights (run/record.check_sigma)"),
    "optimizer_digest": (CHECK, "the digest of the saved optimizer tensors, compared when they are loaded"),
    "seal": (CHECK, "recomputed from every other field"),
}

# field of a history row (metrics.jsonl, besides `fitness`) -> (kind, how it is checked)
ROW_FIELDS: dict[str, tuple[str, str]] = {
    "epoch": (CHECK, "the row's index"),
    "fitness": (REPLAY, "each member's fitness moves the weights: the rebuilt weights' digest"),
    "member_mean": (CHECK, "the mean of fitness"),
    "member_max": (CHECK, "the max of fitness"),
    "member_min": (CHECK, "the min of fitness"),
    "mean_model_fitness": (FULL, "in range on every check; decides new_best, the guard and the stop"),
    "mean_model_test_score": (FULL, "the mean model's score on the test questions"),
    "mean_model_exact": (FULL, "the mean model's exact matches on the test questions"),
    "mean_model_cell_accuracy": (FULL, "the mean model's cell accuracy on the test questions"),
    "mean_model_char_similarity": (FULL, "the mean model's char similarity on the test questions"),
    "mean_model_answer_logprob": (FULL, "the mean model's answer log-probability on the test questions"),
    "answers": (FULL, "the mean model's answers to the test questions"),
    "new_best": (CHECK, "mean_model_fitness above every earlier one"),
    "fitness_spread": (CHECK, "the population std of fitness (evaluation/divergence.epoch_signs)"),
    "members_at_base_fitness": (CHECK, "the share of fitness equal to the base model's (a generated fitness)"),
    "answers_unparsed": (CHECK, "the share of the row's answers that are not grids (a generated fitness)"),
    "signal": (CHECK, "the verdict of the three above; evolution.signal_check's stop reads it"),
    "rolled_back": (CHECK, "run.degeneration_patience epochs without a new best"),
    "lr": (REPLAY, "the update's statistics, compared with the replayed update's"),
    "sigma_scale": (REPLAY, "as lr"),
    "update_norm": (REPLAY, "as lr"),
    "fraction_changed": (REPLAY, "as lr"),
    "lost_update_fraction": (REPLAY, "as lr"),
    "elites": (REPLAY, "ERO's decisions (evolution.search: ero), in every row; compared with the replayed selection"),
    "elite_best": (REPLAY, "as elites"),
    "best_elite_so_far": (REPLAY, "as elites; ERO's stop score"),
    "degeneration_counter": (REPLAY, "as elites"),
    "reset_to_base": (REPLAY, "as elites"),
    "gradient_cosine": (SEALED, "evolution.log_gradient_cosine: needs the gradient, not recomputed"),
    "decoding": (SEALED, "epoch 0: the decoding as resolved"),
    "max_new_tokens_rule": (SEALED, "epoch 0: evaluation.max_new_tokens_rule"),
    "seconds": (INFORMATIONAL, "wall time of the epoch"),
    "peak_memory_mb": (INFORMATIONAL, "peak memory of the epoch"),
    "peak_memory_scope": (INFORMATIONAL, "what peak_memory_mb measured"),
    "workers": (INFORMATIONAL, "distributed.workers: per-worker timing and restarts"),
}

SEAL_VERSION = 1
PER_EPOCH = ("history", "weight_digests")  # sealed entry by entry, so that a broken seal names the epoch


def _digest(where: str, value: Any) -> str:
    """12 hex digits of sha256 over the field's place and its canonical JSON (so a value moved elsewhere breaks it)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{where}\0{text}".encode()).hexdigest()[:12]


def seal_of(record: dict[str, Any]) -> dict[str, Any]:
    """The seal of a run record (state.json's object, `seal` itself left out): a digest per field and per row field."""
    record = json.loads(json.dumps(record))  # the values as state.json gives them back (tuples are lists)
    return {
        "version": SEAL_VERSION,
        "state": {k: _digest(k, v) for k, v in sorted(record.items()) if k not in ("seal", *PER_EPOCH)},
        "history": [
            {k: _digest(f"{index}/{k}", v) for k, v in sorted(row.items())}
            for index, row in enumerate(record.get("history", []))
        ],
        "weight_digests": [_digest(f"{i}/weight_digests", d) for i, d in enumerate(record.get("weight_digests", []))],
    }


def broken_seal(record: dict[str, Any]) -> str | None:
    """What the seal of `record` (state.json's object, with its `seal`) says was changed, naming the field and the
    epoch; None when every field matches. A record without a seal (written before seals) is no concern here."""
    saved, now = record.get("seal") or {}, seal_of(record)
    if saved.get("version") != SEAL_VERSION:
        return f"seal has version {saved.get('version')!r}, this version writes {SEAL_VERSION}"
    for name in sorted(saved.get("state", {}).keys() | now["state"].keys()):
        if saved["state"].get(name) != now["state"].get(name):
            return f"{name} does not match the record's seal" + ("" if name in record else " (removed)")
    for field in PER_EPOCH:
        covered = len(saved.get(field, []))
        if covered != len(now[field]):
            return f"the seal covers {covered} epoch(s) of {field}, the record holds {len(now[field])}"
    for epoch, (sealed, found) in enumerate(zip(saved.get("history", []), now["history"])):
        for name in sorted(sealed.keys() | found.keys()):
            if sealed.get(name) != found.get(name):
                change = " (removed)" if name not in found else " (added)" if name not in sealed else ""
                return f"epoch {epoch}: {name} does not match the record's seal{change}"
    for epoch, (sealed, found) in enumerate(zip(saved.get("weight_digests", []), now["weight_digests"])):
        if sealed != found:
            return f"epoch {epoch}: weight_digests[{epoch}] does not match the record's seal"
    return None
