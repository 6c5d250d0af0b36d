"""A callback that presses Ctrl-C at a chosen step (after the checkpoint callback has run)."""

from __future__ import annotations

from llmtrain.callbacks.base import Callback


class InterruptAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, metrics: dict[str, float]) -> None:
        if trainer.step == self.step:
            raise KeyboardInterrupt
