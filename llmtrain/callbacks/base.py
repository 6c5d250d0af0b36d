"""Hook points of the training loop; each is a no-op. A callback overrides the ones it needs.

Callbacks observe the trainer (`trainer.step`, `trainer.model`, ...); they never change the loss.
With several ranks every rank runs the callbacks, except those with `rank_zero_only = True`
(files, consoles, loggers), which llmtrain.entry gives to rank 0 alone; the metrics they see are
already summed over the ranks.

Callbacks run in their config order, except those with `runs_last = True` (the checkpoint), which
the trainer moves after the others: a step's metrics and samples rows are on disk before the
checkpoint that a resume continues after, so a crash between the two cannot lose them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmtrain.trainer import Trainer


class Callback:
    rank_zero_only: bool = False
    runs_last: bool = False

    def on_train_begin(self, trainer: Trainer) -> None: ...
    def on_epoch_begin(self, trainer: Trainer) -> None: ...
    def on_step_begin(self, trainer: Trainer) -> None: ...
    def on_batch_begin(self, trainer: Trainer) -> None: ...
    def on_batch_end(self, trainer: Trainer) -> None: ...
    def on_before_optimizer_step(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...
    def on_epoch_end(self, trainer: Trainer) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...
    def on_exception(self, trainer: Trainer, error: BaseException) -> None: ...
