"""A run's identity: everything that decides its numbers, in one place, for resume and replay.

It is every config field except ALLOWED_TO_CHANGE (fields that cannot change any epoch's weights),
with `auto` values as resolved, plus what lies outside the config: a hash of the base weights,
the tensor-name-to-noise-key map, the device type and the library versions. A resumed or replayed
run whose identity differs is refused, naming the field.

Fields that open issues will add fall on one side of the list as follows: distributed workers,
checkpoint mode and loggers go into ALLOWED_TO_CHANGE (they move work and bytes, not numbers, and
the workers verify bit-identical weights per epoch); generation settings stay in the identity
(they change the answers, hence the fitness). A new field is in the identity until listed here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from ERO_EGGROLL.config import Config
from ERO_EGGROLL.core.digest import files_digest
from ERO_EGGROLL.core.errors import EggrollError
from ERO_EGGROLL.core.tensor_classes import ParamSpec
from ERO_EGGROLL.evaluation.evaluator import resolved_decoding

ALLOWED_TO_CHANGE: dict[str, str] = {
    "evolution.epochs": "how many epochs run, not what an epoch computes: a finished run can be extended",
    "run.target_fitness": "when the run stops early, not what an epoch computes",
    "run.name": "where outputs go (resume separately checks it is the same folder)",
    "run.output_dir": "where results go",
    "run.checkpoint_dir": "where checkpoints go",
    "run.save_every": "which epoch directories are kept on disk",
    "run.if_exists": "what a new run does with an earlier run's folders",
    "run.memory_check": "whether a run that may not fit is refused before it starts, not what it computes",
    "model.path": "where the base weights are; their bytes are in the identity as base_weights",
    "model.config_json": "read only by the weight-free tools (parameter mapper, memory model)",
    "run.checkpoint": "what is kept on disk (a run record or full tensors); replay rebuilds the same bits, checked by "
    "digest",
    "run.snapshot_every": "which epochs also keep their tensors on disk: resume starts from the nearest, same bits",
    "run.export_best": "whether best_model/ is written, not what any epoch computes",
    "run.loggers": "where the same numbers are also reported (TensorBoard, W&B), not what an epoch computes",
    "distributed.workers": "how many processes evaluate the members: each member's fitness is the same anywhere "
    "(member batches are fixed by the config), and the workers' weights are verified bit-identical every epoch",
    "distributed.address": "which Ray cluster runs the workers, not what they compute",
    "distributed.gpus_per_worker": "how devices are shared among workers; the device type itself is in the identity",
    "distributed.cpus_per_worker": "how many CPUs (and torch threads) a worker gets; its weights are verified "
    "bit-identical to the driver's every epoch",
    "distributed.connect_timeout_s": "how long joining a Ray cluster may take before the run is refused",
    "evolution.signal_check": "when a run without signal warns (or stops early, like run.target_fitness), not what "
    "an epoch computes",
    "evolution.log_gradient_cosine": "a logged diagnostic: one backward pass of the mean model, which changes no "
    "weight and draws no noise",
}
# Recorded as resolved rather than as written: model.device (its type: CPU and GPU arithmetic differ
# in the last bits), model.dtype, evaluation.decoding (preset 'ero' reads the base checkpoint's
# generation_config.json), and evaluation.members_per_batch, which is left out in float32 with a generated
# fitness because batched members give identical answers there (tests/core/test_batched_members.py), but not in
# bf16 (bit-identical on this CPU too, but a GPU's matmul may choose another kernel for another number of rows,
# and one rounding more in bf16 can change a greedy answer), nor for answer_logprob, whose values move in the
# last fp32 bits with the batch's shape.
RESOLVED = ("model.device", "model.dtype", "evaluation.decoding", "evaluation.members_per_batch")


class IdentityError(EggrollError):
    """A resume or replay that could not be exact."""


def _flat(cfg: Config) -> dict[str, Any]:
    flat = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat


def identity_of(
    cfg: Config,
    specs: list[ParamSpec],
    *,
    device_type: str,
    dtype: torch.dtype,
    members_per_batch: int,
    base_weights: str,
) -> dict[str, Any]:
    """The identity of a run of `cfg` on a model with these tensors, this device and these resolved values."""
    import jax
    import transformers

    identity = {k: v for k, v in _flat(cfg).items() if k not in ALLOWED_TO_CHANGE and k not in RESOLVED}
    dtype_name = str(dtype).removeprefix("torch.")
    identity.update(
        {"model.device": device_type, "model.dtype": dtype_name, "evaluation.decoding": resolved_decoding(cfg)}
    )
    if dtype_name != "float32" or cfg.evaluation.fitness == "answer_logprob":
        identity["evaluation.members_per_batch"] = members_per_batch
    key_map = json.dumps([(s.name, s.cls.value, s.key_index) for s in specs])
    identity["tensor_keys"] = hashlib.sha256(key_map.encode()).hexdigest()[:32]
    identity["base_weights"] = base_weights
    identity.update(
        {
            "versions.torch": torch.__version__,
            "versions.jax": jax.__version__,
            "versions.transformers": transformers.__version__,
        }
    )
    # where the update's contraction runs: in JAX on the weights' device, or in torch when JAX cannot reach it
    identity["jax_backend"] = jax.default_backend()
    return identity


def base_weights_digest(cfg: Config) -> str:
    """Hash of every byte of the base model's *.safetensors files."""
    return files_digest(cfg.resolve_path(cfg.model.path).glob("*.safetensors"))


def hint(field: str, saved: Any) -> str:
    """What to do when identity field `field` differs from the run's `saved` value."""
    if field == "model.device":
        return (
            f"CPU and GPU arithmetic differ in the last bits, so it can only continue exactly on a {saved} device "
            f"(model.device: {saved})"
        )
    if field.startswith("versions."):
        return f"install {field.removeprefix('versions.')}=={saved} to continue it exactly"
    if field == "jax_backend":
        return (
            f"the run computed its noise with JAX on '{saved}'; install the jaxlib for that backend "
            "(the update's contraction runs in another place otherwise, with other last bits)"
        )
    if field == "base_weights":
        return "model.path holds other base weights than the run started from; point it at the run's base model"
    if field == "tensor_keys":
        return "the model's tensors or their classes differ from the run's (another architecture or params settings)"
    return (
        f"use the run's saved results/<run>/config.yaml; only {', '.join(ALLOWED_TO_CHANGE)} may change "
        "(and members_per_batch in float32 with a generated fitness)"
    )


def check_identity(saved: dict[str, Any], current: dict[str, Any], where: str, action: str) -> None:
    """Raise IdentityError naming the first field where `current` differs from the run's `saved` identity."""
    if not saved:
        raise IdentityError(
            f"{where}: the checkpoint records no run identity (written by an older version); "
            f"cannot {action} it exactly: start the run again"
        )
    changed = [k for k in dict.fromkeys([*saved, *current]) if saved.get(k) != current.get(k)]
    if changed:
        field = changed[0]
        more = f" (and {len(changed) - 1} more: {', '.join(changed[1:4])})" if len(changed) > 1 else ""
        raise IdentityError(
            f"{where}: cannot {action} exactly: {field} differs (the run has {saved.get(field)!r}, "
            f"now {current.get(field)!r}){more}; {hint(field, saved.get(field))}"
        )
