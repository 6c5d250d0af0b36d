"""What every strategy provides to the one training loop (STYLE 2.7).

A strategy owns only its method's math. For each optimizer step the loop first gives every
micro-batch of the window to `prepare` (identity, except for on-policy methods: GRPO samples its
completions there), then gives the prepared window to `prepare_window` (identity, except where the
loss needs statistics of the whole generation batch, over every micro-batch and rank: GRPO's
scale_rewards="batch"), then asks how many loss items each prepared batch holds (target tokens for
SEQ/SFT, pairs for DPO, completions or completion tokens for GRPO), so that an accumulation window
is normalised as one large batch (SPECS 4.2), then calls `loss` on each micro-batch with the
window's total. Strategies subclass `Strategy` explicitly to inherit the identity `prepare`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor, nn


class Strategy(Protocol):
    """`format` names the batch layout the strategy consumes: text, chat, preference or prompts."""

    format: str

    def setup(self, model: nn.Module, data: object) -> None:
        """One-time preparation after the data is set up and before a checkpoint is resumed
        (e.g. DPO freezes a copy of the starting policy, or precomputes its log-probs)."""

    def prepare(self, model: nn.Module, batch: dict[str, Tensor], step: int | None) -> dict[str, Tensor]:
        """The batch `loss` will see, from the data's batch (already on the device).

        `step` is the optimizer step about to run (0-based), or None during evaluation. Called for
        every micro-batch of a window before the first `loss` of that window, with the same weights.
        """
        return batch

    def prepare_window(self, batches: list[dict[str, Tensor]],
                       all_reduce_sum: Callable[[Tensor], Tensor]) -> list[dict[str, Tensor]]:
        """The window's batches after every `prepare`, given what only the whole window shows.

        `all_reduce_sum` sums a tensor over the ranks (the hardware's in training, the identity in
        the local evaluation); every rank calls this once per window. Return new dicts rather than
        writing into the prepared ones, which may be buffered rollouts that checkpoints keep."""
        return batches

    def num_items(self, batch: dict[str, Tensor]) -> int:
        """Loss items (e.g. target tokens after the shift) in one micro-batch."""

    def loss(self, model: nn.Module, batch: dict[str, Tensor], num_items: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one micro-batch divided by the window's `num_items`, and metrics on the same scale.

        Summing the returned loss and metrics over the micro-batches of a window gives the
        window's mean; `summarize` then derives the reported metrics from those sums.
        """

    def frozen_models(self) -> list[nn.Module]:
        """Models the strategy keeps beside the policy and never trains (a DPO/GRPO reference), which
        the hardware then places as it places the policy (FSDP2 shards them too), in place, after
        `setup` and before a checkpoint is resumed. None here."""
        return []

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors a checkpoint must keep for an exact resume beyond the model and optimizer (GRPO's
        synced reference and buffered rollouts), saved as strategy.safetensors; every rank calls it
        (it may gather). Most strategies rebuild everything in `setup` and keep nothing."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what `state_dict` returned, after `setup`; {} for a checkpoint that holds none."""

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        """Reported metrics from the window sums (e.g. ppl = exp(mean nll))."""
