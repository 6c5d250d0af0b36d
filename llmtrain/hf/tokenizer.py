"""The byte-level tokenizer as Hugging Face tokenizer files (tokenizer.json + tokenizer_config.json).

HF has no "bytes offset by 8" model, but a byte-level BPE with no merges is exactly that: the
ByteLevel pre-tokenizer maps every byte to one printable character (GPT-2's table), and the BPE
vocabulary maps that character to id 8 + byte. The special tokens keep ids 0-7. The one behaviour
that differs: HF recognises a special token's literal text (e.g. "<eos>") inside a string, while
ByteTokenizer encodes such text as plain bytes. Like every exported tokenizer (bpe.write_tokenizer_dir),
`tokenizer(text)` in transformers starts with <bos>, as the model was trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from llmtrain.data.bpe import tokenizer_config, write_tokenizer_dir
from llmtrain.data.tokenizer import BYTE_OFFSET, SPECIAL_TOKENS, ByteTokenizer


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (what ByteLevel emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def byte_tokenizer_json(tokenizer: ByteTokenizer) -> Tokenizer:
    """A `tokenizers.Tokenizer` that gives the same ids as `tokenizer` for text without special-token names."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab |= {char: BYTE_OFFSET + b for b, char in _byte_to_char().items()}
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    if hf.get_vocab_size() != tokenizer.vocab_size:
        raise AssertionError(f"HF byte tokenizer has {hf.get_vocab_size()} ids, expected {tokenizer.vocab_size}")
    return hf


def write_tokenizer_files(tokenizer: ByteTokenizer | Any, out_dir: Path) -> None:
    """tokenizer.json and tokenizer_config.json, loadable with transformers.AutoTokenizer.

    A tokenizer that has its own files (llmtrain.data.bpe.TokenizerFile) writes them with `save`.
    """
    if hasattr(tokenizer, "save"):
        tokenizer.save(out_dir)
        return
    hf = byte_tokenizer_json(tokenizer)
    names = {i: token for token, i in tokenizer.special_tokens.items()}
    config = tokenizer_config(hf, bos=names[tokenizer.bos_id], eos=names[tokenizer.eos_id], pad=names[tokenizer.pad_id])
    write_tokenizer_dir(hf, config, out_dir)
