"""Supervised fine-tuning: next-token cross-entropy on assistant tokens only (SPECS 4.2).

The chat data labels every non-assistant position IGNORE_INDEX, so this is the SEQ loss over the
remaining targets. The loop divides each micro-batch's summed loss by the target tokens of the
whole accumulation window (token-level normalisation), so a window of micro-batches with uneven
response lengths has exactly the gradient of one large batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from llmtrain.strategies.seq import IGNORE_INDEX, shift_labels, token_cross_entropy


class SFT:
    """Masked next-token loss; reports `ppl` over response tokens and `response_tokens` per step.

    Args:
        label_smoothing: epsilon of the target distribution (1 - eps) onehot + eps / V.
    """

    format = "chat"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"strategy.label_smoothing={label_smoothing} must be in [0, 1)")
        self.label_smoothing = label_smoothing

    def setup(self, model: nn.Module, data: object) -> None:
        pass

    def num_items(self, batch: dict[str, Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())   # counted after the shift

    def loss(self, model: nn.Module, batch: dict[str, Tensor], num_items: int) -> tuple[Tensor, dict[str, Tensor]]:
        logits_BTV = model(batch["input_ids"])
        targets_BT = shift_labels(batch["labels"])
        loss = token_cross_entropy(logits_BTV, targets_BT, self.label_smoothing) / num_items
        if self.label_smoothing == 0.0:
            nll = loss.detach()
        else:
            nll = token_cross_entropy(logits_BTV.detach(), targets_BT) / num_items
        response_tokens = (targets_BT != IGNORE_INDEX).sum().to(torch.float32)
        return loss, {"nll": nll, "response_tokens": response_tokens}

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        nll = totals.pop("nll")
        return {**totals, "ppl": math.exp(min(nll, 50.0))}   # capped: exp overflows on a diverged run
