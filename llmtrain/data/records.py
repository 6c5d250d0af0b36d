"""Rows of user data files, each with the place it came from, so every error can name file:line.

.jsonl files give one JSON object per non-blank line (`where` = "path:line"); .parquet files give
one dict per table row (`where` = "path:row N", 1-based; reading them needs pyarrow, the
`parquet` extra). Every data source that reads user files goes through `read_records`, and every
.txt file through `read_text`.

Text is UTF-8; a leading byte-order mark (what Windows editors write) is dropped, and a byte that
is not UTF-8 is reported as path:line with its column, not as a bare UnicodeDecodeError.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RECORD_SUFFIXES = (".jsonl", ".parquet")
# errors="surrogateescape" decodes each byte that is not UTF-8 as one of these; valid UTF-8 never
# yields them, so finding one locates the bad byte while reading stays in text mode (newlines as
# Python translates them, streamed line by line).
UNDECODABLE = re.compile("[\udc80-\udcff]")


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


def read_text(path: Path) -> str:
    """The whole text of a UTF-8 file, without a leading BOM; a byte that is not UTF-8 raises RecordError."""
    text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")
    if bad := UNDECODABLE.search(text):
        line = text.count("\n", 0, bad.start()) + 1
        column = bad.start() - text.rfind("\n", 0, bad.start())
        raise _not_utf8(f"{path}:{line}", bad.group(), column)
    return text


def _not_utf8(where: str, escaped: str, column: int) -> RecordError:
    byte = ord(escaped) - 0xDC00                          # surrogateescape maps byte b to U+DC00 + b
    return RecordError(where, f"not valid UTF-8 (byte 0x{byte:02x} at column {column}); save the file as UTF-8")


def _jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as lines:
        for number, line in enumerate(lines, start=1):
            where = f"{path}:{number}"
            if bad := UNDECODABLE.search(line):
                raise _not_utf8(where, bad.group(), bad.start() + 1)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecordError(where, f"not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise RecordError(where, f"expected a JSON object, got {type(row).__name__}")
            yield where, row


def _parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install 'llmtrain[parquet]'") from None
    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                yield f"{path}:row {number}", row
    except (pa.ArrowException, OSError) as error:     # a corrupt page is an OSError ("Corrupt snappy ...")
        where = f"{path}:row {number + 1}" if number else str(path)
        raise RecordError(where, f"cannot read it as Parquet ({error})") from None


def string_field(where: str, row: dict[str, Any], key: str) -> str:
    """row[key], which must be a string."""
    if key not in row:
        raise RecordError(where, f"missing '{key}' (keys: {sorted(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise RecordError(where, f"'{key}' must be a string, got {type(value).__name__}")
    return value
