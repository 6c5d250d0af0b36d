"""SFT: the loss covers exactly the assistant tokens; accumulation with uneven responses == one batch."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from llmtrain.data.builtin import BuiltinTask
from llmtrain.data.chat import SpecialTokenTemplate
from llmtrain.data.padded import PaddedBatches
from llmtrain.data.tokenizer import ByteTokenizer
from llmtrain.hardware import Hardware
from llmtrain.models.attention_gqa import GQAttention
from llmtrain.models.ffn import SwiGLU
from llmtrain.models.moe import MoE, collect_aux_loss
from llmtrain.models.transformer import Transformer
from llmtrain.optim import adamw
from llmtrain.schedulers import constant
from llmtrain.strategies.sft import SFT
from llmtrain.trainer import Trainer
from tests.test_trainer import GradSnapshot

TOKENIZER = ByteTokenizer()
CHATS = [  # responses of 1, 14, 3 + 14 and 29 bytes (+ <eos> each): very uneven target counts
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
     {"role": "assistant", "content": "你好！hello"}],
    [{"role": "user", "content": "odd?"}, {"role": "assistant", "content": "yes"},
     {"role": "user", "content": "sure?"}, {"role": "assistant", "content": "yes, 7 is odd."}],
    [{"role": "user", "content": "spell it"}, {"role": "assistant", "content": "a-b-c-d-e-f-g-h-i-j-k-l-m-n-o"}],
]


def test_the_mask_covers_exactly_the_assistant_tokens():
    ids, labels = SpecialTokenTemplate(TOKENIZER).encode(CHATS[2])
    targets = [t for t, label in zip(ids, labels) if label != -100]
    assert all(label in (-100, t) for t, label in zip(ids, labels))
    assert TOKENIZER.decode(targets, skip_special=False) == "yes<eos>yes, 7 is odd.<eos>"
    assert TOKENIZER.decode(ids, skip_special=False) == (
        "<bos><|user|>odd?<eos><|assistant|>yes<eos><|user|>sure?<eos><|assistant|>yes, 7 is odd.<eos>")


def test_a_builtin_chat_example_targets_only_its_answer():
    data = BuiltinTask(TOKENIZER, n_train=40, n_eval=10, batch_size=4, accuracy_examples=0)
    data.setup("chat")
    batch = next(data.eval_batches())
    example = data.eval_examples[0]
    row_ids, row_labels = batch["input_ids"][0], batch["labels"][0]
    assert TOKENIZER.decode(row_labels[row_labels != -100].tolist(), skip_special=False) == example.answer + "<eos>"
    assert TOKENIZER.decode(row_ids.tolist(), skip_special=False).startswith(
        f"<bos><|user|>{example.prompt}<eos><|assistant|>{example.answer}<eos>")
    prompt = TOKENIZER.decode(data.prompt_ids(example), skip_special=False)
    assert prompt == f"<bos><|user|>{example.prompt}<eos><|assistant|>"


class ChatData:
    def __init__(self, batch_size: int) -> None:
        template = SpecialTokenTemplate(TOKENIZER)
        self.batches = PaddedBatches([[template.encode(chat)] for chat in CHATS], batch_size, seed=0, pad_id=0)

    def num_batches(self) -> int:
        return len(self.batches)

    def train_batches(self, epoch, start=0):
        for i in range(start, len(self.batches)):
            yield self.batches.batch(torch.arange(i * self.batches.batch_size, (i + 1) * self.batches.batch_size))

    def eval_batches(self):
        return self.batches.in_order()

    def task_metrics(self, model, device):
        return {}


def test_accumulated_window_with_uneven_responses_has_the_gradients_of_one_big_batch():
    results = []
    for batch_size, accumulation in [(4, 1), (1, 4), (2, 2)]:
        torch.manual_seed(0)
        model = Transformer(vocab_size=264, dim=32, n_layers=2, attention=functools.partial(
            GQAttention, n_heads=4, n_kv_heads=2), ffn=functools.partial(SwiGLU))
        snapshot = GradSnapshot()
        trainer = Trainer(model=model, strategy=SFT(), data=ChatData(batch_size), optimizer=adamw(
            model.named_parameters(), lr=1e-3), scheduler=constant, hardware=Hardware("cpu", "fp32"),
            callbacks=[snapshot], max_steps=1, accumulation_steps=accumulation)
        metrics = trainer.fit()
        results.append((snapshot.grads, metrics))
    (big, big_metrics), *others = results
    assert big_metrics["response_tokens"] == 2 + 15 + (4 + 15) + 30    # UTF-8 bytes + <eos> per turn
    for grads, metrics in others:
        assert metrics["loss"] == pytest.approx(big_metrics["loss"], abs=1e-6)
        assert metrics["response_tokens"] == big_metrics["response_tokens"]
        for name in big:
            torch.testing.assert_close(grads[name], big[name], atol=1e-6, rtol=1e-5)


def test_loss_is_the_token_mean_over_assistant_tokens_and_ppl_its_exp():
    torch.manual_seed(0)
    model = Transformer(vocab_size=264, dim=32, n_layers=2, attention=functools.partial(
        GQAttention, n_heads=4, n_kv_heads=2), ffn=functools.partial(SwiGLU)).eval()
    batch = next(ChatData(4).train_batches(0))
    strategy = SFT()
    with torch.no_grad():
        loss, parts = strategy.loss(model, batch, strategy.num_items(batch))
        logits = model(batch["input_ids"])
    nlls = [-float(F.log_softmax(logits[b, t - 1], -1)[batch["input_ids"][b, t]])
            for b in range(4) for t in range(1, batch["labels"].shape[1]) if batch["labels"][b, t] != -100]
    assert float(loss) == pytest.approx(sum(nlls) / len(nlls), abs=1e-5)
    summary = strategy.summarize({"nll": float(parts["nll"]), "response_tokens": float(parts["response_tokens"])})
    assert summary["ppl"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    assert summary["response_tokens"] == len(nlls)


@pytest.mark.parametrize("seq_aux", [True, False])
def test_right_padding_takes_no_part_in_the_moe_aux_loss(seq_aux):
    """SPECS 3.4: the per-sequence balance of a padded batch is that of its chats run one by one,
    and extra rows of padding alone (no targets) change no balance loss."""
    torch.manual_seed(0)
    model = Transformer(vocab_size=264, dim=32, n_layers=2, attention=functools.partial(GQAttention, n_heads=4),
                        ffn=functools.partial(MoE, expert_hidden_dim=16, aux_loss_coef=0.1, seq_aux=seq_aux))
    batch = next(ChatData(4).train_batches(0))
    strategy = SFT()
    strategy.loss(model, batch, 1)
    aux = collect_aux_loss(model)
    ids, labels = batch["input_ids"], batch["labels"]
    padded = {"input_ids": torch.cat([ids, torch.zeros_like(ids[:2])]),      # pad id 0, never a target
              "labels": torch.cat([labels, torch.full_like(labels[:2], -100)])}
    strategy.loss(model, padded, 1)
    torch.testing.assert_close(collect_aux_loss(model), aux, atol=1e-7, rtol=1e-6)
    if seq_aux:
        solo = []
        for row in ChatData(1).train_batches(0):
            strategy.loss(model, row, 1)
            solo.append(collect_aux_loss(model))
        torch.testing.assert_close(aux, torch.stack(solo).mean(), atol=1e-6, rtol=1e-5)
