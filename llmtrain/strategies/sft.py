"""Supervised fine-tuning: next-token cross-entropy on assistant tokens only (SPECS 4.2).

The chat data labels every non-assistant position IGNORE_INDEX, so the loss is the SEQ loss
(llmtrain.strategies.seq.NextToken) over the remaining targets. The loop divides each micro-batch's
summed loss by the target tokens of the whole accumulation window (token-level normalisation), so a
window of micro-batches with uneven response lengths has exactly the gradient of one large batch.
The batches are right-padded: the forward gets `token_mask_BT` (`real_tokens`), so an MoE model's
balance loss leaves the padding out (SPECS 3.4); attention needs no mask for right padding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmtrain.strategies.base import Strategy
from llmtrain.strategies.seq import IGNORE_INDEX, NextToken, real_tokens


class SFT(Strategy):
    """Masked next-token loss; reports `ppl` over response tokens and `response_tokens` per step.

    Args:
        label_smoothing: epsilon of the target distribution (1 - eps) onehot + eps / V.
    """

    format = "chat"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.next_token = NextToken(label_smoothing)

    def setup(self, model: nn.Module, data: object) -> None:
        pass

    def num_items(self, batch: dict[str, Tensor]) -> int:
        return self.next_token.num_items(batch)

    def loss(self, model: nn.Module, batch: dict[str, Tensor], num_items: int) -> tuple[Tensor, dict[str, Tensor]]:
        logits_BTV = model(batch["input_ids"], token_mask_BT=real_tokens(batch["labels"]))
        loss, parts = self.next_token.logits_loss(logits_BTV, batch["labels"], num_items)
        response_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().to(torch.float32)   # summed over a window
        return loss, {**parts, "response_tokens": response_tokens}

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        return self.next_token.summarize(totals)
