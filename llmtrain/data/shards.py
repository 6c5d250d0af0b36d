"""Token shards: text tokenized once into flat memory-mapped files that the SEQ strategy streams.

A shard folder (written by `llmtrain tokenize`, see llmtrain/tokenize_cli.py) holds:

    shard_00000.bin, ...   the token stream, flat uint16 (uint32 when the vocabulary exceeds 65,536)
    index.json             format version, dtype, tokens per shard, tokenizer, sources

Every document is <bos> ... <eos>, and documents run on across shard boundaries. Each shard is cut
into non-overlapping rows of seq_len tokens (a tail shorter than a row is unused), and a batch
reads only its own rows through np.memmap, so the corpus may be far larger than RAM. Batches are
ordered exactly as RowBatches orders packed in-memory rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from llmtrain.data.atomic import new_dir
from llmtrain.data.packing import RowBatches
from llmtrain.data.splits import Splits, check_sizes, training_rows
from llmtrain.data.text import SUFFIXES, read_documents

FORMAT_VERSION = 1
INDEX = "index.json"


def shard_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


class ShardStream:
    """Appends token arrays to shard_00000.bin, shard_00001.bin, ... of `shard_tokens` tokens each."""

    def __init__(self, folder: Path, dtype: str, shard_tokens: int) -> None:
        self.folder, self.dtype, self.shard_tokens = folder, np.dtype(dtype), shard_tokens
        self.counts: list[int] = []
        self.file: BinaryIO | None = None

    def write(self, ids_N: np.ndarray) -> None:
        ids_N = ids_N.astype(self.dtype)
        while len(ids_N):
            if self.file is None or self.counts[-1] == self.shard_tokens:
                self.close()
                self.file = (self.folder / f"shard_{len(self.counts):05d}.bin").open("wb")
                self.counts.append(0)
            piece_N = ids_N[: self.shard_tokens - self.counts[-1]]
            self.file.write(piece_N.tobytes())
            self.counts[-1] += len(piece_N)
            ids_N = ids_N[len(piece_N):]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def write_shards(paths: Sequence[str | Path], out_dir: str | Path, tokenizer: Any, tokenizer_spec: str,
                 shard_tokens: int = 100_000_000) -> dict[str, Any]:
    """Tokenize every document of `paths` once, into a new shard folder `out_dir`; returns its index.

    Args:
        paths: .txt files (one document each), .jsonl or .parquet files (each row's "text").
        tokenizer: encodes each document as <bos> ... <eos>.
        tokenizer_spec: how to get the tokenizer back ("byte" or its path), recorded in index.json.
        shard_tokens: tokens per shard file (the last one may be shorter).
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        if path.suffix not in SUFFIXES:
            raise ValueError(f"{path}: expected one of {SUFFIXES}")
        if not path.is_file():
            raise ValueError(f"{path} does not exist")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens={shard_tokens} must be positive")
    dtype = shard_dtype(tokenizer.vocab_size)
    sources = []
    with new_dir(out_dir) as tmp:
        stream = ShardStream(tmp, dtype, shard_tokens)
        try:
            for path in paths:
                documents = tokens = 0
                for document in read_documents(path):
                    ids_N = np.asarray(tokenizer.encode(document, bos=True, eos=True), dtype=np.int64)
                    stream.write(ids_N)
                    documents, tokens = documents + 1, tokens + len(ids_N)
                sources.append({"path": str(path), "documents": documents, "tokens": tokens})
        finally:
            stream.close()
        if not stream.counts:
            raise ValueError(f"{', '.join(map(str, paths))}: no documents to tokenize")
        index = {"format": "llmtrain-token-shards", "version": FORMAT_VERSION, "dtype": dtype,
                 "shards": [{"file": f"shard_{i:05d}.bin", "tokens": n} for i, n in enumerate(stream.counts)],
                 "total_tokens": sum(stream.counts), "vocab_size": tokenizer.vocab_size,
                 "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "tokenizer": tokenizer_spec,
                 "sources": sources}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def read_index(folder: Path) -> dict[str, Any]:
    """index.json of a shard folder, checked for the format this code reads."""
    file = folder / INDEX
    if not file.is_file():
        raise ValueError(f"data.path={folder}: no {INDEX} there; write the shards with `llmtrain tokenize`")
    index = json.loads(file.read_text())
    if index.get("format") != "llmtrain-token-shards" or index.get("version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format {index.get('format')!r} version {index.get('version')!r}; this llmtrain "
                         f"reads 'llmtrain-token-shards' version {FORMAT_VERSION}")
    return index


def open_shard(file: Path, dtype: str, tokens: int) -> np.ndarray:
    """The shard as a read-only memory map, after checking its length against index.json."""
    size = file.stat().st_size if file.is_file() else None
    if size != tokens * np.dtype(dtype).itemsize:
        raise ValueError(f"{file}: expected {tokens} {dtype} tokens from {INDEX}, found "
                         f"{'no file' if size is None else f'{size} bytes'}")
    return np.memmap(file, dtype=dtype, mode="r")


class ShardRows:
    """The rows_NT that RowBatches indexes, read on demand from memory-mapped shards.

    It supports what RowBatches uses of a tensor: len(), index_select(0, index_N) and slicing.
    Row r of the corpus is the r-th seq_len window in shard order; `begin`/`end` select a range.
    """

    def __init__(self, shards: Sequence[np.ndarray], seq_len: int, begin: int = 0, end: int | None = None) -> None:
        self.shards, self.seq_len = shards, seq_len
        self.starts = np.cumsum([0, *(len(shard) // seq_len for shard in shards)])    # first row of each shard
        self.begin, self.end = begin, int(self.starts[-1]) if end is None else end

    def __len__(self) -> int:
        return self.end - self.begin

    def range(self, begin: int, end: int) -> ShardRows:
        """Rows begin..end-1 of these rows, still unread."""
        return ShardRows(self.shards, self.seq_len, self.begin + begin, self.begin + end)

    def index_select(self, dim: int, index_N: Tensor) -> Tensor:
        if dim != 0:
            raise ValueError(f"ShardRows selects rows (dim 0), not dim {dim}")
        return self.read(self.begin + index_N.numpy())

    def __getitem__(self, rows: slice) -> Tensor:
        return self.read(self.begin + np.arange(*rows.indices(len(self))))

    def read(self, rows_N: np.ndarray) -> Tensor:
        """ids_NT (int64) of corpus rows `rows_N`, read from the memory maps."""
        shard_N = np.searchsorted(self.starts, rows_N, side="right") - 1
        offset_N = (rows_N - self.starts[shard_N]) * self.seq_len
        ids_NT = np.stack([self.shards[s][o:o + self.seq_len] for s, o in zip(shard_N, offset_N)])
        return torch.from_numpy(ids_NT.astype(np.int64))


class TokenShards(Splits):
    """Pre-training rows streamed from a shard folder; the last `eval_fraction` of rows is held out.

    Args:
        path: a folder written by `llmtrain tokenize`.
        tokenizer: the tokenizer the shards were written with (checked against index.json); it
            gives the vocabulary size and decodes, nothing is tokenized here.
    """

    formats = ("text",)

    def __init__(self, path: str, tokenizer: Any, seq_len: int = 128, batch_size: int = 32,
                 eval_batch_size: int = 64, eval_fraction: float = 0.05, seed: int = 0) -> None:
        self.path = Path(path)
        self.index = read_index(self.path)
        written = tuple(self.index[k] for k in ("vocab_size", "bos_id", "eos_id"))
        given = (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)
        if written != given:
            spec = self.index["tokenizer"]
            choose = "data/tokenizer=byte" if spec == "byte" else f"data/tokenizer=file data.tokenizer.path={spec}"
            raise ValueError(f"data.tokenizer ({type(tokenizer).__name__}: vocab_size, bos_id, eos_id = {given}) is "
                             f"not the tokenizer {self.path / INDEX} was written with ({spec}: {written}); "
                             f"choose that one: {choose}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction={eval_fraction} must be in (0, 1)")
        check_sizes(seq_len, batch_size, eval_batch_size)
        self.tokenizer, self.seq_len, self.seed = tokenizer, seq_len, seed
        self.batch_size, self.eval_batch_size, self.eval_fraction = batch_size, eval_batch_size, eval_fraction

    def setup(self, format: str) -> None:
        if format not in self.formats:
            raise ValueError(f"the strategy consumes '{format}' batches, but data=shards ({type(self).__name__}) "
                             f"serves only {self.formats}")
        shards = [open_shard(self.path / s["file"], self.index["dtype"], s["tokens"]) for s in self.index["shards"]]
        rows = ShardRows(shards, self.seq_len)
        n_eval = max(1, math.ceil(len(rows) * self.eval_fraction))
        n_train = training_rows(rows, len(rows) - n_eval, self.index["eos_id"], n_eval)
        if n_train < self.batch_size:
            raise ValueError(f"data.path={self.path} holds {len(rows)} rows of {self.seq_len} tokens: too few for "
                             f"one training batch of {self.batch_size} after holding out {n_eval} (and "
                             f"{len(rows) - n_eval - n_train} more, so that no document is on both sides)")
        self.train = RowBatches(rows.range(0, n_train), self.batch_size, self.seed)
        self.eval = RowBatches(rows.range(len(rows) - n_eval, len(rows)), self.eval_batch_size, self.seed)
