"""One worker of a distributed run (distributed.py starts it as a Ray actor): it evaluates the members it is given.

It loads the model once and keeps it for the whole evolution. Its weights move only through the training's own
EpochStep, fed the rows the driver records (EpochStep.apply), so after every epoch they equal the driver's bit for
bit; it reports a tensor_digest per evolvable tensor so that the driver can prove it. A restarted worker rebuilds
its weights the same way from the base model and the history the driver sends: no shared filesystem is needed.
Ray imports this module by name in the actor's process, so the package's __init__ (JAX allocates GPU memory on
demand) runs before anything imports JAX.
"""

from __future__ import annotations

import time

import torch

from ERO_EGGROLL.arc.tasks import load_tasks
from ERO_EGGROLL.config import config_from_dict
from ERO_EGGROLL.evaluation.evaluator import prepare, questions_for
from ERO_EGGROLL.model.loading import load_model
from ERO_EGGROLL.model.qwen import classify_model, run_perturber
from ERO_EGGROLL.run.epoch_step import EpochStep
from ERO_EGGROLL.run.population import evaluate_batch
from ERO_EGGROLL.run.record import ClonedBest, tensor_digests
from ERO_EGGROLL.storage.checkpoints import RunState
from ERO_EGGROLL.storage.identity import base_weights_digest, identity_of


class PopulationWorker:
    """Holds one copy of the model, moved epoch by epoch exactly as the driver's is."""

    def __init__(self, config: dict, task_ids: list[str], members_per_batch: int, slot: int, incarnation: int):
        cfg = config_from_dict(config, "the driver's config")
        torch.set_num_threads(cfg.distributed.cpus_per_worker)  # the CPUs Ray gave this worker, no more
        self.cfg, self.k = cfg, members_per_batch
        self.slot, self.incarnation = slot, incarnation  # the driver's numbering: which worker, how many restarts
        self.model, self.processor = load_model(cfg)
        self.specs = classify_model(self.model, cfg)
        self.perturber = run_perturber(self.model, cfg, self.specs)
        # the guard's best weights as host clones: a worker has no run record to replay them from
        self.step = EpochStep(self.perturber, RunState(), cfg.run.degeneration_patience, ClonedBest())
        tasks = load_tasks(cfg.data.source, cfg.data.split, task_ids)
        self.questions = prepare(questions_for(tasks, cfg, "fitness"), self.processor, cfg)

    def identity(self) -> dict:
        """This worker's run identity (storage/identity.identity_of): device type, versions, base weights, tensor
        keys."""
        param = next(self.model.parameters())
        return identity_of(
            self.cfg,
            self.specs,
            device_type=param.device.type,
            dtype=param.dtype,
            members_per_batch=self.k,
            base_weights=base_weights_digest(self.cfg),
        )

    def advance(self, rows: list[dict]) -> tuple[dict[str, str], float]:
        """Apply recorded epochs (the driver's rows, in order) through EpochStep; the digests after them and the
        seconds."""
        start = time.perf_counter()
        for row in rows:
            self.step.apply(row)
        return tensor_digests(self.perturber.evolvable_state()), time.perf_counter() - start

    def evaluate(self, epoch: int, ids: list[int]) -> tuple[list[float], float]:
        """The fitness of members `ids` of `epoch` (one generate call for several), and the seconds it took."""
        start = time.perf_counter()
        fitness = evaluate_batch(self.perturber, self.model, self.processor, self.questions, self.cfg, epoch, ids)
        return fitness, time.perf_counter() - start
