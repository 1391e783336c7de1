"""Rebuild a run's evolved weights from the base model, its config and its fitness history.

All noise is regenerated from keys, so a run's whole history is a few kilobytes:

    python -m ERO_EGGROLL.replay checkpoints/<run> [--check]

`--check` compares the rebuilt tensors with the checkpoint bit for bit.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from .arc_evaluator import EvaluationError
from .checkpointing import CheckpointError, RunState, load_checkpoint
from .config import ConfigError, config_from_dict
from .epoch_step import EpochStep
from .model_loading import ModelLoadError, load_model
from .perturbation import Perturber
from .qwen_param_mapper import classify_model
from .run_identity import IdentityError, base_weights_digest, check_identity, identity_of


def apply_row(step: EpochStep, row: dict) -> None:
    """Apply one recorded epoch (a metrics row) through the training's own epoch step: epoch 0 begins, later rows update
    and conclude. The decisions (new best, degeneration-guard rollback) are recomputed from the recorded mean-model
    fitness and must equal the recorded ones: a history that disagrees with itself is refused."""
    if not row.get("fitness"):
        step.begin(row["mean_model_fitness"])  # epoch 0: the base model
        return
    step.update(row["fitness"], row["epoch"] - 1)
    decision = step.conclude(row["epoch"], row["mean_model_fitness"])
    if (decision.new_best, decision.rolled_back) != (row["new_best"], row["rolled_back"]):
        raise CheckpointError(f"epoch {row['epoch']} of the saved history records new_best={row['new_best']}, "
                              f"rolled_back={row['rolled_back']}, but its fitness gives {decision}: the history was altered")


def replay_weights(model, state: RunState) -> dict[str, torch.Tensor]:
    """Apply every recorded epoch to `model` (apply_row); return the evolvable tensors."""
    cfg = config_from_dict(state.config, "saved config")
    perturber = Perturber(model, cfg)
    step = EpochStep(perturber, RunState(), cfg.run.degeneration_patience)
    for row in state.history:
        apply_row(step, row)
    perturber.remove_hooks()
    return {k: v.detach().clone() for k, v in perturber.evolvable_state().items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild a run's evolved weights from base model + config + fitness history.")
    parser.add_argument("checkpoint", help="a run's checkpoint folder (checkpoints/<run>) or an epoch_NNNN/ directory")
    parser.add_argument("--check", action="store_true", help="compare with the checkpoint's tensors bit for bit")
    parser.add_argument("--out", help="write the rebuilt tensors to this safetensors file")
    args = parser.parse_args(argv)
    try:
        saved, _, state = load_checkpoint(Path(args.checkpoint))
        cfg = config_from_dict(state.config, f"{args.checkpoint} (saved config)")
        model, _ = load_model(cfg)
        param = next(model.parameters())
        # replay evaluates nothing, so the run's own members_per_batch stands
        current = identity_of(cfg, classify_model(model, cfg), device_type=param.device.type, dtype=param.dtype,
                              members_per_batch=state.identity.get("evaluation.members_per_batch", 1), base_weights=base_weights_digest(cfg))
        check_identity(state.identity, current, args.checkpoint, "replay")
    except (CheckpointError, ConfigError, ModelLoadError, IdentityError, EvaluationError) as err:
        parser.exit(2, f"error: {err}\n")
    rebuilt = replay_weights(model, state)
    updates = sum(1 for r in state.history if r.get("fitness"))
    print(f"replayed {updates} update(s) of {cfg.run.name} from {len(rebuilt)} evolvable tensors")
    if args.out:
        from safetensors.torch import save_file

        save_file(rebuilt, args.out)
        print(f"wrote {args.out}")
    if args.check:
        different = [n for n in saved if not torch.equal(saved[n], rebuilt[n].cpu())]
        if different:
            print(f"MISMATCH in {len(different)} tensor(s), e.g. {different[:3]}")
            return 1
        print("bit-identical to the checkpoint")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
