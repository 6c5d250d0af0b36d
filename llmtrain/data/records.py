"""Rows of user data files, each with the place it came from, so every error can name file:line.

.jsonl files give one JSON object per non-blank line (`where` = "path:line"); .parquet files give
one dict per table row (`where` = "path:row N", 1-based; reading them needs pyarrow, the
`parquet` extra). Every data source that reads user files goes through `read_records`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RECORD_SUFFIXES = (".jsonl", ".parquet")


class RecordError(ValueError):
    """A malformed row; the message starts with the file and line (or row) it came from."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where


def read_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`where`, row) for every row of a .jsonl or .parquet file."""
    path = Path(path)
    if path.suffix == ".jsonl":
        yield from _jsonl(path)
    elif path.suffix == ".parquet":
        yield from _parquet(path)
    else:
        raise ValueError(f"{path}: expected one of {RECORD_SUFFIXES}")


def _jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecordError(where, f"not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise RecordError(where, f"expected a JSON object, got {type(row).__name__}")
            yield where, row


def _parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install 'llmtrain[parquet]'") from None
    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield f"{path}:row {number}", row


def string_field(where: str, row: dict[str, Any], key: str) -> str:
    """row[key], which must be a string."""
    if key not in row:
        raise RecordError(where, f"missing '{key}' (keys: {sorted(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise RecordError(where, f"'{key}' must be a string, got {type(value).__name__}")
    return value
