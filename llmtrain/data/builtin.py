"""The default data source: the built-in synthetic task (llmtrain.data.synthetic), no files needed.

One source serves four batch formats, chosen by the strategy:

- "text" (pre-training): each example is the document `<bos>{prompt} Answer: {answer}<eos>` (with
  the Chinese answer prefix in Chinese, see synthetic.ANSWER_PREFIX), packed into rows of
  `seq_len` tokens.
- "chat" (SFT): the conversation user: prompt / assistant: answer, through the chat template, one
  right-padded row per example; only the answer and its closing token are targets.
- "preference" (DPO): the same prompt with the correct answer (chosen) and the example's plausible
  wrong answer (rejected).
- "prompts" (GRPO): the chat prompt ending in the assistant marker (row i of a batch of 2B rows)
  and the reference answer's tokens (row B + i), for the strategy to sample and score completions;
  labels equal the ids on every real token (llmtrain.strategies.rollout.split_prompts).

The held-out examples give eval/loss (in the same format) and eval/accuracy: their questions are
decoded greedily, as a text prompt `<bos>{prompt} Answer: ` for "text" and as a chat prompt ending
in the assistant marker otherwise, and the stripped text before <eos> must equal the answer.

Generating and tokenizing 100,000 examples takes 1.5-3 s, so both are cached on disk
(llmtrain.data.cache): the first run on a machine writes the examples (JSON) and the batch tensors
(safetensors); later runs read them back in tens of milliseconds (`cache=False` turns this off).
The key covers every argument the data depends on, the tokenizer, the chat template and the source
of the modules that generate, encode and pack, so a changed input never reads a stale entry.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path

import torch
from torch import Tensor, nn

from llmtrain.data import cache as data_cache
from llmtrain.data import chat, packing, padded, synthetic
from llmtrain.data.cache import (PYTHON, Cache, cache_root, digest, examples_bytes, load_examples, load_tensors,
                                 source_digest, tensors_bytes, tokenizer_identity)
from llmtrain.data.chat import JinjaTemplate, Message, make_template
from llmtrain.data.packing import RowBatches, pack_documents
from llmtrain.data.padded import PaddedBatches
from llmtrain.data.splits import Splits, check_sizes
from llmtrain.data.synthetic import (DEFAULT_TASKS, LANGUAGES, Example, check_choices, question,
                                     split_examples)
from llmtrain.data.tokenizer import ByteTokenizer, decode_sampled
from llmtrain.generate import greedy_decode
from llmtrain.thinking_decode import thinking_decoder

# The code each cached part depends on (this file included): editing it renames the entries.
EXAMPLES_CODE = source_digest(synthetic, data_cache, sys.modules[__name__])
ENCODING_CODE = {"text": source_digest(packing), "chat": source_digest(chat, padded)}
PADDED_STATE = ("ids", "is_target", "lengths_NK")      # what PaddedBatches derives from its units
Batches = RowBatches | PaddedBatches


class BuiltinTask(Splits):
    """Bilingual arithmetic and string questions with a disjoint held-out split.

    Args:
        tokenizer: Encodes the documents (the byte-level default needs no files).
        seed: Fixes the examples and, with the epoch, the batch order.
        n_train: Training examples.
        n_eval: Held-out examples (distinct prompts that never occur in training).
        tasks: Task names from llmtrain.data.synthetic.TASKS (None: its DEFAULT_TASKS, the set
            calibrated for the tiny CPU model).
        languages: Any of "en", "zh".
        seq_len: Tokens per packed row.
        batch_size: Rows per training batch.
        eval_batch_size: Rows per held-out batch.
        accuracy_examples: Held-out questions decoded for eval/accuracy (0: skip).
        max_new_tokens: Decoding limit for one answer.
        chat_template: Jinja source for "chat"/"preference" (None: the tokenizer's own template, else
            the special-token default of llmtrain.data.chat).
        cache: Keep the generated examples and batches on disk (llmtrain.data.cache.cache_root()/builtin)
            and read them back on the next run with the same key.
    """

    formats: tuple[str, ...] = ("text", "chat", "preference", "prompts")

    def __init__(self, tokenizer: ByteTokenizer, seed: int = 0, n_train: int = 100_000, n_eval: int = 1000,
                 tasks: Sequence[str] | None = None, languages: Sequence[str] = LANGUAGES, seq_len: int = 128,
                 batch_size: int = 32, eval_batch_size: int = 64, accuracy_examples: int = 200,
                 max_new_tokens: int = 16, chat_template: str | None = None, cache: bool = True) -> None:
        self.tasks = list(DEFAULT_TASKS) if tasks is None else list(tasks)
        self.languages = list(languages)
        check_choices(self.tasks, self.languages)
        _check_positive(n_train=n_train, n_eval=n_eval, max_new_tokens=max_new_tokens)
        check_sizes(seq_len, batch_size, eval_batch_size)
        if accuracy_examples < 0:
            raise ValueError(f"data.accuracy_examples={accuracy_examples} must be >= 0")
        self.tokenizer, self.seed = tokenizer, seed
        self.n_train, self.n_eval, self.seq_len = n_train, n_eval, seq_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.accuracy_examples, self.max_new_tokens = accuracy_examples, max_new_tokens
        self.chat_template, self.template = chat_template, make_template(tokenizer, chat_template)
        root = cache_root() if cache else None
        self.cache = Cache(None if root is None else root / "builtin")
        self.format = "text"
        self.last_predictions: list[tuple[Example, str]] = []
        self._train_examples: list[Example] | None = None

    def setup(self, format: str) -> None:
        """Generate and tokenize the examples for the strategy's batch `format`, or read them from the cache."""
        if format not in self.formats:
            raise ValueError(f"the strategy consumes '{format}' batches, but data=builtin ({type(self).__name__}) "
                             f"serves only {self.formats}")
        self.format = format
        self._train_examples = None
        name = self._batches_name()
        self.eval_examples = self.cache.read(f"{self._examples_key()}-eval.json", load_examples)
        batches = None
        if name is not None and self.eval_examples is not None:
            batches = self.cache.read(name, self._restore)
        if batches is None:
            self._train_examples, self.eval_examples = self._examples()
            batches = (self._batches(self._train_examples, self.batch_size),
                       self._batches(self.eval_examples, self.eval_batch_size))
            if name is not None:
                self.cache.write(name, tensors_bytes(self._state(*batches)))
        self.train, self.eval = batches
        if len(self.train) == 0:
            unit = "rows of seq_len=" + str(self.seq_len) if format == "text" else format + " examples"
            raise ValueError(f"data.n_train={self.n_train} examples give fewer {unit} than one batch of "
                             f"batch_size={self.batch_size}")

    @property
    def train_examples(self) -> list[Example]:
        """The training examples. A warm start leaves them on disk until asked for (100,000 take ~0.2 s to build)."""
        if self._train_examples is None:
            self._train_examples = self._examples()[0]
        return self._train_examples

    def _examples(self) -> tuple[list[Example], list[Example]]:
        """(train, held-out) examples from the cache, else generated and cached."""
        key = self._examples_key()
        train = self.cache.read(f"{key}-train.json", load_examples)
        held_out = self.cache.read(f"{key}-eval.json", load_examples) if train is not None else None
        if train is None or held_out is None:
            train, held_out = split_examples(self.seed, self.n_train, self.n_eval, self.tasks, self.languages)
            self.cache.write(f"{key}-train.json", examples_bytes(train))
            self.cache.write(f"{key}-eval.json", examples_bytes(held_out))
        return train, held_out

    def _examples_key(self) -> str:
        return digest({"seed": self.seed, "n_train": self.n_train, "n_eval": self.n_eval, "tasks": self.tasks,
                       "languages": self.languages, "python": PYTHON, "code": EXAMPLES_CODE})

    def _batches_name(self) -> str | None:
        """The file of this format's batch tensors; None when caching is off or the tokenizer is not identifiable."""
        tokenizer = tokenizer_identity(self.tokenizer) if self.cache.folder is not None else None
        if tokenizer is None:
            return None
        if self.format == "text":
            encoding = {"seq_len": self.seq_len, "code": ENCODING_CODE["text"]}
        else:
            jinja = isinstance(self.template, JinjaTemplate)
            encoding = {"template": type(self.template).__name__, "chat_template": self.chat_template,
                        "tokenizer_template": getattr(self.tokenizer, "chat_template", None),
                        "jinja2": version("jinja2") if jinja else None, "code": ENCODING_CODE["chat"]}
        key = {"examples": self._examples_key(), "format": self.format, "tokenizer": tokenizer, **encoding}
        return f"{digest(key)}-{self.format}.safetensors"

    def _batches(self, examples: list[Example], batch_size: int) -> Batches:
        if self.format == "text":
            return RowBatches(self._pack(examples), batch_size, self.seed)
        return PaddedBatches(self._units(examples), batch_size, self.seed, self.tokenizer.pad_id)

    def _state(self, train: Batches, held_out: Batches) -> dict[str, Tensor]:
        """The tensors that make up both splits' batches, e.g. "train/rows_NT"."""
        return {f"{split}/{name}": getattr(batches, name) for split, batches in (("train", train), ("eval", held_out))
                for name in self._state_names()}

    def _state_names(self) -> tuple[str, ...]:
        return ("rows_NT",) if self.format == "text" else PADDED_STATE

    def _restore(self, path: Path) -> tuple[Batches, Batches]:
        """The (train, held-out) batches saved by `_state`; raises on anything inconsistent (the entry is rebuilt)."""
        state = load_tensors(path)
        return tuple(self._restore_split({name: state[f"{split}/{name}"] for name in self._state_names()}, size)
                     for split, size in (("train", self.batch_size), ("eval", self.eval_batch_size)))

    def _restore_split(self, state: dict[str, Tensor], batch_size: int) -> Batches:
        if self.format != "text":
            return restore_padded(state, batch_size, self.seed, self.tokenizer.pad_id)
        rows_NT = state["rows_NT"]
        if rows_NT.dtype != torch.long or rows_NT.ndim != 2 or rows_NT.shape[1] != self.seq_len:
            raise ValueError(f"rows {tuple(rows_NT.shape)} {rows_NT.dtype}, expected int64 (N, {self.seq_len})")
        return RowBatches(rows_NT, batch_size, self.seed)

    def _pack(self, examples: list[Example]) -> Tensor:
        # The question and the answer are encoded apart, so that a document starts with exactly the
        # ids `prompt_ids` gives at evaluation: a BPE tokenizer would otherwise merge the space after
        # "Answer:" into the answer's first token, and the eval prompt (ending in a lone space token)
        # would be a token sequence training never showed. The byte tokenizer gives the same ids either way.
        docs = [self.tokenizer.encode(question(e), bos=True) + self.tokenizer.encode(e.answer, eos=True)
                for e in examples]
        rows_NT = pack_documents(docs, self.seq_len)
        if len(rows_NT) == 0:
            raise ValueError(f"{len(examples)} examples do not fill one row of seq_len={self.seq_len} tokens")
        return rows_NT

    def _units(self, examples: list[Example]) -> list[list[tuple[list[int], list[int]]]]:
        """One chat per example, or a (chosen, rejected) pair whose targets are the answers only."""
        if self.format == "chat":
            return [[self.template.encode([user(e), assistant(e.answer)])] for e in examples]
        if self.format == "prompts":
            return [[every_token(self.template.encode_prompt([user(e)])), every_token(self.tokenizer.encode(e.answer))]
                    for e in examples]
        return [[self.template.encode([user(e), assistant(answer)], first_target=1) for answer in (e.answer, e.wrong)]
                for e in examples]

    def prompt_ids(self, example: Example) -> list[int]:
        """The held-out question as the model was trained to see it (text or chat prompt)."""
        if self.format == "text":
            return self.tokenizer.encode(question(example), bos=True)
        return self.template.encode_prompt([user(example)])

    def add_column(self, name: str, compute: Callable[[dict[str, Tensor]], Tensor]) -> None:
        """Attach `compute(batch)` per example to the train and held-out batches (e.g. reference log-probs)."""
        if self.format == "text":
            raise ValueError(f"data.add_column({name!r}): packed text rows have no per-example columns")
        self.train.add_column(name, compute)
        self.eval.add_column(name, compute)

    def predictions(self, model: nn.Module, device: torch.device | str) -> list[tuple[Example, str]]:
        """Greedy answers (stripped text before <eos>) to the first `accuracy_examples` held-out questions."""
        examples = self.eval_examples[:self.accuracy_examples]
        prompts = [self.prompt_ids(e) for e in examples]
        was_training = model.training
        model.eval()
        try:
            outputs = greedy_decode(model, prompts, self.max_new_tokens, self.tokenizer.eos_id, device,
                                    thinking=thinking_decoder(model, self.tokenizer))   # HRPO: as trained
        finally:
            model.train(was_training)
        return [(e, decode_sampled(self.tokenizer, ids).strip()) for e, ids in zip(examples, outputs)]

    def task_metrics(self, model: nn.Module, device: torch.device | str) -> dict[str, float]:
        """Exact-match accuracy of greedy answers: `accuracy` and `accuracy/<lang>` per language."""
        if self.accuracy_examples == 0:
            return {}
        self.last_predictions = self.predictions(model, device)
        scored = [(e.lang, answer == e.answer) for e, answer in self.last_predictions]
        metrics = {"accuracy": sum(ok for _, ok in scored) / len(scored)}
        for lang in self.languages:
            hits = [ok for example_lang, ok in scored if example_lang == lang]
            if hits:
                metrics[f"accuracy/{lang}"] = sum(hits) / len(hits)
        return metrics

    def samples(self, n: int) -> list[dict[str, str]]:
        """Up to `n` rows of the last `task_metrics` call, for logs (empty before the first one)."""
        return [{"task": e.task, "lang": e.lang, "prompt": e.prompt, "expected": e.answer, "predicted": answer}
                for e, answer in self.last_predictions[:n]]


def user(example: Example) -> Message:
    return {"role": "user", "content": example.prompt}


def assistant(answer: str) -> Message:
    return {"role": "assistant", "content": answer}


def every_token(ids: list[int]) -> tuple[list[int], list[int]]:
    """A "prompts" row: labels mark every token as real, so the length survives right padding."""
    return ids, ids


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"data.{name}={value} must be >= 1")


def restore_padded(state: dict[str, Tensor], batch_size: int, seed: int, pad_id: int) -> PaddedBatches:
    """PaddedBatches from its cached tensors, without flattening millions of Python ints again (~0.5 s)."""
    return PaddedBatches.from_tensors(state["ids"], state["is_target"], state["lengths_NK"], batch_size, seed, pad_id)
