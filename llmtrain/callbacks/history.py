"""Keep every metrics row in memory (for tests and notebooks)."""

from __future__ import annotations

from llmtrain.callbacks.base import Callback


class History(Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_step_end(self, trainer, metrics: dict[str, float]) -> None:
        self.rows.append(dict(metrics))
