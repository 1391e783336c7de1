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


def test_a_real_run_off_a_terminal_prints_one_summary_line_per_epoch_and_no_bars(reference):
    """The training script's own loop (the shared 2-epoch run, its output captured: no terminal)."""
    printed = (reference / "reference.stdout").read_text() + (reference / "reference.stderr").read_text()
    assert "\r" not in printed
    for epoch in (1, 2):
        assert sum(line.startswith(f"epoch {epoch}/2: members ") for line in printed.splitlines()) == 1, printed


def test_a_terminal_gets_bars_redrawn_in_place_and_summary_lines_once():
    out = Terminal()
    epochs = bar(range(2), total=2, desc="run epochs", unit="epoch", stream=out)
    for epoch in epochs:
        members = bar(total=3, desc=f"epoch {epoch + 1} members", unit="member", leave=False, stream=out)
        members.update(3)
        members.close()
        summary(f"epoch {epoch + 1}/2: mean model 0.5", out)
    text = out.getvalue()
    assert "epoch 2 members" in text and "run epochs" in text and "\r" in text
    assert text.count("epoch 2/2: mean model 0.5") == 1


def test_off_a_terminal_bars_are_silent_and_summary_lines_plain():
    out = io.StringIO()
    for _ in bar(range(3), total=3, desc="run epochs", unit="epoch", stream=out):
        summary("one line", out)
    assert out.getvalue().splitlines() == ["one line"] * 3


def test_the_population_loop_writes_nothing_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    """evaluate_population itself: under pytest's capture stderr is no terminal, so its member bar stays silent."""

    class Perturber:
        def member(self, epoch, i):
            return contextlib.nullcontext()

    monkeypatch.setattr(
        population, "evaluate", lambda model, processor, prepared, cfg, stream: SimpleNamespace(fitness=0.25)
    )
    cfg = Config()
    cfg.evolution.population_size = 6
    fitness = population.evaluate_population(Perturber(), None, None, [], cfg, 0, 1, StopFlag())
    assert fitness == [0.25] * 6 and capsys.readouterr().err == ""
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    population.evaluate_population(Perturber(), None, None, [], cfg, 0, 1, StopFlag())
    assert "epoch 1 members" in terminal.getvalue()
