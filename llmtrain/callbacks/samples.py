"""samples.jsonl: a few held-out examples of what the model produces, at each evaluation.

The rows come from the strategy when it samples (GRPO: prompt, completion, reference answer and
the reward of each function) and otherwise from the data (the built-in task's greedy answers:
prompt, expected, predicted). Reading a few of them next to the metrics is the quickest check that
a reward is not being gamed or that an answer format drifted.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmtrain.callbacks.base import Callback
from llmtrain.callbacks.metrics import keep_rows_up_to


class SamplesJsonl(Callback):
    """Append up to `n` samples of each evaluation to `path`, each row tagged with the step."""

    rank_zero_only = True

    def __init__(self, path: str, n: int = 8) -> None:
        if n < 1:
            raise ValueError(f"callbacks.samples.n={n} must be >= 1 (drop the callback with callbacks.samples=null)")
        self.path, self.n = Path(path), n

    def on_train_begin(self, trainer) -> None:
        if trainer.step > 0 and self.path.exists():      # resumed: rows after the checkpoint are written again
            keep_rows_up_to(self.path, trainer.step)

    def on_step_end(self, trainer, metrics: dict[str, float]) -> None:
        if not any(key.startswith("eval/") for key in metrics):
            return
        source = trainer.strategy if hasattr(trainer.strategy, "samples") else trainer.data
        rows = source.samples(self.n) if hasattr(source, "samples") else []
        if rows:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as file:
                file.writelines(json.dumps({"step": trainer.step, **row}, ensure_ascii=False) + "\n" for row in rows)
