"""One rank's share of a data source, in the order one process with a W times larger batch would see.

The built-in sources (RowBatches, PaddedBatches) shuffle a fixed permutation per (seed, epoch) and
cut it into batches, so the rows of the single-process batch i of B*W rows are exactly those of
the B-row batches i*W .. i*W + W-1. Rank r therefore trains on batch i*W + r of the per-rank
source: the W ranks together see the single-process global batch, and a global data position
(`start`, counted in global batches) means the same thing under any rank. `data.batch_size`
stays the per-rank batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

from torch import Tensor


class RankShard:
    """`data` with `num_batches` and `train_batches` cut to rank `rank` of `world_size`.

    Everything else (setup, eval_batches, task_metrics, tokenizer, ...) is the source's own: every
    rank evaluates the whole held-out split, so eval metrics need no collective.
    """

    def __init__(self, data: Any, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.data, self.rank, self.world_size = data, rank, world_size

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["data"], name)        # __dict__: no recursion before __init__ ran

    def num_batches(self) -> int:
        """Global batches per epoch: W per-rank batches each; the short tail is dropped."""
        return self.data.num_batches() // self.world_size

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, Tensor]]:
        """Global batches `start`, `start + 1`, ... of `epoch`: this rank's slice of each.

        The same number on every rank (a rank that ran out early would hang the others' collectives).
        """
        end = self.num_batches() * self.world_size - start * self.world_size
        # TODO: the W-1 skipped batches are built and dropped (microseconds for packed rows); a
        # `stride` argument in the sources would skip them for free.
        return islice(self.data.train_batches(epoch, start * self.world_size), self.rank, end, self.world_size)
