"""Clip the global gradient norm before each optimizer step."""

from __future__ import annotations

import torch

from llmtrain.callbacks.base import Callback


class GradClip(Callback):
    """Scale gradients so their global L2 norm is at most `max_norm`.

    Reuses the norm the trainer already computed for the `grad_norm` metric (one pass, not two).
    """

    def __init__(self, max_norm: float = 1.0) -> None:
        if max_norm <= 0:
            raise ValueError(f"callbacks.grad_clip.max_norm={max_norm} must be > 0")
        self.max_norm = max_norm

    def on_before_optimizer_step(self, trainer) -> None:
        grads = [p.grad for p in trainer.params if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(grads, self.max_norm, trainer.grad_norm)
