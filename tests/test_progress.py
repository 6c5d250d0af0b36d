"""The rich progress line: eval figures belong to their own step, and say so once they are old."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from llmtrain.callbacks.progress import RichProgress

STEP = {"loss": 2.0, "lr": 1e-3, "tokens_per_s": 5000.0}


def test_eval_figures_are_logged_at_their_step_and_marked_stale_on_the_bar(caplog):
    progress, trainer = RichProgress(log_every=1), SimpleNamespace(step=0, total_steps=4)
    progress.on_train_begin(trainer)
    bar = []
    with caplog.at_level(logging.INFO, logger="llmtrain.callbacks.progress"):
        for step, extra in [(1, {}), (2, {"eval/loss": 1.5, "eval/accuracy": 0.25}), (3, {}), (4, {})]:
            trainer.step = step
            progress.on_step_end(trainer, {**STEP, **extra})
            bar.append(progress.progress.tasks[0].fields["text"])
    progress.on_train_end(trainer)
    logged = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[0] for line in logged] == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    assert logged[1].endswith("tok/s eval 1.500 acc 25.0%")
    assert all("eval" not in line for line in logged[2:])            # logged once, when it was new
    assert "eval" not in bar[0] and bar[1].endswith("tok/s eval 1.500 acc 25.0%")
    assert bar[2].endswith("tok/s [dim]eval@2 1.500 acc 25.0%[/]") and bar[3] == bar[2]
