"""The zero-file default tokenizer: UTF-8 bytes plus a few special tokens.

Ids 0-7 are special tokens, id 8 + b is byte b, so the vocabulary has 264 entries. Any text,
Chinese or English, round-trips exactly, and nothing has to be trained or downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<think>", "</think>")
BYTE_OFFSET = len(SPECIAL_TOKENS)


class ByteTokenizer:
    """UTF-8 byte-level tokenizer; `special_tokens` maps each special token to its id."""

    special_tokens = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = BYTE_OFFSET + 256

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally wrapped in <bos> ... <eos>."""
        ids = (np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + BYTE_OFFSET).tolist()
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 (e.g. a cut multi-byte character) decodes as U+FFFD."""
        pieces, run = [], bytearray()
        for i in ids:
            if i >= BYTE_OFFSET:
                run.append(i - BYTE_OFFSET)
                continue
            if not skip_special:
                pieces.append(run.decode("utf-8", errors="replace") + SPECIAL_TOKENS[i])
                run = bytearray()
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)
