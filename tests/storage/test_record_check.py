"""The run record is checked, not trusted: edited or damaged fields of state.json are refused by name (and epoch) on
load, by resume, replay and the evaluator, and a refused resume moves nothing. Synthetic records: no run needed."""

from __future__ import annotations

import copy
import json

import pytest

from ERO_EGGROLL.config import Config, ConfigError
from ERO_EGGROLL.run.resume import resume
from ERO_EGGROLL.storage.checkpoints import CheckpointError, RunState, read_latest_name, read_state, save_checkpoint
from ERO_EGGROLL.storage.record_check import check_record


def record(fitness: str = "char_similarity", epochs: int = 2) -> RunState:
    """A consistent record of a finished 2-epoch run: epoch 1 is the best, epoch 2 is not."""
    cfg = Config()
    cfg.evolution.epochs, cfg.evaluation.fitness = epochs, fitness
    values = [-2.0, -1.5, -1.8] if fitness == "answer_logprob" else [0.5, 0.6, 0.55]
    history = [{"epoch": 0, "mean_model_fitness": values[0], "new_best": True, "rolled_back": False}]
    history += [
        {
            "epoch": e,
            "fitness": [min(values), max(values)] * 16,
            "mean_model_fitness": values[e],
            "new_best": e == 1,
            "rolled_back": False,
        }
        for e in (1, 2)
    ]
    return RunState(
        epoch=2,
        identity={"seed": 0},
        config=cfg.to_dict(),
        history=history,
        best_fitness=values[1],
        best_epoch=1,
        epochs_since_best=1,
        optimizer_step=2,
        finished=True,
        weight_digests=["a", "b", "c"],
    )


def test_an_ero_run_that_stopped_on_its_best_elite_is_finished():
    """ERO's search stops when its best elite so far reaches the target, whatever the mean model scores."""
    state = record(epochs=5)
    state.config["evolution"]["search"], state.config["evolution"]["optimizer"] = "ero", "sgd"
    for row in state.history[1:]:
        row.update(elites=[1, 0], elite_best=0.6, best_elite_so_far=0.6, degeneration_counter=0, reset_to_base=False)
    state.history[2]["best_elite_so_far"] = 1.0
    check_record(state, "run")  # finished at epoch 2 of 5: the best elite reached run.target_fitness 1.0
    state.history[2]["best_elite_so_far"] = 0.9
    with pytest.raises(CheckpointError, match="finished is True"):
        check_record(state, "run")


def edited(change) -> RunState:
    state = record()
    change(state)
    return state


def test_a_consistent_record_passes():
    check_record(record(), "run")
    check_record(record("answer_logprob"), "run")


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: setattr(s, "best_epoch", 2), "best_epoch is 2, the history gives 1"),
        (lambda s: setattr(s, "best_fitness", 0.9), "best_fitness is 0.9, the history gives 0.6"),
        (lambda s: setattr(s, "finished", False), "finished is False"),
        (lambda s: s.history[2].update(new_best=True), "epoch 2: new_best is True, its fitness gives False"),
        (
            lambda s: s.history[1].update(mean_model_fitness=5.0),
            r"epoch 1: mean_model_fitness 5.0 is not a finite char_similarity",
        ),
        (lambda s: s.history[2]["fitness"].pop(), "epoch 2: fitness holds 31 value.s., the population is 32"),
        (lambda s: s.history[2]["fitness"].__setitem__(3, None), "epoch 2: fitness holds 31 finite"),
        (lambda s: s.history.pop(), "epoch is 2 but the history holds 2 row"),
    ],
)
def test_an_edited_record_is_refused_by_field_and_epoch(change, message):
    with pytest.raises(CheckpointError, match=message):
        check_record(edited(change), "run")


def test_an_impossible_log_prob_is_refused():
    """5.0 is no mean log-probability: refused, where it used to make a resumed run 'already finished'."""
    state = record("answer_logprob")
    state.history[2]["mean_model_fitness"] = 5.0
    with pytest.raises(
        CheckpointError, match=r"epoch 2: mean_model_fitness 5.0 is not a finite answer_logprob value in \[-inf, 0.0\]"
    ):
        check_record(state, "run")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("best_epoch", "1", "best_epoch must be an integer >= -1, got '1'"),
        ("finished", "yes", "finished must be true or false"),
        ("history", [1, 2], "history must be a list of objects"),
        ("sigma", {"w": None}, "sigma must be an object of numbers >= 0"),
    ],
)
def test_a_wrong_typed_field_is_refused_on_load(tmp_path, field, value, message):
    save_checkpoint(tmp_path / "run", {}, {}, record(), keep=True, best=False)
    path = tmp_path / "run" / "epoch_0002" / "state.json"
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"state.json: {message}"):
        read_state(path.parent)


def test_a_refused_rewind_moves_nothing(tmp_path):
    """--resume <run>/epoch_0001 with evolution.epochs below it:
    refused before later epochs, best_model/ or LATEST move."""
    run = tmp_path / "run"
    full = record()
    for epoch in range(3):
        state = copy.deepcopy(full)
        state.epoch, state.history, state.weight_digests = (
            epoch,
            full.history[: epoch + 1],
            full.weight_digests[: epoch + 1],
        )
        state.best_epoch, state.best_fitness = (0, 0.5) if epoch == 0 else (1, 0.6)
        state.epochs_since_best, state.finished, state.optimizer_step = int(epoch == 2), epoch == 2, epoch
        save_checkpoint(run, {}, {}, state, keep=True, best=False, store_tensors=False)
    (run / "best_model").mkdir()
    before = sorted(p.name for p in run.iterdir())
    cfg = Config()
    cfg.evolution.epochs = 0
    with pytest.raises(ConfigError, match="evolution.epochs 0 is less than the 1 epochs"):
        resume(cfg, None, {"seed": 0}, run, run / "epoch_0001", None)
    assert sorted(p.name for p in run.iterdir()) == before and read_latest_name(run) == "epoch_0002"
    check_record(read_state(run / "epoch_0001"), "epoch 1")


def test_replay_refuses_an_edited_best_epoch(tmp_path, capsys):
    from ERO_EGGROLL.cli import replay

    state = record()
    state.best_epoch = 2
    save_checkpoint(tmp_path / "run", {}, {}, state, keep=True, best=False, store_tensors=False)
    assert replay.main([str(tmp_path / "run"), "--export", str(tmp_path / "out")]) == 2
    assert "best_epoch is 2, the history gives 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_base_models_evaluation_never_finishes_a_run():
    """A run killed after epoch 0 whose base model already scores above run.target_fitness has not trained yet:
    resume (and the loop, and the record check) must call it unfinished."""
    from ERO_EGGROLL.config import EvolutionConfig
    from ERO_EGGROLL.storage.record_check import is_finished

    row = {"epoch": 0, "mean_model_fitness": 0.9, "new_best": True, "rolled_back": False}
    assert not is_finished(RunState(epoch=0, history=[row]), EvolutionConfig(epochs=5), target_fitness=0.5)
    assert is_finished(
        RunState(epoch=1, history=[row, {**row, "epoch": 1}]), EvolutionConfig(epochs=5), target_fitness=0.5
    )
