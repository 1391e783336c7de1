"""The population evaluated by several workers (Ray actors, one model each); the driver keeps the mean model.

Per epoch only integers go out (epoch, member ids) and fitness values come back. Member batches are fixed by the
config (population.member_batches) and handed to whichever worker is free. After the driver's epoch step every
worker applies the same recorded row through EpochStep and returns a digest per evolvable tensor; any difference
from the driver's stops the run. A worker that dies loses only its unfinished batch: the others take it over, and
a replacement rebuilds its weights from the base model and the driver's fitness history (replay).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import ERO_EGGROLL  # its folder goes to the workers' PYTHONPATH
import hyperscalees
from ERO_EGGROLL.config import Config, DistributedConfig
from ERO_EGGROLL.core.errors import EggrollError
from ERO_EGGROLL.run.population import MemberProgress, member_batches
from ERO_EGGROLL.run.record import tensor_digests
from ERO_EGGROLL.run.stop_signals import StopFlag
from ERO_EGGROLL.run.worker import PopulationWorker
from ERO_EGGROLL.storage.identity import check_identity

OBJECT_STORE_BYTES = 200 * 2**20  # a local instance: only fitness values and digests travel
MAX_RESTARTS = 3  # per worker and run: a worker that keeps dying is a broken machine or setup, not bad luck
REPLAYED = ("epoch", "fitness", "mean_model_fitness", "new_best", "rolled_back")  # what EpochStep.apply reads


class DistributedError(EggrollError):
    """Ray missing or unreachable, too few resources, a worker that keeps dying, or weights that diverged."""


def _ray():
    try:
        import ray
    except ImportError:
        raise DistributedError(
            "distributed.workers > 1 needs Ray: pip install ray==2.60.0 (see requirements.txt), "
            "or set distributed.workers: 1"
        ) from None
    return ray


def _wait_for(address: str, timeout_s: float) -> None:
    """Raise DistributedError unless something answers at host:port within `timeout_s` (Ray itself retries forever)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(
                (host.strip("[]"), int(port)), timeout=max(0.1, min(5.0, deadline - time.monotonic()))
            ).close()
            return
        except OSError as err:
            reason = err.strerror or str(err)
        if time.monotonic() >= deadline:
            raise DistributedError(
                f"nothing answers at the Ray cluster address {address!r} after {timeout_s:g} s ({reason}); start it "
                "(`ray start --head`) or fix distributed.address (distributed.connect_timeout_s sets the wait)"
            )
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def connect(dist: DistributedConfig) -> None:
    """Start a small local Ray instance (address null) or join a running cluster within distributed.connect_timeout_s;
    once per process."""
    if dist.address not in (None, "auto"):
        _wait_for(dist.address, dist.connect_timeout_s)
    ray = _ray()
    if ray.is_initialized():
        return
    try:
        if dist.address is None:  # "local": never join a cluster someone else started on this machine
            ray.init(
                address="local",
                num_cpus=dist.workers * dist.cpus_per_worker,
                object_store_memory=OBJECT_STORE_BYTES,
                include_dashboard=False,
                log_to_driver=False,
            )
        else:
            ray.init(address=dist.address, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as err:
        where = (
            "start a local Ray instance" if dist.address is None else f"connect to the Ray cluster at {dist.address!r}"
        )
        raise DistributedError(
            f"cannot {where}: {err}; on the head machine run `ray start --head`, on the others "
            "`ray start --address=<head>:6379`, then use distributed.address: auto"
        ) from None


@dataclass
class _Slot:
    """One worker position: its current actor, the replay that makes it usable, and this epoch's figures."""

    index: int
    actor: Any
    ready: Any = None  # the pending advance() (startup replay or epoch step) whose digests are still to be checked
    identity: Any = None  # the pending identity() of a new actor
    busy: bool = False
    restarts: int = 0
    members: int = 0
    seconds: float = 0.0
    update_seconds: float = 0.0


class WorkerPool:
    """distributed.workers actors evaluating member batches; their weights checked against the driver's every epoch."""

    def __init__(
        self,
        cfg: Config,
        task_ids: list[str],
        k: int,
        identity: dict,
        history: list[dict],
        weights: dict[str, torch.Tensor],
    ):
        connect(cfg.distributed)
        ray = self.ray = _ray()
        dist, cuda = cfg.distributed, next(iter(weights.values())).device.type == "cuda"
        need = {
            "CPU": dist.workers * dist.cpus_per_worker,
            **({"GPU": dist.workers * dist.gpus_per_worker} if cuda else {}),
        }
        have = ray.cluster_resources()
        short = [f"{need[r]:g} {r} (the cluster has {have.get(r, 0):g})" for r in need if have.get(r, 0) < need[r]]
        if short:
            raise DistributedError(
                f"distributed.workers {dist.workers} need {', '.join(short)}: lower distributed.workers "
                "or the per-worker CPUs/GPUs, or add machines to the cluster"
            )
        paths = [
            str(Path(str(m.__file__)).resolve().parents[1]) for m in (ERO_EGGROLL, hyperscalees)
        ]  # this checkout, not an installed copy
        env = {"PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.actor_class = ray.remote(PopulationWorker).options(
            num_cpus=dist.cpus_per_worker,
            num_gpus=dist.gpus_per_worker if cuda else 0,
            max_restarts=0,
            runtime_env={"env_vars": env},
        )
        self.args = (cfg.to_dict(), task_ids, k)
        self.cfg, self.k, self.identity = cfg, k, identity
        self.rows = [{f: r[f] for f in REPLAYED if f in r} for r in history]
        self.expected = self._driver_digests(weights, len(history) - 1)
        self.slots = [self._start(_Slot(i, None)) for i in range(dist.workers)]

    @staticmethod
    def _driver_digests(weights: dict[str, torch.Tensor], epoch: int) -> tuple[int, dict[str, str]]:
        return epoch, tensor_digests(weights)

    def _start(self, slot: _Slot) -> _Slot:
        """A (new) actor for `slot`: it loads the model, then replays the driver's history; its identity is checked."""
        slot.actor = self.actor_class.remote(*self.args, slot.index, slot.restarts)
        slot.identity, slot.ready, slot.busy = slot.actor.identity.remote(), slot.actor.advance.remote(self.rows), False
        return slot

    def _lost(self, slot: _Slot, err: Exception, epoch: int) -> None:
        """A worker's process is gone (`epoch`: 1-based, the one running): start a replacement, or give up."""
        slot.restarts += 1
        if slot.restarts > MAX_RESTARTS:
            raise DistributedError(
                f"worker {slot.index} died {slot.restarts} times (last in epoch {epoch}); the last error: {err}"
            )
        print(
            f"worker {slot.index} lost in epoch {epoch}; its batch goes to the others and a replacement replays "
            f"{len(self.rows)} recorded epoch(s)",
            file=sys.stderr,
        )
        self.ray.kill(slot.actor)  # an unreachable but living actor must free its CPUs/GPU for the replacement
        self._start(slot)

    def _settle(self, slot: _Slot, ref, epoch: int) -> None:
        """The slot's replay finished: its identity and digests must equal the driver's, or the run stops."""
        ray = self.ray
        try:
            if slot.identity is not None:
                check_identity(
                    self.identity, ray.get(slot.identity), f"worker {slot.index}", "evaluate members for this run"
                )
                slot.identity = None
            digests, seconds = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            return self._lost(slot, err, epoch)
        slot.ready, slot.update_seconds = None, slot.update_seconds + seconds
        at, expected = self.expected
        for name, digest in expected.items():
            if digests.get(name) != digest:
                raise DistributedError(
                    f"worker {slot.index} disagrees with the driver after epoch {at}: tensor {name} has digest "
                    f"{digests.get(name)}, the driver's is {digest}; the workers must compute the update on "
                    "the same device type and library versions as the driver"
                )

    def evaluate(self, epoch: int, stop: StopFlag) -> list[float]:
        """Every member's fitness of `epoch`, in member order, batches handed to whichever worker is free."""
        ray, n = self.ray, self.cfg.evolution.population_size
        queue = deque(member_batches(n, self.k))
        running: dict[Any, tuple[_Slot, list[int]]] = {}  # Ray object refs of member batches in flight
        fitness: dict[int, float] = {}
        progress = MemberProgress(epoch, n, stop)
        for slot in self.slots:
            slot.members, slot.seconds, slot.update_seconds = 0, 0.0, 0.0
        while queue or running:
            for slot in self.slots:
                if queue and slot.ready is None and not slot.busy:
                    ids = queue.popleft()
                    running[slot.actor.evaluate.remote(epoch, ids)], slot.busy = (slot, ids), True
            readies = {slot.ready: slot for slot in self.slots if slot.ready is not None}
            (ref,), _ = ray.wait([*running, *readies], num_returns=1)
            if ref in readies:
                self._settle(readies[ref], ref, epoch + 1)
                continue
            slot, ids = running.pop(ref)
            slot.busy = False
            try:
                values, seconds = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                queue.appendleft(ids)
                self._lost(slot, err, epoch + 1)
                continue
            fitness.update(zip(ids, values))
            slot.members, slot.seconds = slot.members + len(ids), slot.seconds + seconds
            progress.gathered(values)
        progress.close()
        return [fitness[i] for i in range(n)]

    def _settle_all(self, epoch: int) -> None:
        while pending := {slot.ready: slot for slot in self.slots if slot.ready is not None}:
            (ref,), _ = self.ray.wait(list(pending), num_returns=1)
            self._settle(pending[ref], ref, epoch)

    def advance(self, row: dict, weights: dict[str, torch.Tensor]) -> list[dict]:
        """Every worker applies the driver's newest row (epoch step) and proves its weights equal `weights`, the
        driver's after that row. Returns the epoch's per-worker figures for the metrics."""
        self._settle_all(row["epoch"])  # startup replays and replacements first: they replay the rows before this one
        self.rows.append({f: row[f] for f in REPLAYED if f in row})
        for slot in self.slots:
            slot.ready = slot.actor.advance.remote(self.rows[-1:])
        self.expected = self._driver_digests(weights, row["epoch"])  # computed while the workers update
        self._settle_all(row["epoch"])
        return [
            {
                "worker": s.index,
                "members": s.members,
                "seconds": round(s.seconds, 3),
                "update_seconds": round(s.update_seconds, 3),
                "restarts": s.restarts,
            }
            for s in self.slots
        ]

    def close(self) -> None:
        """End this evolution's actors (per_task mode starts new ones per task); Ray itself ends with the process."""
        for slot in self.slots:
            self.ray.kill(slot.actor)
