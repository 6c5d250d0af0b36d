"""Byte-level BPE tokenizers: train one on your own files, or load any tokenizer.json / HF tokenizer folder.

`train_bpe` learns merges with the `tokenizers` library in GPT-2's byte-level scheme: all 256
bytes are in the initial alphabet, so any text encodes, and decoding gives back the exact text
(Chinese, emoji, runs of spaces and newlines included). `TokenizerFile` wraps a trained or
downloaded tokenizer in ByteTokenizer's interface, so every data source takes either one.

One difference from ByteTokenizer: the literal text of a special token (e.g. "<eos>" typed in a
document) is read as that special token, as Hugging Face does. Chat templates rely on it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llmtrain.data.records import RecordError, read_records, read_text
from llmtrain.data.tokenizer import SPECIAL_TOKENS

TRAIN_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Row fields whose strings are training text: pre-training, chat and preference shapes (DESIGN 6).
TEXT_FIELDS = ("text", "prompt", "response", "completion", "answer", "chosen", "rejected", "messages", "conversations")
CONTENT_KEYS = ("content", "value")     # {"role", "content"} messages; ShareGPT {"from", "value"} turns
ADD_TOKEN_FLAGS = ("add_bos_token", "add_eos_token")


def train_bpe(files: Sequence[str | Path], vocab_size: int, special_tokens: Sequence[str] = SPECIAL_TOKENS,
              min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE tokenizer learned from `files`; special token k gets id k.

    Args:
        files: .txt files (each one document) and .jsonl / .parquet files (the strings of each
            row's TEXT_FIELDS, message contents included).
        vocab_size: total ids, special tokens and the 256 byte tokens included.
        min_frequency: a pair seen fewer times is never merged.
    """
    paths = [Path(f) for f in files]
    for path in paths:
        if path.suffix not in TRAIN_SUFFIXES:
            raise ValueError(f"{path}: expected one of {TRAIN_SUFFIXES}")
        if not path.is_file():
            raise ValueError(f"{path} does not exist")
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special tokens must be distinct, got {list(special_tokens)}")
    smallest = len(special_tokens) + 256
    if vocab_size < smallest:
        raise ValueError(f"vocab_size={vocab_size} is below {smallest}: the {len(special_tokens)} special "
                         "tokens plus the 256 byte tokens")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_texts(paths), trainer)
    return tokenizer


def training_texts(paths: Iterable[Path]) -> Iterator[str]:
    """Every training string of `paths`; a row with no text is reported as file:line."""
    for path in paths:
        if path.suffix == ".txt":
            yield read_text(path)
            continue
        for where, row in read_records(path):
            texts = [text for field in TEXT_FIELDS if field in row for text in strings(row[field])]
            if not texts:
                raise RecordError(where, f"no text in any of the fields {TEXT_FIELDS} (keys: {sorted(row)})")
            yield from texts


