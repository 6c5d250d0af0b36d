"""Pre-training: next-token cross-entropy with optional label smoothing (SPECS 4.1)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from llmtrain.strategies.base import Strategy

IGNORE_INDEX = -100


def shift_labels(labels_BT: Tensor) -> Tensor:
    """Targets aligned with the logits: position t predicts labels[t + 1]; the last predicts nothing.

    Shifting the labels (not slicing the logits) keeps the logits contiguous, so the loss needs no copy.
    """
    return F.pad(labels_BT[:, 1:], (0, 1), value=IGNORE_INDEX)


def real_tokens(labels_BT: Tensor) -> Tensor:
    """bool (B, T): True on each row's tokens up to and including its last target, False after.

    A right-padded batch (llmtrain/data/padded.py) holds ids and labels but no attention mask, and a
    pad is never a target, so this is its padding mask for the MoE balance loss (SPECS 3.4). Real
    tokens after a row's last target (a conversation that ends with a user turn) count as padding,
    as they do for the loss; a row without targets is all padding.
    """
    return (labels_BT != IGNORE_INDEX).flip(-1).cumsum(-1).flip(-1) > 0


def token_cross_entropy(logits_BTV: Tensor, targets_BT: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Summed cross-entropy over targets != -100, computed in float32."""
    return F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), ignore_index=IGNORE_INDEX,
                           label_smoothing=label_smoothing, reduction="sum")


class NextToken(Strategy):
    """Next-token prediction on every labelled position; reports `ppl` from the unsmoothed NLL.

    Args:
        label_smoothing: epsilon of the target distribution (1 - eps) onehot + eps / V.
    """

    format = "text"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"strategy.label_smoothing={label_smoothing} must be in [0, 1)")
        self.label_smoothing = label_smoothing

    def setup(self, model: nn.Module, data: object) -> None:
        pass

    def num_items(self, batch: dict[str, Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())   # counted after the shift

    def loss(self, model: nn.Module, batch: dict[str, Tensor], num_items: int) -> tuple[Tensor, dict[str, Tensor]]:
        # Packed rows have no padding: no token mask, so an MoE model keeps its unmasked balance loss.
        return self.logits_loss(model(batch["input_ids"]), batch["labels"], num_items)

    def logits_loss(self, logits_BTV: Tensor, labels_BT: Tensor, num_items: int) -> tuple[Tensor, dict[str, Tensor]]:
        """`loss` from the model's logits of the batch (SFT runs the forward itself, with its token mask)."""
        targets_BT = shift_labels(labels_BT)
        loss = token_cross_entropy(logits_BTV, targets_BT, self.label_smoothing) / num_items
        if self.label_smoothing == 0.0:
            nll = loss.detach()
        else:
            nll = token_cross_entropy(logits_BTV.detach(), targets_BT) / num_items
        return loss, {"nll": nll}

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        nll = totals.pop("nll")
        return {**totals, "ppl": math.exp(min(nll, 50.0))}   # capped: exp overflows on a diverged run
