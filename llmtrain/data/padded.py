"""Variable-length examples served as right-padded, shuffled, resumable batches (chat and preference).

An example ("unit") is one sequence (a chat) or a fixed number of sequences (a preference pair:
chosen, rejected). All tokens live in one flat int32 tensor with a parallel target mask, so a
hundred thousand examples cost a few megabytes, not millions of Python ints. A batch of B units
with k sequences each is a (k*B, T) tensor laid out sequence-major: all first sequences, then all
second ones (chosen rows 0..B-1, rejected rows B..2B-1), padded on the right to the longest row.
Right padding needs no attention mask: a causal model never lets a real token attend to a later
pad, and pads are never targets.

Per-unit columns added with `add_column` (e.g. precomputed reference log-probs, shape (N, k))
travel with their units and arrive flattened the same way, shape (k*B,).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from llmtrain.data.chat import IGNORE_INDEX

Sequence_ = tuple[list[int], list[int]]          # ids, labels (IGNORE_INDEX where not a target)


class PaddedBatches:
    """Batches of `batch_size` units in an order fixed by (seed, epoch); the last short batch is dropped.

    Args:
        units: per example, its `k` sequences as (ids, labels) pairs.
        batch_size: units per batch.
        seed: with the epoch number, fixes the order, so `start` can skip to a data position.
        pad_id: fills the ids past a row's end.
    """

    def __init__(self, units: Sequence[Sequence[Sequence_]], batch_size: int, seed: int, pad_id: int) -> None:
        if not units:
            raise ValueError("no examples to batch")
        self.k = len(units[0])
        flat_ids, flat_labels = array("q"), array("q")      # typed buffers: no Python int per token kept
        for unit in units:
            for ids, labels in unit:
                flat_ids.extend(ids)
                flat_labels.extend(labels)
        lengths = [len(ids) for unit in units for ids, _ in unit]
        self._store(torch.frombuffer(flat_ids, dtype=torch.int64).to(torch.int32),
                    torch.frombuffer(flat_labels, dtype=torch.int64) != IGNORE_INDEX,
                    torch.tensor(lengths, dtype=torch.long).view(len(units), self.k), batch_size, seed, pad_id)

    @classmethod
    def from_tensors(cls, ids: Tensor, is_target: Tensor, lengths_NK: Tensor, batch_size: int, seed: int,
                     pad_id: int) -> PaddedBatches:
        """The batches of units already flattened into `ids`/`is_target` (e.g. read back from the data
        cache), with `lengths_NK` tokens per sequence: no Python int per token is built again."""
        if int(lengths_NK.sum()) != len(ids) or len(is_target) != len(ids):
            raise ValueError(f"{int(lengths_NK.sum())} tokens by the lengths, {len(ids)} ids and "
                             f"{len(is_target)} target flags")
        batches = cls.__new__(cls)
        batches.k = lengths_NK.shape[1]
        batches._store(ids, is_target, lengths_NK, batch_size, seed, pad_id)
        return batches

    def _store(self, ids: Tensor, is_target: Tensor, lengths_NK: Tensor, batch_size: int, seed: int,
               pad_id: int) -> None:
        self.ids, self.is_target, self.lengths_NK = ids, is_target, lengths_NK
        self.starts_NK = (lengths_NK.flatten().cumsum(0) - lengths_NK.flatten()).view_as(lengths_NK)
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.columns: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self.lengths_NK) // self.batch_size

    @property
    def num_units(self) -> int:
        return len(self.lengths_NK)

    def order(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_units, generator=generator)

    def shuffled(self, epoch: int, start: int = 0) -> Iterator[dict[str, Tensor]]:
        """Batches `start`, `start + 1`, ... of `epoch` (earlier ones are skipped, not built)."""
        order = self.order(epoch)
        for i in range(start, len(self)):
            yield self.batch(order[i * self.batch_size:(i + 1) * self.batch_size])

    def in_order(self) -> Iterator[dict[str, Tensor]]:
        """Every unit in storage order; the last batch may be short (for evaluation)."""
        for i in range(0, self.num_units, self.batch_size):
            yield self.batch(torch.arange(i, min(i + self.batch_size, self.num_units)))

    def batch(self, units_B: Tensor) -> dict[str, Tensor]:
        """input_ids and labels (k*B, T), sequence-major, right-padded; plus every added column (k*B,)."""
        starts, lengths = self.starts_NK[units_B].T.flatten(), self.lengths_NK[units_B].T.flatten()
        T = int(lengths.max())
        ids = torch.full((len(starts), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(starts), T), IGNORE_INDEX, dtype=torch.long)
        for row, (start, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
            ids[row, :n] = self.ids[start:start + n]
            labels[row, :n] = torch.where(self.is_target[start:start + n], ids[row, :n], IGNORE_INDEX)
        extra = {name: values_NK[units_B].T.flatten() for name, values_NK in self.columns.items()}
        return {"input_ids": ids, "labels": labels, **extra}

    def add_column(self, name: str, compute: Callable[[dict[str, Tensor]], Tensor], batch_size: int = 64) -> None:
        """Store `compute(batch)` (shape (k*B,)) for every unit, computed once in storage order."""
        values = []
        for i in range(0, self.num_units, batch_size):
            units_B = torch.arange(i, min(i + batch_size, self.num_units))
            values.append(compute(self.batch(units_B)).detach().float().cpu().view(self.k, -1).T)
        self.columns[name] = torch.cat(values)
