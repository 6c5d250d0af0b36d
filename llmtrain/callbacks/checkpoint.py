"""Save a resumable checkpoint every `every_steps` steps, at the end of training, and when the run
stops between two steps: a stop request (SIGTERM or a first Ctrl-C, see
llmtrain.entry.graceful_stop) or a non-finite loss (llmtrain.trainer.NonFiniteError)."""

from __future__ import annotations

import logging
from pathlib import Path

from llmtrain.callbacks.base import Callback
from llmtrain.checkpoint import prune, save_checkpoint, step_dir_name
from llmtrain.trainer import NonFiniteError, StopRequested

log = logging.getLogger(__name__)


class Checkpoint(Callback):
    """Atomic checkpoints under `dirpath` (see llmtrain.checkpoint), keeping the newest `keep_last`.

    A save that fails (a full disk) leaves the earlier checkpoints and `latest` as they were, and is
    logged as an error naming the cause, the step that is missing and the step `latest` still holds.
    Then a periodic save lets training go on and tries again at the next interval (space may have
    been freed by then); the last save of the run raises, so a run never reports success with its
    final state unsaved; a save on a stop only logs, as the run is already ending with an error.
    """

    runs_last = True       # after the metrics and samples of the step it saves (llmtrain.callbacks.base)

    def __init__(self, dirpath: str, every_steps: int = 1000, keep_last: int = 2) -> None:
        if every_steps < 1 or keep_last < 1:
            raise ValueError(f"callbacks.checkpoint: every_steps={every_steps} and keep_last={keep_last} "
                             "must be >= 1")
        self.dirpath, self.every_steps, self.keep_last = Path(dirpath), every_steps, keep_last
        self.saved_step: int | None = None

    def on_step_end(self, trainer, metrics: dict[str, float]) -> None:
        if trainer.step % self.every_steps == 0:
            retry = f"training goes on and tries again at step {trainer.step + self.every_steps}"
            self.save(trainer, None if trainer.done else retry)

    def on_train_end(self, trainer) -> None:
        if self.saved_step != trainer.step:
            self.save(trainer)

    def on_exception(self, trainer, error: BaseException) -> None:
        # Only a stop between two steps leaves a consistent state; any other error may be mid-step.
        if not isinstance(error, (StopRequested, NonFiniteError)):
            return
        if self.saved_step != trainer.step:
            self.save(trainer, "the run stops without a checkpoint of its last step")
        if self.saved_step == trainer.step:
            path = self.dirpath / step_dir_name(trainer.step)
            log.info("saved a checkpoint at step %d; continue with resume=%s", trainer.step, self.dirpath.parent)
            if isinstance(error, NonFiniteError):
                error.checkpoint = str(path)          # its message names the checkpoint

    def save(self, trainer, if_failed: str | None = None) -> None:
        """Save and prune. A failed write is logged, then `if_failed` says what happens next; None
        (the run's final save) raises the error instead."""
        try:
            path = save_checkpoint(self.dirpath, trainer, trainer.config_yaml)
        except OSError as error:
            log.error("checkpoint of step %d was NOT saved: %s. %s; %s.", trainer.step, error, self.intact(),
                      if_failed or "this was the run's final save, so the run fails")
            if if_failed is None:
                raise
            return
        if trainer.hardware.is_rank0:             # every rank gathers (FSDP2); rank 0 alone writes
            prune(self.dirpath, self.keep_last)
        self.saved_step = trainer.step
        log.debug("saved %s", path)

    def intact(self) -> str:
        """Where `latest` points, for the message of a failed save."""
        latest = self.dirpath / "latest"
        if not latest.exists():
            return f"There is no earlier checkpoint in {self.dirpath}: the run cannot be resumed yet"
        name = latest.resolve().name
        return (f"{latest} still points at {name} (intact): resume={self.dirpath.parent} would continue "
                f"from step {int(name[5:])}")
