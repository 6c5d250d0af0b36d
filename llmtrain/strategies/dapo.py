"""DAPO's token-level GRPO loss (Yu et al. 2025, arXiv:2503.14476; SPECS 4.4.2, TRL loss_type="dapo").

Every completion token of the accumulation window weighs the same: the loss is the sum of the
per-token terms divided by the window's completion tokens (counted after the rollouts, which is
why the loop prepares a whole window before its first forward), so long completions are not
down-weighted as in GRPO's per-completion mean. Clip-higher (clip_eps_high = 0.28 > clip_eps) is
a value, not a class, and so is dynamic sampling (`filter_groups`, GRPO's docstring; without
refill), and so is overlong filtering (`mask_truncated_completions`: completions cut at max_new_tokens
without EOS are left out of the loss and of the token count). The soft overlong punishment (eq. 13)
is a reward on the completion's token count, llmtrain.strategies.rewards.OverlongPenalty, added to
strategy.rewards (conf/strategy/dapo.yaml shows how).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from llmtrain.strategies.grpo import GRPO


class DAPO(GRPO):
    """GRPO with token-level aggregation over the window; arguments as GRPO's."""

    def __init__(self, *args: Any, clip_eps_high: float | None = 0.28, **kwargs: Any) -> None:
        super().__init__(*args, clip_eps_high=clip_eps_high, **kwargs)

    def num_items(self, batch: dict[str, Tensor]) -> int:
        return int(self.loss_mask(batch).sum())                   # completion tokens the loss sees

    def aggregate(self, per_token_BN: Tensor, mask_BN: Tensor, num_items: int) -> Tensor:
        return (per_token_BN * mask_BN).sum() / max(num_items, 1)   # 0 tokens: every completion truncated
