"""Fault injection for tests: a NaN loss, or an inf gradient, at chosen steps.

Usable from the command line too: `+callbacks.nan={_target_:tests.faults.NaNAt,steps:[3]}`.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmtrain.callbacks.base import Callback


class NaNAt(Callback):
    """Poisons the training steps `steps` (1-based); evaluation is left alone.

    part="loss": the model's output is multiplied by NaN (a forward hook), so the loss and then every
    gradient are NaN. part="gradients": one gradient element is set to inf after the backward, so only
    the gradient norm is not finite.
    """

    def __init__(self, steps: Sequence[int], part: str = "loss") -> None:
        self.steps, self.part = set(steps), part
        self.hook = None

    def active(self, trainer) -> bool:
        return trainer.model.training and trainer.step + 1 in self.steps

    def on_train_begin(self, trainer) -> None:
        if self.part == "loss":
            self.hook = trainer.model.register_forward_hook(
                lambda module, args, out: out * float("nan") if self.active(trainer) else None)

    def on_batch_end(self, trainer) -> None:
        if self.part == "gradients" and self.active(trainer):
            trainer.params[0].grad.view(-1)[0] = float("inf")

    def on_train_end(self, trainer) -> None:
        if self.hook is not None:
            self.hook.remove()

    def on_exception(self, trainer, error: BaseException) -> None:
        self.on_train_end(trainer)
