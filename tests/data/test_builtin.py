"""BuiltinTask: resumable batch order, format checks, exact-match accuracy."""

from __future__ import annotations

import pytest
import torch

from llmtrain.data.builtin import BuiltinTask
from llmtrain.data.synthetic import question
from llmtrain.data.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def data() -> BuiltinTask:
    task = BuiltinTask(ByteTokenizer(), seed=0, n_train=2000, n_eval=64, seq_len=64, batch_size=8,
                       accuracy_examples=24)
    task.setup("text")
    return task


class Oracle(torch.nn.Module):
    """Puts all its mass on the next token of the correct answer (or on byte 0 when lost)."""

    def __init__(self, targets: list[list[int]], vocab_size: int) -> None:
        super().__init__()
        self.next = {tuple(t[:i]): t[i] for t in targets for i in range(1, len(t))}
        self.vocab_size = vocab_size

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids_BT.shape, self.vocab_size)
        for b, row in enumerate(ids_BT.tolist()):
            logits[b, -1, self.next.get(tuple(row), 8)] = 1.0
        return logits


def test_start_skips_to_the_same_batches(data):
    full = list(data.train_batches(epoch=1))
    resumed = list(data.train_batches(epoch=1, start=5))
    assert len(full) == data.num_batches() and len(resumed) == len(full) - 5
    for a, b in zip(full[5:], resumed):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_epochs_are_shuffled_differently_and_reproducibly(data):
    first = next(data.train_batches(0))["input_ids"]
    assert not torch.equal(first, next(data.train_batches(1))["input_ids"])
    assert torch.equal(first, next(data.train_batches(0))["input_ids"])


def test_text_batches_are_packed_documents(data):
    batch = next(data.train_batches(0))
    assert batch["input_ids"].shape == (8, 64) and torch.equal(batch["labels"], batch["input_ids"])
    assert sum(len(b["input_ids"]) for b in data.eval_batches()) == len(data.eval.rows_NT)


def test_a_format_it_cannot_serve_is_refused_naming_both():
    with pytest.raises(ValueError, match="'preference'.*data=builtin"):
        BuiltinTask(ByteTokenizer(), n_train=10, n_eval=10).setup("preference")


def test_oracle_scores_one_and_a_random_model_zero(data):
    tok = data.tokenizer
    targets = [tok.encode(question(e) + e.answer, bos=True, eos=True) for e in data.eval_examples]
    assert data.task_metrics(Oracle(targets, tok.vocab_size), "cpu")["accuracy"] == 1.0
    torch.manual_seed(0)
    metrics = data.task_metrics(RandomModel(tok.vocab_size), "cpu")
    assert metrics["accuracy"] == 0.0 and set(metrics) == {"accuracy", "accuracy/en", "accuracy/zh"}


class RandomModel(torch.nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return torch.randn(*ids_BT.shape, self.vocab_size)


@pytest.mark.parametrize("kwargs, match", [({"batch_size": 0}, "batch_size=0"), ({"tasks": ["chess"]}, "chess")])
def test_bad_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BuiltinTask(ByteTokenizer(), **kwargs)
