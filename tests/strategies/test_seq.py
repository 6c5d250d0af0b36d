"""SEQ loss against the formula of SPECS 4.1."""

from __future__ import annotations

import math

import pytest
import torch

from llmtrain.strategies.seq import NextToken, real_tokens


class FixedLogits(torch.nn.Module):
    def __init__(self, logits_BTV: torch.Tensor) -> None:
        super().__init__()
        self.logits_BTV = logits_BTV

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return self.logits_BTV


def reference_loss(logits_BTV, labels_BT, eps):
    """(1 - eps) nll + eps mean_v(-log p_v), summed over shifted targets != -100, then averaged."""
    logp = logits_BTV[:, :-1].double().log_softmax(-1)
    target = labels_BT[:, 1:]
    total, count = 0.0, 0
    for b in range(target.shape[0]):
        for t in range(target.shape[1]):
            if target[b, t] == -100:
                continue
            total += (1 - eps) * -logp[b, t, target[b, t]] - eps * logp[b, t].mean()
            count += 1
    return total / count, count


def test_num_items_counts_targets_after_the_shift():
    labels = torch.tensor([[5, 6, 7, 8, 9]])     # 5 label tokens; position 0 is never predicted
    assert NextToken().num_items({"labels": labels}) == 4
    masked = torch.tensor([[5, -100, -100, 8, 9]])
    assert NextToken().num_items({"labels": masked}) == 2


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_uniform_logits_give_log_vocab(eps):
    batch = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "labels": torch.randint(0, 7, (2, 6))}
    strategy = NextToken(label_smoothing=eps)
    loss, parts = strategy.loss(FixedLogits(torch.zeros(2, 6, 7)), batch, strategy.num_items(batch))
    assert loss.item() == pytest.approx(math.log(7))
    assert strategy.summarize({"nll": parts["nll"].item()})["ppl"] == pytest.approx(7.0)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_loss_matches_the_formula_with_ignored_positions(eps):
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 11)
    labels = torch.randint(0, 11, (2, 8))
    labels[0, 2:5] = -100
    strategy = NextToken(label_smoothing=eps)
    batch = {"input_ids": labels.clamp(min=0), "labels": labels}
    want, count = reference_loss(logits, labels, eps)
    assert strategy.num_items(batch) == count
    loss, parts = strategy.loss(FixedLogits(logits), batch, count)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    nll, _ = reference_loss(logits, labels, 0.0)
    assert parts["nll"].item() == pytest.approx(nll.item(), rel=1e-5)   # ppl ignores smoothing


def test_label_smoothing_out_of_range_is_named():
    with pytest.raises(ValueError, match="label_smoothing=1.0"):
        NextToken(label_smoothing=1.0)


def test_real_tokens_end_at_each_rows_last_target():
    """The right padding of a padded batch (no attention mask in it) is what follows the last target."""
    labels = torch.tensor([[-100, -100, 5, 6, -100, 7, -100, -100],     # prompt, answer, prompt, answer, 2 pads
                           [-100, 3, 4, 5, 6, 7, 8, 9],                  # no padding
                           [-100] * 8])                                  # a row of padding alone
    want = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8, [0] * 8], dtype=torch.bool)
    assert torch.equal(real_tokens(labels), want)
