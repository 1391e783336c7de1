"""Optional reporting of each epoch to TensorBoard and Weights & Biases, beside metrics.jsonl (run.loggers).

Each logger receives the scalars metrics.jsonl holds for an epoch, the population's fitness as a
histogram, and once the run's resolved config. Off by default (`run.loggers: []`); a logger whose
package is missing or does not import, or whose folder cannot be written, stops the run before the model
loads, naming what to do; one that fails later is switched off with one warning and the run goes on.

W&B runs offline unless WANDB_MODE says otherwise, so no account or network is ever needed; the run
lands in results/<run>/wandb/ and `wandb sync` uploads it later. A resumed run is a new W&B run of the
same group (the run's name) holding the later epochs; TensorBoard adds an event file to the same folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ERO_EGGROLL.config import ConfigError

# what to install for each logger (the versions pinned in requirements.txt)
PACKAGES = {"tensorboard": "tensorboard==2.21.0", "wandb": "wandb==0.31.0"}
WANDB_PROJECT = "ero_eggroll"


# the module each logger imports, and the folder it writes under the run's results folder
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}
FOLDERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _unwritable(folder: Path) -> str | None:
    """Why nothing could be written in `folder` (made if missing), or None: tried with a temporary file."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        return f"{existing} is not writable ({err.strerror or err})"
    return None


def check_available(names: Sequence[str], run_dir: Path | None = None) -> None:
    """Refuse, before any model time is spent, a logger whose package is not installed or does not import, or whose
    folder under `run_dir` cannot be written."""
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"run.loggers names {', '.join(missing)}, but the package is not installed here: pip install "
            f"{' '.join(PACKAGES[m] for m in missing)} (pinned in requirements.txt), or remove it from run.loggers"
        )
    for name in names:
        try:
            importlib.import_module(MODULES[name])
        except Exception as err:  # a broken install fails in many ways; each is the same answer to the user
            raise ConfigError(
                f"run.loggers names {name}, but it does not import here ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); reinstall {PACKAGES[name]} or remove it "
                "from run.loggers"
            ) from None
        if run_dir is None:
            continue
        problem = _unwritable(run_dir / FOLDERS[name])
        if problem:
            raise ConfigError(
                f"run.loggers names {name}, but its folder {run_dir / FOLDERS[name]} cannot be written: {problem}; "
                "fix it or remove the logger from run.loggers"
            )


def epoch_scalars(row: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl row (flags as 0/1); non-finite values are left out, as metrics.jsonl nulls
    them."""
    out = {}
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


class TensorBoardLogger:
    def __init__(self, run_dir: Path, config: dict, name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        text = "    " + yaml.safe_dump(config, sort_keys=False).replace(
            "\n", "\n    "
        )  # indented: Markdown shows it verbatim
        self.writer.add_text("config", text, global_step=0)

    def log(self, row: dict) -> None:
        for key, value in epoch_scalars(row).items():
            self.writer.add_scalar(key, value, global_step=row["epoch"])
        if row.get("fitness"):
            import numpy as np

            self.writer.add_histogram(
                "population/fitness", np.asarray(row["fitness"], dtype=np.float64), global_step=row["epoch"]
            )
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: Path, config: dict, name: str):
        import wandb

        self.wandb = wandb
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=WANDB_PROJECT,
            name=name,
            group=name,
            dir=str(run_dir),
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]  # a user may set any mode wandb knows
            settings=wandb.Settings(console="off", silent=True),
        )  # our own lines stay as printed

    def log(self, row: dict) -> None:
        values: dict = dict(epoch_scalars(row))
        if row.get("fitness"):
            values["population/fitness"] = self.wandb.Histogram(row["fitness"])
        self.run.log(values, step=row["epoch"])

    def close(self) -> None:
        self.run.finish()


LOGGERS = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}


class Loggers:
    """The configured loggers as one: log(row) per epoch, close() at the end. Empty (and free) by default.

    Each opens at the first row, so resuming a finished run leaves no empty W&B run or event file."""

    def __init__(self, names: Sequence[str], run_dir: Path, config: dict, name: str):
        self.loggers: dict[str, Any] = {}
        self.names, self.args, self.opened = list(names), (run_dir, config, name), False

    def log(self, row: dict) -> None:
        if not self.opened:
            self.opened = True
            for name in self.names:
                logger = self._guarded(name, lambda name=name: LOGGERS[name](*self.args))
                if logger is not None:
                    self.loggers[name] = logger
        for name, logger in list(self.loggers.items()):
            if not self._guarded(name, lambda logger=logger: logger.log(row) or True):
                del self.loggers[name]

    def close(self) -> None:
        for name, logger in self.loggers.items():
            self._guarded(name, logger.close)
        self.loggers = {}

    @staticmethod
    def _guarded(name: str, call):
        """`call()`, or None with one warning when it fails: a logger is a report, and the run goes on without it."""
        try:
            return call()
        except Exception as err:  # TensorBoard and W&B fail in many ways; the run's own metrics are on disk
            print(
                f"warning: logger {name} failed ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); "
                "it is switched off for the rest of the run (metrics.jsonl has every number)",
                file=sys.stderr,
            )
            return None
