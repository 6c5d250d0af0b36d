"""What the trainer reads from every data source, once its `setup` has built the two splits."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor


class Splits:
    """Batch access through `self.train` and `self.eval` (RowBatches or PaddedBatches, built by `setup`).

    A source with a task to score (the built-in questions) overrides `task_metrics`.
    """

    train: Any
    eval: Any

    def num_batches(self) -> int:
        """Training batches per epoch (the last incomplete one is dropped)."""
        return len(self.train)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, Tensor]]:
        """Batches `start`, `start + 1`, ... of `epoch`, in an order fixed by (seed, epoch)."""
        return self.train.shuffled(epoch, start)

    def eval_batches(self) -> Iterator[dict[str, Tensor]]:
        """Every held-out row in a fixed order; the last batch may be short."""
        return self.eval.in_order()

    def task_metrics(self, model: Any, device: Any) -> dict[str, float]:
        return {}                                # free text or free-form answers: no exact-match score
