"""Packed token rows served as shuffled, resumable batches.

Pre-training documents are concatenated (each already wrapped in <bos> ... <eos>) and cut into
rows of `seq_len` tokens: no padding, so every position is a target. The rows live in one int64
tensor; a batch is an index_select, so data loading costs microseconds and stays off the
critical path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor


def pack_documents(documents: Sequence[Sequence[int]], seq_len: int) -> Tensor:
    """Concatenate token documents and cut them into rows of `seq_len`; the short tail is dropped.

    Returns:
        rows_NT, int64.
    """
    flat = torch.tensor([token for doc in documents for token in doc], dtype=torch.long)
    n_rows = flat.numel() // seq_len
    return flat[: n_rows * seq_len].view(n_rows, seq_len)


class RowBatches:
    """Batches of rows, shuffled per epoch by a generator seeded with (seed, epoch).

    Args:
        rows_NT: the packed rows.
        batch_size: rows per batch; the last incomplete batch of an epoch is dropped.
        seed: with the epoch number, fixes the order, so `start` can skip to a data position.
    """

    def __init__(self, rows_NT: Tensor, batch_size: int, seed: int) -> None:
        self.rows_NT, self.batch_size, self.seed = rows_NT, batch_size, seed

    def __len__(self) -> int:
        return len(self.rows_NT) // self.batch_size

    def order(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows_NT), generator=generator)

    def shuffled(self, epoch: int, start: int = 0) -> Iterator[dict[str, Tensor]]:
        """Batches `start`, `start + 1`, ... of `epoch` (earlier ones are skipped, not built)."""
        order = self.order(epoch)
        for i in range(start, len(self)):
            yield as_batch(self.rows_NT.index_select(0, order[i * self.batch_size:(i + 1) * self.batch_size]))

    def in_order(self) -> Iterator[dict[str, Tensor]]:
        """Every row in storage order; the last batch may be short (for evaluation)."""
        for i in range(0, len(self.rows_NT), self.batch_size):
            yield as_batch(self.rows_NT[i:i + self.batch_size])


def as_batch(ids_BT: Tensor) -> dict[str, Tensor]:
    """A text batch: every token is a target (the strategy shifts the labels)."""
    return {"input_ids": ids_BT, "labels": ids_BT}
