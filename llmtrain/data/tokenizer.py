"""The zero-file default tokenizer: UTF-8 bytes plus a few special tokens.

Ids 0-7 are special tokens and id 8 + b is byte b, so the vocabulary has 264 entries. Any text,
Chinese or English, round-trips exactly, and nothing has to be trained or downloaded. Encoding
and decoding go through numpy, not a Python loop per byte, because the built-in data encodes
millions of bytes at setup.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# <|system|> ... </think> are reserved for the chat and latent-reasoning formats.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<think>", "</think>")
BYTE_OFFSET = len(SPECIAL_TOKENS)


def decode_sampled(tokenizer: Any, ids: Sequence[int], skip_special: bool = True) -> str:
    """Text of sampled `ids`, those past the tokenizer's vocabulary dropped.

    A model's embedding may have rows no token owns (model.vocab_size above the tokenizer's, as in
    many Hugging Face checkpoints, padded to a multiple of 64 or 128); sampling can draw one, and it
    has no text. transformers' decode drops such ids too; `decode` itself refuses them, since in
    data they mean a tokenizer mismatch."""
    known = tokenizer.vocab_size
    return tokenizer.decode([i for i in ids if i < known], skip_special=skip_special)


class ByteTokenizer:
    """UTF-8 byte-level tokenizer; `special_tokens` maps each special token to its id."""

    special_tokens = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    pad_id, bos_id, eos_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        """Special tokens plus the 256 byte values."""
        return BYTE_OFFSET + 256

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally wrapped in <bos> ... <eos>."""
        raw = text.encode("utf-8")
        if len(raw) < 512:       # a chat turn: a comprehension beats numpy's per-call overhead
            ids = [BYTE_OFFSET + b for b in raw]
        else:
            ids = (np.frombuffer(raw, dtype=np.uint8).astype(np.int64) + BYTE_OFFSET).tolist()
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 (e.g. a cut multi-byte character) decodes as U+FFFD.

        With `skip_special=False` each special token is written as its name, e.g. "<eos>".
        """
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not np.all((ids_N >= 0) & (ids_N < self.vocab_size)):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {ids_N.min()}..{ids_N.max()}")
        is_special_N = ids_N < BYTE_OFFSET
        if skip_special:
            return _utf8(ids_N[~is_special_N])
        # Bytes between two special tokens decode as one run, so a multi-byte character survives.
        cuts = np.flatnonzero(is_special_N)
        pieces, begin = [], 0
        for cut in cuts:
            pieces += [_utf8(ids_N[begin:cut]), SPECIAL_TOKENS[ids_N[cut]]]
            begin = cut + 1
        pieces.append(_utf8(ids_N[begin:]))
        return "".join(pieces)


def _utf8(byte_ids_N: np.ndarray) -> str:
    return (byte_ids_N - BYTE_OFFSET).astype(np.uint8).tobytes().decode("utf-8", errors="replace")
