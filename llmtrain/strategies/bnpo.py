"""BNPO's loss: GRPO with a token mean per micro-batch (SPECS 4.4.2, TRL loss_type="bnpo").

Each micro-batch averages the per-token terms of all its completion tokens (long completions weigh
as much per token as short ones, as in DAPO), and the window averages its micro-batches: the
normaliser is local, so two micro-batches of unequal token counts are not one large batch. This
is TRL's default aggregation of v0.17-0.21 (SPECS 4.4.2's table), kept to reproduce runs of that
era; DAPO is the window-level form.
"""

from __future__ import annotations

from torch import Tensor

from llmtrain.strategies.grpo import GRPO


class BNPO(GRPO):
    """GRPO with the micro-batch's token mean, averaged over the window's micro-batches; arguments as GRPO's."""

    def num_items(self, batch: dict[str, Tensor]) -> int:
        return 1                                                   # micro-batches

    def aggregate(self, per_token_BN: Tensor, mask_BN: Tensor, num_items: int) -> Tensor:
        return (per_token_BN * mask_BN).sum() / mask_BN.sum().clamp(min=1) / num_items
