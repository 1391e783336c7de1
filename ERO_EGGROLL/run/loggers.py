"""Optional reporting of each epoch to TensorBoard and Weights & Biases, beside metrics.jsonl (run.loggers).

Each logger receives the scalars metrics.jsonl holds for an epoch, the population's fitness as a
histogram, and once the run's resolved config. Off by default (`run.loggers: []`); a logger whose
package is missing stops the run before the model loads, naming what to install.

W&B runs offline unless WANDB_MODE says otherwise, so no account or network is ever needed; the run
lands in results/<run>/wandb/ and `wandb sync` uploads it later. A resumed run is a new W&B run of the
same group (the run's name) holding the later epochs; TensorBoard adds an event file to the same folder.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import yaml

from ERO_EGGROLL.config import ConfigError

# what to install for each logger (the versions pinned in requirements.txt)
PACKAGES = {"tensorboard": "tensorboard==2.21.0", "wandb": "wandb==0.31.0"}
WANDB_PROJECT = "ero_eggroll"


def check_available(names: list[str]) -> None:
    """Refuse, before any model time is spent, a logger whose package is not installed."""
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"run.loggers names {', '.join(missing)}, but the package is not installed here: "
                          f"pip install {' '.join(PACKAGES[m] for m in missing)} (pinned in requirements.txt), "
                          "or remove it from run.loggers")


def epoch_scalars(row: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl row (flags as 0/1); non-finite values are left out, as metrics.jsonl nulls them."""
    out = {}
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


class TensorBoardLogger:
    def __init__(self, run_dir: Path, config: dict, name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        text = "    " + yaml.safe_dump(config, sort_keys=False).replace("\n", "\n    ")  # indented: Markdown shows it verbatim
        self.writer.add_text("config", text, global_step=0)

    def log(self, row: dict) -> None:
        for key, value in epoch_scalars(row).items():
            self.writer.add_scalar(key, value, global_step=row["epoch"])
        if row.get("fitness"):
            import numpy as np

            self.writer.add_histogram("population/fitness", np.asarray(row["fitness"], dtype=np.float64), global_step=row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: Path, config: dict, name: str):
        import wandb

        self.wandb = wandb
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=WANDB_PROJECT, name=name, group=name, dir=str(run_dir), config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"),
                              settings=wandb.Settings(console="off", silent=True))  # our own lines stay as printed

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

    def __init__(self, names: list[str], run_dir: Path, config: dict, name: str):
        self.names, self.args, self.loggers = names, (run_dir, config, name), []

    def log(self, row: dict) -> None:
        if self.names and not self.loggers:
            self.loggers = [LOGGERS[n](*self.args) for n in self.names]
        for logger in self.loggers:
            logger.log(row)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
