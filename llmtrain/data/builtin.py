"""The default data source: the built-in synthetic task (llmtrain.data.synthetic), no files needed.

One source serves three batch formats, chosen by the strategy:

- "text" (pre-training): each example is the document `<bos>{prompt} Answer: {answer}<eos>` (with
  the Chinese answer prefix in Chinese, see synthetic.ANSWER_PREFIX), packed into rows of
  `seq_len` tokens.
- "chat" (SFT): the conversation user: prompt / assistant: answer, through the chat template, one
  right-padded row per example; only the answer and its closing token are targets.
- "preference" (DPO): the same prompt with the correct answer (chosen) and the example's plausible
  wrong answer (rejected).

The held-out examples give eval/loss (in the same format) and eval/accuracy: their questions are
decoded greedily, as a text prompt `<bos>{prompt} Answer: ` for "text" and as a chat prompt ending
in the assistant marker otherwise, and the stripped text before <eos> must equal the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from llmtrain.data.chat import Message, make_template
from llmtrain.data.packing import RowBatches, pack_documents
from llmtrain.data.padded import PaddedBatches
from llmtrain.data.synthetic import (DEFAULT_TASKS, LANGUAGES, Example, check_choices, document, question,
                                     split_examples)
from llmtrain.data.tokenizer import ByteTokenizer
from llmtrain.generate import greedy_decode


class BuiltinTask:
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
    """

    formats: tuple[str, ...] = ("text", "chat", "preference")

    def __init__(self, tokenizer: ByteTokenizer, seed: int = 0, n_train: int = 100_000, n_eval: int = 1000,
                 tasks: Sequence[str] | None = None, languages: Sequence[str] = LANGUAGES, seq_len: int = 128,
                 batch_size: int = 32, eval_batch_size: int = 64, accuracy_examples: int = 200,
                 max_new_tokens: int = 16, chat_template: str | None = None) -> None:
        self.tasks = list(DEFAULT_TASKS) if tasks is None else list(tasks)
        self.languages = list(languages)
        check_choices(self.tasks, self.languages)
        _check_positive(n_train=n_train, n_eval=n_eval, seq_len=seq_len, batch_size=batch_size,
                        eval_batch_size=eval_batch_size, max_new_tokens=max_new_tokens)
        if accuracy_examples < 0:
            raise ValueError(f"data.accuracy_examples={accuracy_examples} must be >= 0")
        self.tokenizer, self.seed = tokenizer, seed
        self.n_train, self.n_eval, self.seq_len = n_train, n_eval, seq_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.accuracy_examples, self.max_new_tokens = accuracy_examples, max_new_tokens
        self.template = make_template(tokenizer, chat_template)
        self.format = "text"
        self.last_predictions: list[tuple[Example, str]] = []

    def setup(self, format: str) -> None:
        """Generate and tokenize the examples for the strategy's batch `format`."""
        if format not in self.formats:
            raise ValueError(f"the strategy consumes '{format}' batches, but data=builtin ({type(self).__name__}) "
                             f"serves only {self.formats}")
        self.format = format
        self.train_examples, self.eval_examples = split_examples(
            self.seed, self.n_train, self.n_eval, self.tasks, self.languages)
        if format == "text":
            self.train = RowBatches(self._pack(self.train_examples), self.batch_size, self.seed)
            self.eval = RowBatches(self._pack(self.eval_examples), self.eval_batch_size, self.seed)
        else:
            self.train = PaddedBatches(self._units(self.train_examples), self.batch_size, self.seed,
                                       self.tokenizer.pad_id)
            self.eval = PaddedBatches(self._units(self.eval_examples), self.eval_batch_size, self.seed,
                                      self.tokenizer.pad_id)
        if len(self.train) == 0:
            unit = "rows of seq_len=" + str(self.seq_len) if format == "text" else format + " examples"
            raise ValueError(f"data.n_train={self.n_train} examples give fewer {unit} than one batch of "
                             f"batch_size={self.batch_size}")

    def _pack(self, examples: list[Example]) -> Tensor:
        docs = [self.tokenizer.encode(document(e), bos=True, eos=True) for e in examples]
        rows_NT = pack_documents(docs, self.seq_len)
        if len(rows_NT) == 0:
            raise ValueError(f"{len(examples)} examples do not fill one row of seq_len={self.seq_len} tokens")
        return rows_NT

    def _units(self, examples: list[Example]) -> list[list[tuple[list[int], list[int]]]]:
        """One chat per example, or a (chosen, rejected) pair whose targets are the answers only."""
        if self.format == "chat":
            return [[self.template.encode([user(e), assistant(e.answer)])] for e in examples]
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

    def num_batches(self) -> int:
        """Training batches per epoch (the last incomplete one is dropped)."""
        return len(self.train)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, Tensor]]:
        """Batches `start`, `start + 1`, ... of `epoch`, in an order fixed by (seed, epoch)."""
        return self.train.shuffled(epoch, start)

    def eval_batches(self) -> Iterator[dict[str, Tensor]]:
        """Every held-out row in a fixed order; the last batch may be short."""
        return self.eval.in_order()

    def predictions(self, model: nn.Module, device: torch.device | str) -> list[tuple[Example, str]]:
        """Greedy answers (stripped text before <eos>) to the first `accuracy_examples` held-out questions."""
        examples = self.eval_examples[:self.accuracy_examples]
        prompts = [self.prompt_ids(e) for e in examples]
        was_training = model.training
        model.eval()
        try:
            outputs = greedy_decode(model, prompts, self.max_new_tokens, self.tokenizer.eos_id, device)
        finally:
            model.train(was_training)
        return [(e, self.tokenizer.decode(ids).strip()) for e, ids in zip(examples, outputs)]

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


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"data.{name}={value} must be >= 1")
