"""metrics.jsonl: one JSON object per step, with the names of DESIGN.md section 5."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from llmtrain.callbacks.base import Callback

log = logging.getLogger(__name__)


def keep_rows_up_to(path: Path, step: int) -> None:
    """Rewrite the JSONL file `path` without its rows after `step` (a resume writes them again).

    A last line that does not parse was cut short by a killed process (each row is one write, the
    newline last): it is dropped with a warning. A bad line before the last is corruption that
    dropping would hide, so it raises, and the file is left as it was.

    Raises:
        ValueError: a line other than the last is not a JSON row with a step (names file and line).
    """
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            keep = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError) as error:
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not a JSON row with a step ({type(error).__name__}: "
                                 f"{error}); fix or remove that line, then resume again") from None
            log.warning("%s:%d: dropped the last line, cut short when the run was killed: %.80r",
                        path, number, line)
            continue
        if keep:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


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
            keep_rows_up_to(self.path, trainer.step)
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
