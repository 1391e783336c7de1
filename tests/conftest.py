"""Shared fixtures: the embedded tiny model (built once if missing) and small configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ERO_EGGROLL.config import ROOT, Config, load_config


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded default model, built exactly as `make run` builds it when it is missing."""
    from ERO_EGGROLL.arc_evolution_single_gpu import ensure_model

    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    ensure_model(cfg)
    return cfg.resolve_path(cfg.model.path)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, processor) of the tiny model in fp32 on the CPU; tests must leave its weights as they found them."""
    from ERO_EGGROLL.model_loading import load_model_from_dir

    return load_model_from_dir(tiny_model_dir)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def small_config(**evolution) -> Config:
    cfg = Config()
    cfg.evolution.population_size = evolution.pop("population_size", 4)
    for key, value in evolution.items():
        setattr(cfg.evolution, key, value)
    return cfg
