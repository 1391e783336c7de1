"""Test-only fault injection for the product's own processes: the training script, its Ray workers.

A test puts this folder first on PYTHONPATH, so that every Python process started with that environment imports this
module at start-up, and names a file of faults in EGGROLL_TEST_FAULTS (read when a patched class is used, so a test
may write it after the processes started). Nothing happens without that variable. The product knows nothing of it:
the faults are wrapped around its functions here, after each module is imported. One fault a line:

    slow_write NAME SECONDS   sleep inside the write of checkpoint directory NAME, after its tensors are written and
                              before it is complete (so that a test can kill -9 the process there)
    exit WORKER N             worker slot WORKER's first process exits when asked for a batch after N members
                              (a lost machine, mid-epoch); its replacement runs normally
    drift WORKER N            after the epoch-N step, worker slot WORKER's first process moves one weight by one ulp
    worse N                   every member of (recorded) epoch N scores 0, the lowest char similarity, on every worker
                              (ERO's search then resets to the base there, whatever the model's build makes of its
                              members)
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import time

FAULTS_ENV = "EGGROLL_TEST_FAULTS"


def _faults(kind: str) -> list[list[str]]:
    path = os.environ.get(FAULTS_ENV)
    if not path or not os.path.exists(path):
        return []
    with open(path) as handle:
        return [line.split()[1:] for line in handle if line.split()[:1] == [kind]]


def _patch_checkpoints(module) -> None:
    original = module._save_tensors

    def save_tensors(tensors, path):
        original(tensors, path)
        for name, seconds in _faults("slow_write"):
            if path.name == module.OPTIMIZER_FILE and path.parent.name.startswith(f".{name}."):
                time.sleep(float(seconds))

    module._save_tensors = save_tensors


def _patch_worker(module) -> None:
    import torch

    cls = module.PopulationWorker
    init, evaluate = cls.__init__, cls.evaluate

    def patched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        first = self.incarnation == 0
        mine = {k: int(n) for k in ("exit", "drift") for w, n in _faults(k) if first and int(w) == self.slot}
        self._faults, self._members_done = mine, 0
        if "drift" in mine:
            apply = self.step.apply

            def apply_then_drift(row):
                out = apply(row)
                if row["epoch"] == mine["drift"]:
                    with torch.no_grad():
                        flat = next(iter(self.perturber.params.values())).view(-1)
                        flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=flat.dtype))
                return out

            self.step.apply = apply_then_drift

    def patched_evaluate(self, epoch, ids):
        if "exit" in self._faults and self._members_done >= self._faults["exit"]:
            os._exit(1)
        self._members_done += len(ids)
        fitness, seconds = evaluate(self, epoch, ids)
        if [str(epoch + 1)] in _faults("worse"):  # the worker is given the noise epoch, one below the recorded one
            fitness = [0.0] * len(fitness)
        return fitness, seconds

    cls.__init__, cls.evaluate = patched_init, patched_evaluate


PATCHES = {"ERO_EGGROLL.storage.checkpoints": _patch_checkpoints, "ERO_EGGROLL.run.worker": _patch_worker}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds the patched modules as the other finders would, and applies the patch once the module has run."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None and spec.loader is not None:
                run = spec.loader.exec_module

                def exec_module(module, run=run):
                    run(module)
                    PATCHES[name](module)

                spec.loader.exec_module = exec_module
                return spec
        return None


if os.environ.get(FAULTS_ENV):
    sys.meta_path.insert(0, _PatchAfterImport())
