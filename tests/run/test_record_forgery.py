"""A run record that cannot be forged: each edit of a recorded run is refused by `replay --check` and by resume with
one line naming the field and the epoch, re-sealed forgeries of what replay recomputes too; a record written before
seals is read with one note; an ERO run that stops on its target publishes the elite that reached it.

Recorded runs, tampered copies: the suite's shared replay-mode `reference` run (EGGROLL, 2 epochs) and one ERO run
(full-rank noise, run.checkpoint: full) that stops after epoch 1 on its best elite (run.target_fitness 0)."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import in_process, run_args, run_module, run_script
from safetensors.torch import load_file
from test_evolution_run import SCRIPT

from ERO_EGGROLL.config import config_from_dict
from ERO_EGGROLL.core.digest import tensor_digest
from ERO_EGGROLL.evaluation.divergence import epoch_signs
from ERO_EGGROLL.model.qwen import run_perturber
from ERO_EGGROLL.run.record import ClonedBest, ReplayedBest
from ERO_EGGROLL.run.resume import resume
from ERO_EGGROLL.storage.checkpoints import OPTIMIZER_FILE, CheckpointError, _save_tensors, read_state
from ERO_EGGROLL.storage.record_check import stopped_elite
from ERO_EGGROLL.storage.record_fields import ROW_FIELDS, STATE_FIELDS, seal_of

ERO = [
    "evolution.search=ero",
    "evolution.antithetic=false",
    "evolution.elites=2",
    "evolution.reset_after=1",
    "evolution.noise=full",
    "evolution.strategy=inplace",
    "evolution.lr=1.0",
    "evolution.population_size=2",
    "evolution.epochs=3",
    "evaluation.max_new_tokens_cap=16",
    "run.target_fitness=0.0",  # any elite reaches it: the run stops after epoch 1, on its best elite
    "run.checkpoint=full",
    "run.degeneration_patience=0",
]


@pytest.fixture(scope="module")
def ero_run(tmp_path_factory, tiny_model_dir) -> Path:
    tmp = tmp_path_factory.mktemp("ero_run")
    code, _, err = in_process(run_args(tmp, "ero", *ERO))
    assert code == 0, err[-3000:]
    return tmp


def copied(runs: Path, name: str, tmp: Path) -> Path:
    """A copy of the run `name`'s checkpoint folder to tamper with."""
    shutil.copytree(runs / "checkpoints" / name, tmp / name, symlinks=True)
    return tmp / name


def edit_state(folder: Path, change: Callable[[dict], object], reseal: bool = False) -> None:
    """Apply `change` to the newest state.json of `folder`; `reseal`: as a user who reruns the sealing code."""
    path = folder / (folder / "LATEST").read_text().strip() / "state.json"
    data = json.loads(path.read_text())
    change(data)
    if reseal:
        data["seal"] = seal_of(data)
    path.write_text(json.dumps(data))


def replay_refuses(folder: Path, message: str, *args: str) -> None:
    code, out, err = run_module("ERO_EGGROLL.replay", str(folder), "--check", *args)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, out + err


def resume_refuses(folder: Path, message: str, tiny) -> None:
    """run/resume.resume (what the training script's --resume runs) on a copy of the model."""
    state = read_state(folder / (folder / "LATEST").read_text().strip())
    cfg = config_from_dict(state.config, "test")
    perturber = run_perturber(copy.deepcopy(tiny[0]), cfg)
    best = (
        ReplayedBest(cfg.resolve_path(cfg.model.path), folder, cfg.run.degeneration_patience)
        if cfg.run.checkpoint == "replay"
        else ClonedBest()
    )
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("(", r"\(")):
        resume(cfg, perturber, state.identity, folder, folder, best)


def row(epoch: int, **values) -> Callable[[dict], object]:
    return lambda data: data["history"][epoch].update(values)


def scaled(epoch: int, field: str) -> Callable[[dict], object]:
    return lambda data: data["history"][epoch].update({field: data["history"][epoch][field] * 2 + 1e-3})


