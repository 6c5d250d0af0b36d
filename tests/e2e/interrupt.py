"""A callback that presses Ctrl-C at a chosen step (after the checkpoint callback has run)."""

from __future__ import annotations

from llmtrain.callbacks.base import Callback


class InterruptAt(Callback):
    runs_last = True          # after the checkpoint callback, which is listed before it

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, metrics: dict[str, float]) -> None:
        if trainer.step == self.step:
            raise KeyboardInterrupt


class SignalAt(Callback):
    """Sends this process a signal (default SIGTERM) at a chosen step, as a cluster scheduler would."""

    runs_last = True

    def __init__(self, step: int, signal_name: str = "SIGTERM") -> None:
        self.step, self.signal_name = step, signal_name

    def on_step_end(self, trainer, metrics: dict[str, float]) -> None:
        if trainer.step == self.step:
            import os
            import signal
            os.kill(os.getpid(), getattr(signal, self.signal_name))
