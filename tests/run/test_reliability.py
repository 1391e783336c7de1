"""Bad input and faults: a clear error, a non-zero exit, no traceback, nothing saved lost."""

import copy
import errno
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import run_module, small_config, write_config

from ERO_EGGROLL.arc.tasks import load_tasks
from ERO_EGGROLL.config import ROOT, ConfigError, load_config
from ERO_EGGROLL.evaluation import evaluator as arc_evaluator
from ERO_EGGROLL.evaluation.evaluator import EvaluationError, evaluate, prepare, questions_for
from ERO_EGGROLL.io.disk import WriteError
from ERO_EGGROLL.model.qwen import run_perturber
from ERO_EGGROLL.storage import checkpoints as checkpointing
from ERO_EGGROLL.storage.checkpoints import CheckpointError, RunState, load_checkpoint, save_checkpoint

SCRIPT = ROOT / "ERO_EGGROLL" / "arc_evolution_single_gpu.py"


@pytest.fixture
def setup(tiny):
    model, processor = tiny
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["data.task_ids=[e6de6e8f]"])
    prepared = prepare(questions_for(load_tasks(ids=cfg.data.task_ids), cfg, "fitness"), processor, cfg)
    return copy.deepcopy(model), processor, cfg, prepared


def test_a_model_that_answers_nothing_scores_zero(setup, monkeypatch):
    model, processor, cfg, prepared = setup
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    monkeypatch.setattr(
        model, "generate", lambda input_ids, **kw: torch.cat([input_ids, torch.full((input_ids.shape[0], 3), end)], 1)
    )
    result = evaluate(model, processor, prepared, cfg)
    assert result.fitness == 0.0 and all(a.text == "" and a.new_tokens == 0 for a in result.answers)


def test_out_of_memory_says_what_to_lower(setup, monkeypatch):
    model, processor, cfg, prepared = setup

    def oom(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model, "generate", oom)
    with pytest.raises(EvaluationError, match="lower members_per_batch first.*batch_size.*max_new_tokens_cap"):
        evaluate(model, processor, prepared, cfg)


def test_a_nan_fitness_is_refused_before_it_reaches_the_weights(setup, monkeypatch):
    model, processor, cfg, prepared = setup
    monkeypatch.setitem(arc_evaluator.METRICS, "char_similarity", lambda text, target: math.nan)
    with pytest.raises(EvaluationError, match="returned nan for task e6de6e8f; a fitness must be a finite float"):
        evaluate(model, processor, prepared, cfg)


def test_all_equal_fitness_gives_a_zero_update(tiny):
    model = copy.deepcopy(tiny[0])
    before = {n: p.clone() for n, p in model.named_parameters()}
    stats = run_perturber(model, small_config(sigma=0.5, sigma_mode="relative")).update([0.3] * 4, epoch=0)
    assert stats["update_norm"] == 0.0 and stats["fraction_changed"] == 0.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failing_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, code):
    weights = {"w": torch.ones(3)}
    save_checkpoint(tmp_path, weights, {}, RunState(epoch=1), keep=False, best=False)

    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpointing, "save_file", failing)
    with pytest.raises(
        WriteError,
        match=f"could not write {tmp_path / 'epoch_0002'}: {os.strerror(code)} .*previous checkpoint is intact",
    ):
        save_checkpoint(tmp_path, {"w": torch.zeros(3)}, {}, RunState(epoch=2), keep=False, best=False)
    saved, _, state = load_checkpoint(tmp_path)
    assert state.epoch == 1 and torch.equal(saved["w"], torch.ones(3))
    assert not list(tmp_path.glob(".epoch_0002*"))  # no half-written directory left behind


def test_a_truncated_checkpoint_is_reported(tmp_path):
    save_checkpoint(tmp_path, {"w": torch.ones(1000)}, {}, RunState(epoch=1), keep=False, best=False)
    weights_file = tmp_path / "epoch_0001" / "evolvable.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path)


def test_run_name_cannot_escape_the_output_directory(tmp_path):
    with pytest.raises(ConfigError, match="must be a plain name"):
        load_config(write_config(tmp_path, "run:\n  name: ../../elsewhere\n"))


def test_the_training_script_by_its_path_exits_2_with_one_line():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", "configs/nope.yaml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config", "configs/smoke.yaml", "--set", "evolution.population_size=5"], "population_size must be even"),
        (["--config", "configs/smoke.yaml", "--set", "data.task_ids=[zzzz]"], "unknown task id 'zzzz'"),
        (
            ["--config", "configs/smoke.yaml", "--set", "model.path=/no/such/model"],
            "does not exist; put a Qwen2.5-VL checkpoint there",
        ),
        (["--resume", "/no/such/run"], "holds no checkpoint"),
    ],
)
def test_training_script_bad_input_exits_2_with_one_line(args, message, tiny_model_dir, monkeypatch, capsys):
    """The script's own main, in this process (the subprocess above covers running it by its path)."""
    from ERO_EGGROLL.cli.train import main

    monkeypatch.chdir(ROOT)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err


def test_doctor_reports_every_check(tiny_model_dir):
    code, out, err = run_module("ERO_EGGROLL.doctor", "--config", str(ROOT / "configs" / "smoke.yaml"))
    assert code == 0, out + err
    for check in ("versions", "devices", "DLPack: zero-copy both ways", "model", "ARC data", "memory"):
        assert f"] {check}" in out


def test_save_every_keeps_marked_epochs_and_the_latest(tmp_path):
    for epoch in range(1, 6):
        save_checkpoint(
            tmp_path,
            {"w": torch.full((2,), float(epoch))},
            {},
            RunState(epoch=epoch),
            keep=epoch % 2 == 0,
            best=epoch == 3,
        )
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "LATEST",
        "best",
        "epoch_0002",
        "epoch_0004",
        "epoch_0005",
    ]
    assert load_checkpoint(tmp_path)[2].epoch == 5 and load_checkpoint(tmp_path / "best")[2].epoch == 3