def member_fitness_changed(data: dict) -> None:
    """A forger's edit of one member's fitness that keeps the members' mean, max, min and signal signs consistent with
    it."""
    r = data["history"][1]
    r["fitness"][0] += 0.25
    f = r["fitness"]
    r.update(member_mean=sum(f) / len(f), member_max=max(f), member_min=min(f))
    r.update(epoch_signs(r, data["history"][0], data["config"]["evaluation"]["fitness"]))


REFERENCE_EDITS = [  # (edit, re-sealed, the one line's words)
    (row(1, mean_model_test_score=5.0), False, "epoch 1: mean_model_test_score does not match the record's seal"),
    (row(1, mean_model_cell_accuracy=1.0), False, "epoch 1: mean_model_cell_accuracy does not match"),
    (row(2, mean_model_exact=7.0), False, "epoch 2: mean_model_exact does not match"),
    (scaled(1, "member_mean"), True, "epoch 1: member_mean is"),
    (scaled(2, "member_max"), True, "epoch 2: member_max is"),
    (scaled(1, "lr"), False, "epoch 1: lr does not match the record's seal"),
    (scaled(1, "lr"), True, "epoch 1: the saved history records lr"),
    (scaled(2, "update_norm"), True, "epoch 2: the saved history records update_norm"),
    (scaled(1, "sigma_scale"), True, "epoch 1: the saved history records sigma_scale"),
    (scaled(2, "fraction_changed"), True, "epoch 2: the saved history records fraction_changed"),
    (lambda d: d["weight_digests"].__setitem__(0, "0" * 32), False, "epoch 0: weight_digests[0] does not match"),
    (lambda d: d["weight_digests"].__setitem__(1, "0" * 32), True, "epoch 1: the weights rebuilt by replay do not"),
    (lambda d: d["tensor_digests"].update({next(iter(d["tensor_digests"])): "0" * 32}), True, "epoch 2: tensor_dig"),
    (member_fitness_changed, True, "epoch 1: the saved history records update_norm"),  # the update moved
]


@pytest.mark.parametrize("edit,reseal,message", REFERENCE_EDITS)
def test_an_edited_replay_record_is_refused_by_replay_and_resume(reference, tmp_path, tiny, edit, reseal, message):
    folder = copied(reference, "reference", tmp_path)
    edit_state(folder, edit, reseal)
    replay_refuses(folder, message)
    resume_refuses(folder, message, tiny)


ERO_EDITS = [
    (lambda d: d["history"][1].pop("elites"), True, "epoch 1: ERO's decision field elites is missing"),
    (lambda d: d["history"][1].pop("reset_to_base"), True, "epoch 1: ERO's decision field reset_to_base is missing"),
    (row(1, degeneration_counter=3), False, "epoch 1: degeneration_counter does not match the record's seal"),
    (row(1, degeneration_counter=3), True, "degeneration_counter"),  # replay: ERO's recomputed; resume: saved state
    (lambda d: d.update(optimizer_step=7), False, "optimizer_step is 7, epoch 1 gives 1"),
    (lambda d: d.update(optimizer_step=7), True, "optimizer_step is 7, epoch 1 gives 1"),
]


@pytest.mark.parametrize("edit,reseal,message", ERO_EDITS)
def test_an_edited_full_record_is_refused_by_replay_and_resume(ero_run, tmp_path, tiny, edit, reseal, message):
    folder = copied(ero_run, "ero", tmp_path)
    edit_state(folder, edit, reseal)
    replay_refuses(folder, message)
    resume_refuses(folder, message, tiny)


def test_an_edited_optimizer_state_is_refused_by_resume_before_it_is_used(ero_run, tmp_path, tiny):
    """The optimizer file rewritten whole (its own hashes valid): only the record's optimizer_digest can tell."""
    folder = copied(ero_run, "ero", tmp_path)
    path = folder / "epoch_0001" / OPTIMIZER_FILE
    tensors = load_file(path)
    tensors["ero/counter_resets"] = tensors["ero/counter_resets"] + 1
    _save_tensors(tensors, path)
    message = "epoch 1: the optimizer state in optimizer.safetensors does not match the run record's optimizer_digest"
    resume_refuses(folder, message, tiny)
    code, out, err = run_script(
        SCRIPT,
        "--resume",
        str(folder),
        "--set",
        f"run.checkpoint_dir={tmp_path}",
        "--set",
        f"run.output_dir={tmp_path / 'results'}",
    )
    assert code == 2 and message in err and "Traceback" not in err, out + err


