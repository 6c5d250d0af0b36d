"""Plain-text pre-training data from local files: .txt (one document per file), .jsonl or .parquet ({"text"})."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llmtrain.data.packing import RowBatches, pack_documents
from llmtrain.data.records import read_records, read_text, string_field
from llmtrain.data.splits import Splits, check_sizes, path_list, training_rows

SUFFIXES = (".txt", ".jsonl", ".parquet")


def read_documents(path: Path) -> Iterator[str]:
    """The documents of one file; a malformed row or bad UTF-8 is reported as file:line (Parquet: file:row N)."""
    if path.suffix == ".txt":
        yield read_text(path)
        return
    for where, row in read_records(path):
        yield string_field(where, row, "text")


class TextFiles(Splits):
    """Pre-training text from files, packed into rows; the last `eval_fraction` of rows is held out,
    and training ends before the document that runs into them (llmtrain.data.splits.training_rows).

    Args:
        paths: .txt, .jsonl or .parquet files (relative paths are relative to the launch directory).
        tokenizer: turns each document into `<bos> ... <eos>` token ids.
        eval_fraction: share of the packed rows kept for evaluation (at least one row).
    """

    formats = ("text",)

    def __init__(self, paths: Sequence[str], tokenizer: Any, seq_len: int = 128, batch_size: int = 32,
                 eval_batch_size: int = 64, eval_fraction: float = 0.05, seed: int = 0) -> None:
        if not paths:
            raise ValueError("data.paths is empty: give at least one .txt, .jsonl or .parquet file")
        self.paths = path_list(paths)
        check_sizes(seq_len, batch_size, eval_batch_size)
        for path in self.paths:
            if path.suffix not in SUFFIXES:
                raise ValueError(f"data.paths: {path} is not one of {SUFFIXES}")
            if not path.is_file():
                raise ValueError(f"data.paths: {path} does not exist")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction={eval_fraction} must be in (0, 1)")
        self.tokenizer, self.seq_len, self.seed = tokenizer, seq_len, seed
        self.batch_size, self.eval_batch_size, self.eval_fraction = batch_size, eval_batch_size, eval_fraction

    def setup(self, format: str) -> None:
        if format not in self.formats:
            raise ValueError(f"the strategy consumes '{format}' batches, but data=text ({type(self).__name__}) "
                             f"serves only {self.formats}")
        documents = [self.tokenizer.encode(doc, bos=True, eos=True)
                     for path in self.paths for doc in read_documents(path)]
        rows_NT = pack_documents(documents, self.seq_len)
        n_eval = max(1, math.ceil(len(rows_NT) * self.eval_fraction))
        n_train = training_rows(rows_NT, len(rows_NT) - n_eval, self.tokenizer.eos_id, n_eval)
        if n_train < self.batch_size:
            raise ValueError(f"data.paths hold {len(rows_NT)} rows of {self.seq_len} tokens: too few for one "
                             f"training batch of {self.batch_size} after holding out {n_eval} (and "
                             f"{len(rows_NT) - n_eval - n_train} more, so that no document is on both sides)")
        self.train = RowBatches(rows_NT[:n_train], self.batch_size, self.seed)
        self.eval = RowBatches(rows_NT[-n_eval:], self.eval_batch_size, self.seed)
