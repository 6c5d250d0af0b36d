"""What the trainer reads from every data source, once its `setup` has built the two splits."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

log = logging.getLogger(__name__)


def check_sizes(seq_len: int, batch_size: int, eval_batch_size: int) -> None:
    """At construction (config time): a row needs two tokens for one target, a batch one row."""
    if seq_len < 2:
        raise ValueError(f"data.seq_len={seq_len} must be >= 2 (a row of one token has no next token to predict)")
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value < 1:
            raise ValueError(f"data.{name}={value} must be >= 1")


def path_list(paths: str | Sequence[str]) -> list[Path]:
    """`paths` as a list: one path given as a plain string (data.paths=corpus.txt) is a list of one,
    not a sequence of one-character names."""
    return [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]


def training_rows(rows: Any, boundary: int, eos_id: int, limit: int) -> int:
    """How many leading packed rows to train on when the held-out rows start at row `boundary`, so
    that no document has tokens on both sides: the training rows end at the last <eos> before the
    boundary (rows stay whole, so a row holding that <eos> with the next document's first tokens after
    it is left out too). `rows` slice into (n, T) tensors (a tensor, or llmtrain.data.shards.ShardRows).

    Looks back at most `limit` rows (the held-out count: training loses at most that many); a document
    longer than that, such as the one document of a single .txt file, keeps its beginning in training,
    with a warning, as in a plain row split.
    """
    stop, end = max(0, boundary - limit), boundary
    while end > stop:
        begin = max(stop, end - 256)
        chunk_NT = rows[begin:end]
        hits_N2 = (chunk_NT == eos_id).nonzero()
        if len(hits_N2):
            row, column = hits_N2[-1].tolist()
            return begin + row + 1 if column == chunk_NT.shape[1] - 1 else begin + row
        end = begin
    if boundary:
        log.warning("a document runs across the train/eval split (no <eos> in the %d rows before it): its beginning "
                    "is trained on and its rest held out", boundary - stop)
    return boundary


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
