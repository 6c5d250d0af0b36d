"""BuiltinTask: packed rows, resumable batch order, format checks, exact-match accuracy."""

from __future__ import annotations

import pytest
import torch

from llmtrain.data.builtin import BuiltinTask
from llmtrain.data.synthetic import question
from llmtrain.data.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def data() -> BuiltinTask:
    task = BuiltinTask(ByteTokenizer(), seed=0, n_train=2000, n_eval=64, seq_len=64, batch_size=8,
                       eval_batch_size=16, accuracy_examples=24)
    task.setup("text")
    return task


class Oracle(torch.nn.Module):
    """Puts all its mass on the next token of the correct answer (or on byte 0 when lost).

    Keeps the generate interface (llmtrain.models.kv_cache): its "cache" is each row's real tokens so far.
    """

    def __init__(self, targets: list[list[int]], vocab_size: int) -> None:
        super().__init__()
        self.next = {tuple(t[:i]): t[i] for t in targets for i in range(1, len(t))}
        self.vocab_size = vocab_size

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> list[list[int]]:
        return [[] for _ in range(batch_size)]

    def forward(self, ids_BT: torch.Tensor, positions=None, attention_mask_BT=None, cache=None,
                logits_to_keep=0) -> torch.Tensor:
        mask_BT = torch.ones_like(ids_BT) if attention_mask_BT is None else attention_mask_BT
        logits_BTV = torch.zeros(*ids_BT.shape, self.vocab_size)
        for b, (row, real) in enumerate(zip(ids_BT.tolist(), mask_BT.tolist())):
            cache[b] += [t for t, keep in zip(row, real) if keep]
            logits_BTV[b, -1, self.next.get(tuple(cache[b]), 8)] = 1.0
        return logits_BTV[:, -logits_to_keep:]


class RandomModel(torch.nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> None:
        return None

    def forward(self, ids_BT: torch.Tensor, positions=None, attention_mask_BT=None, cache=None,
                logits_to_keep=0) -> torch.Tensor:
        return torch.randn(*ids_BT.shape, self.vocab_size)[:, -logits_to_keep:]


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
    ids_BT = batch["input_ids"]
    assert ids_BT.shape == (8, 64) and ids_BT.dtype == torch.int64 and torch.equal(batch["labels"], ids_BT)
    text = data.tokenizer.decode(data.train.rows_NT[:4].flatten().tolist(), skip_special=False)
    assert text.split("<eos><bos>")[1].startswith(data.train_examples[1].prompt)


def test_eval_batches_keep_every_row_in_order(data):
    batches = [b["input_ids"] for b in data.eval_batches()]
    assert all(len(b) == 16 for b in batches[:-1]) and 0 < len(batches[-1]) <= 16
    assert torch.equal(torch.cat(batches), data.eval.rows_NT)


def test_a_format_it_cannot_serve_is_refused_naming_both():
    with pytest.raises(ValueError, match="'prompt'.*data=builtin"):
        BuiltinTask(ByteTokenizer(), n_train=10, n_eval=10).setup("prompt")


def test_oracle_scores_one_and_a_random_model_zero(data):
    tok = data.tokenizer
    targets = [tok.encode(question(e) + e.answer, bos=True, eos=True) for e in data.eval_examples]
    assert data.task_metrics(Oracle(targets, tok.vocab_size), "cpu") == {
        "accuracy": 1.0, "accuracy/en": 1.0, "accuracy/zh": 1.0}
    torch.manual_seed(0)
    assert data.task_metrics(RandomModel(tok.vocab_size), "cpu")["accuracy"] == 0.0


def test_task_metrics_restores_train_mode_and_keeps_samples(data):
    model = RandomModel(data.tokenizer.vocab_size).train()
    data.task_metrics(model, "cpu")
    rows = data.samples(3)
    assert model.training and len(rows) == 3
    assert rows[0]["prompt"] == data.eval_examples[0].prompt and rows[0]["expected"] == data.eval_examples[0].answer


@pytest.mark.parametrize("kwargs, match", [({"batch_size": 0}, "batch_size=0"), ({"tasks": ["chess"]}, "chess"),
                                           ({"accuracy_examples": -1}, "accuracy_examples=-1")])
def test_bad_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BuiltinTask(ByteTokenizer(), **kwargs)


def test_too_little_data_for_one_batch_is_named():
    with pytest.raises(ValueError, match="n_train=20"):
        BuiltinTask(ByteTokenizer(), n_train=20, n_eval=10, batch_size=32).setup("text")


def test_with_a_bpe_tokenizer_the_eval_prompt_is_how_every_training_document_starts(tmp_path):
    """Byte-level BPE merges the space after "Answer:" into the answer's first token when the two are
    encoded together; the eval prompt, which ends at that space, must still be what training saw."""
    from llmtrain.data.bpe import TokenizerFile, tokenizer_config, train_bpe, write_tokenizer_dir
    from llmtrain.data.synthetic import document

    probe = BuiltinTask(ByteTokenizer(), seed=0, n_train=300, n_eval=40, seq_len=64, cache=False)
    probe.setup("text")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(document(e) for e in probe.train_examples), encoding="utf-8")
    bpe = train_bpe([corpus], vocab_size=600)
    (tmp_path / "tok").mkdir()
    write_tokenizer_dir(bpe, tokenizer_config(bpe, bos="<bos>", eos="<eos>", pad="<pad>"), tmp_path / "tok")
    tokenizer = TokenizerFile(str(tmp_path / "tok"))
    english = next(e for e in probe.eval_examples if e.lang == "en")        # "... Answer: 42"
    assert tokenizer.encode(document(english)) != tokenizer.encode(question(english)) + tokenizer.encode(english.answer)

    task = BuiltinTask(tokenizer, seed=0, n_train=300, n_eval=40, seq_len=64, cache=False)
    task.setup("text")
    stream = task.eval.rows_NT.flatten().tolist()
    for example in task.eval_examples[:10]:
        doc = task.prompt_ids(example) + tokenizer.encode(example.answer, eos=True)
        assert any(stream[i:i + len(doc)] == doc for i in range(len(stream) - len(doc) + 1)), example
