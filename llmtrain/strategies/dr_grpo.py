"""Dr. GRPO: GRPO without its length and difficulty biases (Liu et al. 2025, arXiv:2503.20783; SPECS 4.4).

Two changes to GRPO's math: the advantage is r - group mean, not divided by the group std (which
up-weights groups that are nearly all right or all wrong): scale_rewards="none" by default, a value
of GRPO's; and the loss divides the summed token terms by a constant, completions x max_new_tokens,
instead of each completion's own length (which favours long wrong answers and short right ones).
TRL's loss_type="dr_grpo", scale_rewards="none".
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from llmtrain.strategies.grpo import GRPO


class DrGRPO(GRPO):
    """GRPO with a constant length normaliser and, by default, unscaled advantages; arguments as GRPO's."""

    def __init__(self, *args: Any, scale_rewards: str = "none", **kwargs: Any) -> None:
        super().__init__(*args, scale_rewards=scale_rewards, **kwargs)

    def aggregate(self, per_token_BN: Tensor, mask_BN: Tensor, num_items: int) -> Tensor:
        return (per_token_BN * mask_BN).sum() / (num_items * self.max_new_tokens)
