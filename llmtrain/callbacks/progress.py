"""A rich progress bar with the step's loss, lr and tokens/s (and DPO's reward accuracy, GRPO's mean
reward, and the number of updates skipped for a non-finite loss, once there is one).

Rich draws a live bar only on a terminal; written to a file (nohup, a SLURM log) it shows its final
state alone, at the end. So each evaluation's line is also logged (console and train.log), and off
a terminal the step line is logged every `log_every` steps too. The eval figures are on the lines of
their own step; between evaluations the live bar keeps the last ones, marked with their step
(`eval@400 ...`), and logged step lines leave them out, since they were logged when they were new.
"""

from __future__ import annotations

import logging

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rich.text import Text

from llmtrain.callbacks.base import Callback

log = logging.getLogger(__name__)


class RichProgress(Callback):
    """Redraws at most `refresh_per_second`; the last eval metrics stay on the bar, with their step.

    Args:
        refresh_per_second: Redraw rate of the bar.
        log_every: Steps between logged step lines when the console is not a terminal; None = about
            20 lines over the run. Evaluation steps are logged in any case.
    """

    rank_zero_only = True

    def __init__(self, refresh_per_second: float = 4.0, log_every: int | None = None) -> None:
        if log_every is not None and log_every < 1:
            raise ValueError(f"callbacks.progress.log_every={log_every} must be >= 1 or null")
        self.refresh_per_second = refresh_per_second
        self.log_every = log_every
        self.progress: Progress | None = None
        self.eval_text, self.eval_step = "", 0

    def on_train_begin(self, trainer) -> None:
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[text]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 refresh_per_second=self.refresh_per_second)
        self.task = self.progress.add_task("train", total=trainer.total_steps, completed=trainer.step, text="")
        self.on_terminal = self.progress.console.is_terminal
        self.every = self.log_every or max(1, trainer.total_steps // 20)
        self.progress.start()

    def on_step_end(self, trainer, metrics: dict[str, float]) -> None:
        text, evaluated = step_text(metrics), "eval/loss" in metrics
        if evaluated:
            self.eval_text, self.eval_step = eval_text(metrics), trainer.step
            text += f" eval{self.eval_text}"
        if evaluated or (not self.on_terminal and trainer.step % self.every == 0):
            log.info("step %d/%d: %s", trainer.step, trainer.total_steps, Text.from_markup(text).plain)
        if self.eval_text and not evaluated:      # the bar keeps the last eval, marked with its step
            text += f" [dim]eval@{self.eval_step}{self.eval_text}[/]"
        self.progress.update(self.task, completed=trainer.step, text=text)

    def on_train_end(self, trainer) -> None:
        self.progress.stop()

    def on_exception(self, trainer, error: BaseException) -> None:
        self.progress.stop()                  # give the terminal back before the traceback prints


def step_text(metrics: dict[str, float]) -> str:
    """The training figures of one step (rich markup)."""
    preference = f"pref {metrics['rewards/accuracies']:.0%} " if "rewards/accuracies" in metrics else ""
    if "reward" in metrics:                   # GRPO: its loss starts near 0 by construction; the reward moves
        preference += f"reward {metrics['reward']:.3f} "
    skipped = f" [red]{n} non-finite skipped[/]" if (n := metrics.get("nonfinite_steps")) else ""
    return (f"loss {metrics['loss']:.3f} {preference}lr {metrics['lr']:.2e} "
            f"{metrics['tokens_per_s'] / 1000:.1f}k tok/s{skipped}")


def eval_text(metrics: dict[str, float]) -> str:
    """The held-out figures of an evaluation step, after the word "eval"."""
    text = f" {metrics['eval/loss']:.3f}"
    if "eval/rewards/accuracies" in metrics:
        text += f" pref {metrics['eval/rewards/accuracies']:.1%}"
    if "eval/accuracy" in metrics:
        text += f" acc {metrics['eval/accuracy']:.1%}"
    return text
