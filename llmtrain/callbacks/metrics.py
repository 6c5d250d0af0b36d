"""metrics.jsonl: one JSON object per step, with the names of DESIGN.md section 5."""

from __future__ import annotations

import json
import math
from pathlib import Path

from llmtrain.callbacks.base import Callback


class JsonlMetrics(Callback):
    """Append each step's metrics to `path`, flushed at once so a crash loses nothing.

    On resume, rows after the checkpoint's step are dropped first: the resumed run writes them
    again, so the file reads as one uninterrupted run. A NaN/inf value (the loss of a skipped
    non-finite step) is written as null: json.dumps would write NaN, which Python reads back but
    strict JSON readers (jq, JavaScript's JSON.parse) reject.
    """

    rank_zero_only = True

    def __init__(self, path: str, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"callbacks.metrics.every={every} must be >= 1")
        self.path, self.every = Path(path), every
        self.file = None

    def on_train_begin(self, trainer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if trainer.step > 0 and self.path.exists():
            rows = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= trainer.step]
            self.path.write_text("".join(row + "\n" for row in rows))
        self.file = self.path.open("a")

    def on_step_end(self, trainer, metrics: dict[str, float]) -> None:
        if trainer.step % self.every == 0 or any(k.startswith("eval/") for k in metrics):
            row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def on_train_end(self, trainer) -> None:
        self.file.close()

    def on_exception(self, trainer, error: BaseException) -> None:
        self.file.close()
