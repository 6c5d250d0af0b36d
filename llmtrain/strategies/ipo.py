"""Identity Preference Optimization (Azar et al. 2023, arXiv:2310.12036) (SPECS 4.3).

IPO regresses the preference gap onto a fixed target instead of pushing it through a sigmoid:

    h̄ = (π_c/|c| - ρ_c/|c|) - (π_r/|r| - ρ_r/|r|),   loss = (h̄ - 1/(2β))²   (mean over pairs)

with each summed log-prob divided by its own response length (TRL #1265, confirmed by the IPO
authors); β is IPO's τ. Reward metrics are DPO's, from the summed log-probs, so runs compare.
"""

from __future__ import annotations

from torch import Tensor, nn

from llmtrain.strategies.base import Strategy
from llmtrain.strategies.dpo import FrozenReference, pair_logps, preference_metrics, token_means


class IPO(Strategy):
    """Squared-loss preference optimisation on length-averaged log-prob ratios.

    Args:
        beta: IPO's τ; the target gap is 1 / (2β).
        reference, precompute_reference, share_prompt: as for DPO.
    """

    format = "preference"

    def __init__(self, beta: float = 0.1, reference: str | None = None, precompute_reference: bool = False,
                 share_prompt: bool = True) -> None:
        if beta <= 0:
            raise ValueError(f"strategy.beta={beta} must be > 0")
        self.beta, self.share_prompt = beta, share_prompt
        self.reference = FrozenReference(reference, precompute_reference, share_prompt)

    def setup(self, model: nn.Module, data: object) -> None:
        self.reference.setup(model, data)

    def frozen_models(self) -> list[nn.Module]:
        return self.reference.models()

    def num_items(self, batch: dict[str, Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, model: nn.Module, batch: dict[str, Tensor], num_items: int) -> tuple[Tensor, dict[str, Tensor]]:
        policy = pair_logps(model, batch, self.share_prompt)
        reference_2B = self.reference.logps(batch)
        loss_B = self.pair_loss(policy.logps, reference_2B, policy.lengths)
        return loss_B.sum() / num_items, preference_metrics(self.beta, policy, reference_2B, num_items)

    def pair_loss(self, policy_2B: Tensor, reference_2B: Tensor, lengths_2B: Tensor) -> Tensor:
        """Per-pair loss from summed log-probs and response lengths (chosen rows first, then rejected)."""
        mean_ratio_c, mean_ratio_r = ((policy_2B - reference_2B) / lengths_2B.clamp(min=1)).chunk(2)
        return (mean_ratio_c - mean_ratio_r - 1 / (2 * self.beta)) ** 2

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        return token_means(totals)