def strings(value: Any) -> Iterator[str]:
    """The strings in a field: itself, the items of a list, the content/value of a message."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)
    elif isinstance(value, dict):
        for key in CONTENT_KEYS:
            yield from strings(value.get(key))


def tokenizer_config(tokenizer: Tokenizer, bos: str | None, eos: str, pad: str | None) -> dict[str, Any]:
    """The tokenizer_config.json that names the special tokens (loadable with transformers.AutoTokenizer)."""
    for name in (bos, eos, pad):
        if name is not None and tokenizer.token_to_id(name) is None:
            raise ValueError(f"special token {name!r} is not in the vocabulary")
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
            "pad_token": pad if pad is not None else eos, "add_bos_token": bos is not None,   # see write_tokenizer_dir
            "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000}


def write_tokenizer_dir(tokenizer: Tokenizer, config: dict[str, Any], out_dir: Path) -> None:
    """tokenizer.json and tokenizer_config.json in `out_dir` (which must exist).

    Every llmtrain model is trained and prompted with the bos token first (when the tokenizer has
    one), so when `config` names a bos_token, tokenizer.json gets a post-processor that adds it, as
    Hugging Face Llama tokenizers do: transformers' `tokenizer(text)` then gives the ids the model
    expects (recent transformers ignore `add_bos_token` and follow the post-processor). llmtrain's
    own `TokenizerFile.encode` never applies a post-processor, so its ids do not change.
    """
    if config.get("bos_token") is not None:
        tokenizer = bos_first(tokenizer, config["bos_token"])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def bos_first(tokenizer: Tokenizer, bos: str) -> Tokenizer:
    """A copy of `tokenizer` whose post-processor puts `bos` before each sequence ("<bos> $A")."""
    copy = Tokenizer.from_str(tokenizer.to_str())     # the caller's tokenizer (cache keys hash it) stays as it was
    copy.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return copy


class TokenizerFile:
    """A tokenizer.json (or a HF tokenizer folder) with ByteTokenizer's interface.

    bos/eos/pad come from tokenizer_config.json (next to tokenizer.json) when it names them, else
    from the tokens "<bos>", "<eos>", "<pad>" if the vocabulary has them. An end-of-sequence token
    is required; pad falls back to eos; without a bos token, `encode(bos=True)` raises.

    Args:
        path: a tokenizer.json file, or a folder holding tokenizer.json (+ tokenizer_config.json).
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.file = self.path / "tokenizer.json" if self.path.is_dir() else self.path
        if not self.file.is_file():
            raise ValueError(f"tokenizer path {path}: {self.file} does not exist")
        try:
            self.hf = Tokenizer.from_file(str(self.file))
        except Exception as error:          # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"{self.file} is not a `tokenizers` tokenizer.json ({error})") from None
        self.config = read_json(self.file.parent / "tokenizer_config.json")
        self.special_tokens = {t.content: i for i, t in sorted(self.hf.get_added_tokens_decoder().items())
                               if t.special}
        self.eos_id = self._token_id("eos_token", "<eos>")
        if self.eos_id is None:
            raise ValueError(f"{self.file}: no end-of-sequence token; set eos_token in tokenizer_config.json "
                             "or add <eos> to the special tokens")
        self.bos_id = self._token_id("bos_token", "<bos>")
        pad_id = self._token_id("pad_token", "<pad>")
        self.pad_id = self.eos_id if pad_id is None else pad_id
        self.chat_template = read_chat_template(self.config, self.file.parent)
        self._vocab_size = max(self.hf.get_vocab(with_added_tokens=True).values()) + 1

    def _token_id(self, key: str, default: str) -> int | None:
        """The id of the token tokenizer_config.json names under `key`, else of `default` if present."""
        value = self.config.get(key)
        name = value.get("content") if isinstance(value, dict) else value
        if name is None:
            return self.hf.token_to_id(default)
        token_id = self.hf.token_to_id(name)
        if token_id is None:
            raise ValueError(f"{self.file.parent / 'tokenizer_config.json'}: {key} {name!r} is not in the vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        """One more than the largest id, added tokens included."""
        return self._vocab_size

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally wrapped in bos ... eos (the file's own post-processor is not applied)."""
        if bos and self.bos_id is None:
            raise ValueError(f"{self.file} has no beginning-of-sequence token (bos_token in tokenizer_config.json, "
                             "or <bos>), so it cannot encode with bos=True")
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; with `skip_special=False` special tokens are written as their names."""
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids_N.size and not np.all((ids_N >= 0) & (ids_N < self.vocab_size)):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {ids_N.min()}..{ids_N.max()}")
        return self.hf.decode(ids_N.tolist(), skip_special_tokens=skip_special)

    def save(self, out_dir: Path) -> None:
        """tokenizer.json and tokenizer_config.json in `out_dir`, e.g. for `llmtrain export hf`."""
        names = {key: None if i is None else self.hf.id_to_token(i)
                 for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id))}
        config = tokenizer_config(self.hf, bos=names["bos_token"], eos=names["eos_token"], pad=names["pad_token"])
        # Keep the file's other settings, but not its add_*_token flags: the bos post-processor decides
        # that (transformers 4's LlamaTokenizerFast rebuilds the post-processor from these flags).
        config |= {k: v for k, v in self.config.items() if k not in names and k not in ADD_TOKEN_FLAGS}
        if self.chat_template is not None and "chat_template" not in config:     # it came from chat_template.jinja
            config["chat_template"] = self.chat_template
        write_tokenizer_dir(self.hf, config, Path(out_dir))


def read_json(path: Path) -> dict[str, Any]:
    """The object in a JSON file, or {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_chat_template(config: dict[str, Any], folder: Path) -> str | None:
    """tokenizer_config.json's chat_template (its "default" one if named), else chat_template.jinja, else None."""
    template = config.get("chat_template")
    if isinstance(template, list):         # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template
