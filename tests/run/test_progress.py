"""Progress output: bars on a terminal, one summary line per epoch elsewhere (progress.py)."""

from __future__ import annotations

import contextlib
import io
from types import SimpleNamespace

from ERO_EGGROLL.config import Config
from ERO_EGGROLL.io.progress import bar, summary
from ERO_EGGROLL.run import population
from ERO_EGGROLL.run.stop_signals import StopFlag


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def epochs_as_the_script_runs_them(stream: io.StringIO, epochs: int = 3, members: int = 8) -> None:
    """The training loop's shape: an epoch bar, a member bar inside it, one summary line per epoch."""
    outer = bar(range(epochs), total=epochs, desc="run epochs", unit="epoch", stream=stream)
    for epoch in outer:
        inner = bar(total=members, desc=f"epoch {epoch + 1} members", unit="member", leave=False, stream=stream)
        for _ in range(members):
            inner.update(1)
            inner.set_postfix(fitness="0.500")
        inner.close()
        summary(f"epoch {epoch + 1}/{epochs}: mean model 0.5", stream)
        outer.set_postfix(best="0.500")


def test_not_a_terminal_one_line_per_epoch():
    out = io.StringIO()
    epochs_as_the_script_runs_them(out)
    assert out.getvalue().splitlines() == [f"epoch {e}/3: mean model 0.5" for e in (1, 2, 3)]


def test_a_terminal_gets_the_bars():
    out = Terminal()
    epochs_as_the_script_runs_them(out)
    text = out.getvalue()
    assert "epoch 2 members" in text and "run epochs" in text and "\r" in text  # redrawn in place
    assert text.count("epoch 3/3: mean model 0.5") == 1


def test_the_population_loop_writes_nothing_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    """evaluate_population itself: under pytest's capture stderr is no terminal, so its member bar stays silent."""

    class Perturber:
        def member(self, epoch, i):
            return contextlib.nullcontext()

    monkeypatch.setattr(population, "evaluate", lambda model, processor, prepared, cfg, stream: SimpleNamespace(fitness=0.25))
    cfg = Config()
    cfg.evolution.population_size = 6
    fitness = population.evaluate_population(Perturber(), None, None, [], cfg, 0, 1, StopFlag())
    assert fitness == [0.25] * 6 and capsys.readouterr().err == ""
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    population.evaluate_population(Perturber(), None, None, [], cfg, 0, 1, StopFlag())
    assert "epoch 1 members" in terminal.getvalue()
