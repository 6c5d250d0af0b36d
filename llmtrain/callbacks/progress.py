"""A rich progress bar with the step's loss, lr and tokens/s (and DPO's reward accuracy, GRPO's mean
reward, and the number of updates skipped for a non-finite loss, once there is one)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from llmtrain.callbacks.base import Callback


class RichProgress(Callback):
    """Redraws at most `refresh_per_second`; the last eval metrics stay on the line."""

    rank_zero_only = True

    def __init__(self, refresh_per_second: float = 4.0) -> None:
        self.refresh_per_second = refresh_per_second
        self.progress: Progress | None = None
        self.eval_text = ""

    def on_train_begin(self, trainer) -> None:
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[text]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 refresh_per_second=self.refresh_per_second)
        self.task = self.progress.add_task("train", total=trainer.total_steps, completed=trainer.step, text="")
        self.progress.start()

    def on_step_end(self, trainer, metrics: dict[str, float]) -> None:
        if "eval/loss" in metrics:
            self.eval_text = f" eval {metrics['eval/loss']:.3f}"
            if "eval/rewards/accuracies" in metrics:
                self.eval_text += f" pref {metrics['eval/rewards/accuracies']:.1%}"
            if "eval/accuracy" in metrics:
                self.eval_text += f" acc {metrics['eval/accuracy']:.1%}"
        preference = f"pref {metrics['rewards/accuracies']:.0%} " if "rewards/accuracies" in metrics else ""
        if "reward" in metrics:               # GRPO: its loss starts near 0 by construction; the reward moves
            preference += f"reward {metrics['reward']:.3f} "
        skipped = f" [red]{n} non-finite skipped[/]" if (n := metrics.get("nonfinite_steps")) else ""
        text = (f"loss {metrics['loss']:.3f} {preference}lr {metrics['lr']:.2e} "
                f"{metrics['tokens_per_s'] / 1000:.1f}k tok/s{self.eval_text}{skipped}")
        self.progress.update(self.task, completed=trainer.step, text=text)

    def on_train_end(self, trainer) -> None:
        self.progress.stop()

    def on_exception(self, trainer, error: BaseException) -> None:
        self.progress.stop()                  # give the terminal back before the traceback prints
