"""An on-disk cache for generated data: made once per machine, then read back in milliseconds.

An entry is a file named by a hash (`digest`) of everything its content depends on: the arguments,
the tokenizer (`tokenizer_identity`) and the source text of the code that produced it
(`source_digest`). A change to any of them gives a new name, so a stale entry is never read. Old
entries are deleted, least recently used first, once the folder outgrows MAX_BYTES; the folder
may also be deleted at any time.

The cache never fails a run. A write goes to a temporary file in the same folder and is renamed
into place (os.replace is atomic), so two processes starting at once read a whole file or none;
an unwritable folder means no caching, and an unreadable entry is logged (debug) and rebuilt.
Formats are safe to load: JSON for examples, safetensors for tensors (no pickle).

Location: $LLMTRAIN_CACHE, else $XDG_CACHE_HOME/llmtrain, else ~/.cache/llmtrain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import safetensors.torch
from torch import Tensor

from llmtrain.data import tokenizer as byte_tokenizer
from llmtrain.data.synthetic import Example

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_BYTES = 2 * 2**30                       # the default data takes ~0.1 GB in all formats: ~20 seeds of a sweep
EXAMPLE_FIELDS = [field.name for field in dataclasses.fields(Example)]


def cache_root() -> Path | None:
    """$LLMTRAIN_CACHE, else $XDG_CACHE_HOME/llmtrain, else ~/.cache/llmtrain (None: no home folder)."""
    if root := os.environ.get("LLMTRAIN_CACHE"):
        return Path(root)
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg) / "llmtrain"
    try:
        return Path.home() / ".cache" / "llmtrain"
    except RuntimeError:                    # no $HOME and no passwd entry: run without a cache
        return None


def digest(value: Any) -> str:
    """A file name for a JSON-serializable value: its sha256, 32 hex digits."""
    text = json.dumps(value, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def source_digest(*modules: ModuleType) -> str:
    """A hash of the modules' source files, so that a code change gives new keys.

    Best taken at import (module level): the text hashed is then the text that runs.
    """
    sha = hashlib.sha256()
    for module in modules:
        sha.update(Path(module.__file__).read_bytes())
    return sha.hexdigest()[:32]


def tokenizer_identity(tokenizer: Any) -> dict[str, Any] | None:
    """What fixes a tokenizer's ids, or None for a class this cache cannot vouch for (not cached then)."""
    bpe = sys.modules.get("llmtrain.data.bpe")      # imported wherever a TokenizerFile exists
    if type(tokenizer) is byte_tokenizer.ByteTokenizer:
        what = {"class": "ByteTokenizer", "code": BYTE_CODE}
    elif bpe is not None and type(tokenizer) is bpe.TokenizerFile:
        what = {"class": "TokenizerFile", "code": source_digest(bpe), "tokenizers": version("tokenizers"),
                "state": hashlib.sha256(tokenizer.hf.to_str().encode()).hexdigest(),   # as loaded, vocab and all
                "config": tokenizer.config}
    else:
        return None
    return {**what, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id,
            "vocab_size": tokenizer.vocab_size, "special": tokenizer.special_tokens}


BYTE_CODE = source_digest(byte_tokenizer)
PYTHON = list(sys.version_info[:2])         # random.Random's methods are only promised per version


class Cache:
    """Files in `folder`, each named by a key; `folder=None` turns caching off (reads miss, writes do nothing).

    Args:
        folder: Where the entries live; made on the first write.
        max_bytes: After a write, the least recently used other entries are deleted down to this size.
    """

    def __init__(self, folder: Path | None, max_bytes: int = MAX_BYTES) -> None:
        self.folder, self.max_bytes = folder, max_bytes

    def read(self, name: str, load: Callable[[Path], T]) -> T | None:
        """`load(path)` of the entry, or None when it is missing or unreadable."""
        if self.folder is None:
            return None
        path = self.folder / name
        try:
            value = load(path)
        except FileNotFoundError:
            return None
        except Exception as error:          # any damage (truncated, garbled, wrong shape) just means a rebuild
            log.debug("ignoring the unreadable cache entry %s (%s: %s)", path, type(error).__name__, error)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)                  # the modification time orders entries for `_prune`
        return value

    def write(self, name: str, data: bytes) -> None:
        """Store `data` as the entry `name`, atomically; on any OS error, log it and go on without."""
        if self.folder is None:
            return
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(tmp, self.folder / name)
        except OSError as error:
            log.debug("not caching %s in %s (%s)", name, self.folder, error)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            return
        self._prune(keep=name)

    def _prune(self, keep: str) -> None:
        """Delete the least recently used entries (never `keep`, nor another process's .tmp file) past max_bytes."""
        try:
            entries = sorted((p.stat().st_mtime, p.stat().st_size, p) for p in self.folder.iterdir()
                             if not p.name.startswith("."))
        except OSError:                     # e.g. an entry deleted meanwhile by another process's prune
            return
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                return
            if path.name != keep:
                with contextlib.suppress(OSError):
                    path.unlink()
                total -= size


def examples_bytes(examples: list[Example]) -> bytes:
    """JSON: the field names, then one list of field values per example (ASCII escapes: any str round-trips)."""
    rows = [[getattr(e, name) for name in EXAMPLE_FIELDS] for e in examples]
    return json.dumps({"fields": EXAMPLE_FIELDS, "rows": rows}).encode()


def load_examples(path: Path) -> list[Example]:
    value = json.loads(path.read_bytes())
    if value["fields"] != EXAMPLE_FIELDS:
        raise ValueError(f"fields {value['fields']}, expected {EXAMPLE_FIELDS}")
    return [Example(*row) for row in value["rows"]]


def tensors_bytes(tensors: dict[str, Tensor]) -> bytes:
    return safetensors.torch.save({name: t.contiguous() for name, t in tensors.items()})


def load_tensors(path: Path) -> dict[str, Tensor]:
    return safetensors.torch.load_file(path)