def test_forged_test_scores_pass_a_reseal_but_not_replay_check_full(reference, tmp_path):
    folder = copied(reference, "reference", tmp_path)
    code, out, err = run_module("ERO_EGGROLL.replay", str(folder), "--check", "--full")
    assert code == 0 and "every epoch's mean model scored again as recorded (3 evaluations)" in out, out + err
    edit_state(folder, row(0, mean_model_test_score=5.0), reseal=True)
    assert run_module("ERO_EGGROLL.replay", str(folder), "--check")[0] == 0  # a re-sealed forgery: only --full can tell
    replay_refuses(folder, "epoch 0: mean_model_test_score is 5.0, the mean model scores", "--full")


def test_a_record_written_before_seals_is_read_with_one_note(reference, tmp_path):
    folder = copied(reference, "reference", tmp_path)
    edit_state(folder, lambda d: [d.pop("seal"), d.pop("optimizer_digest")])
    code, out, err = run_module("ERO_EGGROLL.replay", str(folder), "--check")
    assert code == 0 and "bit-identical to the run record's digest of epoch 2" in out, out + err
    notes = [line for line in err.splitlines() if "written before records were sealed" in line]
    assert len(notes) == 1 and "mean_model_test_score" in notes[0], err


def test_every_recorded_field_is_in_the_table(reference, ero_run):
    """A field that a change adds to the record must get its line in storage/record_fields.py (and the docs)."""
    for runs, name in ((reference, "reference"), (ero_run, "ero")):
        data = json.loads((runs / "checkpoints" / name / "epoch_0001" / "state.json").read_text())
        assert set(data) <= set(STATE_FIELDS), set(data) - set(STATE_FIELDS)
        for r in data["history"]:
            assert set(r) <= set(ROW_FIELDS), set(r) - set(ROW_FIELDS)


def safetensors_digests(path: Path) -> set[str]:
    return {tensor_digest(t) for t in load_file(path).values()}


def test_an_ero_run_stopped_on_its_target_publishes_the_elite_that_reached_it(ero_run, tmp_path):
    ckpt = ero_run / "checkpoints" / "ero"
    state = read_state(ckpt / "epoch_0001")
    elite = stopped_elite(state, config_from_dict(state.config, "test"))
    assert elite is not None and elite.epoch == 1 and state.epoch == 1  # stopped at once, 2 epochs early
    # the exported weights are the elite's, not the mean model's: the final table scores what the elite scored
    table = (ero_run / "results" / "ero" / "final_table.csv").read_text().splitlines()
    assert float(table[1].split(",")[2]) == pytest.approx(elite.fitness, abs=1e-9), table
    logprob = float(table[1].split(",")[5])  # the tiny model's members may tie on char similarity, never on this
    assert all(abs(r["mean_model_answer_logprob"] - logprob) > 1e-6 for r in state.history), table
    mean_model = load_file(ckpt / "epoch_0001" / "evolvable.safetensors")
    assert not {tensor_digest(t) for t in mean_model.values()} <= safetensors_digests(
        ckpt / "best_model" / "model.safetensors"
    )
    card = (ckpt / "best_model" / "README.md").read_text()
    assert f"ERO's best elite: member {elite.member} of epoch 1's population" in card
    assert "ERO's search (round-robin elites of 2 groups" in card and "full-rank Gaussian noise" in card
    assert "low-rank" not in card and "rank 2" not in card
    # regenerable from the record alone, in another command
    code, out, err = run_module("ERO_EGGROLL.replay", str(ckpt), "--export", str(tmp_path / "export"))
    assert code == 0 and f"exported ERO's best elite (member {elite.member} of epoch 1)" in out, out + err
    assert safetensors_digests(tmp_path / "export" / "model.safetensors") == safetensors_digests(
        ckpt / "best_model" / "model.safetensors"
    )
