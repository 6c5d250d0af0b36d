"""Save a resumable checkpoint every `every_steps` steps, at the end of training, and when a stop
is requested (SIGTERM or a first Ctrl-C, see llmtrain.entry.graceful_stop)."""

from __future__ import annotations

import logging
from pathlib import Path

from llmtrain.callbacks.base import Callback
from llmtrain.checkpoint import prune, save_checkpoint
from llmtrain.trainer import StopRequested

log = logging.getLogger(__name__)


class Checkpoint(Callback):
    """Atomic checkpoints under `dirpath` (see llmtrain.checkpoint), keeping the newest `keep_last`."""

    def __init__(self, dirpath: str, every_steps: int = 1000, keep_last: int = 2) -> None:
        if every_steps < 1 or keep_last < 1:
            raise ValueError(f"callbacks.checkpoint: every_steps={every_steps} and keep_last={keep_last} "
                             "must be >= 1")
        self.dirpath, self.every_steps, self.keep_last = Path(dirpath), every_steps, keep_last
        self.saved_step: int | None = None

    def on_step_end(self, trainer, metrics: dict[str, float]) -> None:
        if trainer.step % self.every_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer) -> None:
        if self.saved_step != trainer.step:
            self.save(trainer)

    def on_exception(self, trainer, error: BaseException) -> None:
        # Only a stop between two steps leaves a consistent state; any other error may be mid-step.
        if isinstance(error, StopRequested) and self.saved_step != trainer.step:
            self.save(trainer)
            log.info("saved a checkpoint at step %d; continue with resume=%s", trainer.step, self.dirpath.parent)

    def save(self, trainer) -> None:
        path = save_checkpoint(self.dirpath, trainer, trainer.config_yaml)
        prune(self.dirpath, self.keep_last)
        self.saved_step = trainer.step
        log.debug("saved %s", path)
