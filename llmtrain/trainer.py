"""The one training loop: epoch -> accumulation window -> micro-batch, with callback hooks.

The loop never branches on the strategy. Each optimizer step consumes a window of
`accumulation_steps` micro-batches; every micro-batch loss is divided by the number of loss items
in the whole window (SPECS 4.2), so a window is exactly one large batch. Auxiliary losses that
model modules record during a training forward (the MoE balance loss) are collected after each
micro-batch, divided by the window length (they are per-sequence means) and added to that
micro-batch's loss; the logged `loss` includes them and `aux_loss` reports their window mean
(evaluation adds none). Hooks, in order:
on_train_begin, on_epoch_begin, on_step_begin, on_batch_begin, on_batch_end,
on_before_optimizer_step, on_step_end, on_epoch_end, on_train_end (or on_exception, when the loop
raises, Ctrl-C included).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from llmtrain.callbacks.base import Callback
from llmtrain.hardware import Hardware
from llmtrain.models.moe import collect_aux_loss
from llmtrain.strategies.base import Strategy


class StopRequested(KeyboardInterrupt):
    """Raised between two steps after `Trainer.request_stop` (SIGTERM, or a first Ctrl-C).

    The model, optimizer, scheduler and data position are consistent at that point, so the
    checkpoint callback saves them and `resume=` continues exactly where the run stopped.
    """

    def __init__(self, reason: str, step: int) -> None:
        super().__init__(f"{reason}: stopped after step {step}")
        self.reason, self.step = reason, step


def plan_steps(max_steps: int | None, epochs: int | None, batches_per_epoch: int, accumulation_steps: int) -> int:
    """Optimizer steps of the run: `max_steps`, or `epochs` full epochs, whichever ends first."""
    if max_steps is None and epochs is None:
        raise ValueError("trainer.max_steps and trainer.epochs are both null: set at least one")
    if batches_per_epoch < 1:
        raise ValueError("the training split holds no full batch: lower data.batch_size or add data")
    per_epoch = math.ceil(batches_per_epoch / accumulation_steps)   # a short last window still steps
    limits = [n for n in (max_steps, None if epochs is None else epochs * per_epoch) if n is not None]
    return min(limits)


def windows(batches: Iterable[dict[str, Tensor]], size: int) -> Iterator[list[dict[str, Tensor]]]:
    iterator = iter(batches)
    while window := list(islice(iterator, size)):
        yield window


class Trainer:
    """Fits `model` with `strategy` on `data`; everything optional is a callback.

    Args:
        scheduler: a factory `(optimizer, total_steps=...) -> LRScheduler` (a `_partial_` node).
        max_steps: optimizer steps to run (None: `epochs` full epochs).
        epochs: full passes over the training split (None: as many as `max_steps` needs).
        accumulation_steps: micro-batches per optimizer step.
        eval_every: steps between held-out evaluations; the last step is always evaluated.
        eval_batches: held-out batches per evaluation (None: all).
        config_yaml: the resolved run config, stored in checkpoints for provenance.
    """

    def __init__(self, model: nn.Module, strategy: Strategy, data: Any, optimizer: torch.optim.Optimizer,
                 scheduler: Callable[..., LRScheduler], hardware: Hardware, callbacks: Sequence[Callback] = (),
                 max_steps: int | None = None, epochs: int | None = None, accumulation_steps: int = 1,
                 eval_every: int | None = None, eval_batches: int | None = None, config_yaml: str = "") -> None:
        if accumulation_steps < 1:
            raise ValueError(f"trainer.accumulation_steps={accumulation_steps} must be >= 1")
        if eval_every is not None and eval_every < 1:
            raise ValueError(f"trainer.eval_every={eval_every} must be >= 1 or null")
        self.model, self.strategy, self.data = model, strategy, data
        self.optimizer, self.hardware, self.callbacks = optimizer, hardware, list(callbacks)
        self.accumulation_steps = accumulation_steps
        self.total_steps = plan_steps(max_steps, epochs, data.num_batches(), accumulation_steps)
        self.scheduler = scheduler(optimizer, total_steps=self.total_steps)
        self.eval_every, self.eval_batches, self.config_yaml = eval_every, eval_batches, config_yaml
        self.step = self.epoch = self.iteration = 0     # iteration: micro-batches consumed this epoch
        self.elapsed_s = 0.0                            # training time of earlier sessions of this run
        self._clock_zero = time.perf_counter()          # elapsed_s counts from here
        self.grad_norm: Tensor | None = None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.stop_reason: str | None = None             # set by request_stop; checked between steps

    def request_stop(self, reason: str) -> None:
        """Finish the current step, then raise StopRequested (safe to call from a signal handler)."""
        self.stop_reason = reason

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def fit(self) -> dict[str, float]:
        """Run until `total_steps`; returns the metrics of the last step (which include eval/*)."""
        self.model.train()
        self._clock_zero = time.perf_counter() - self.elapsed_s
        metrics: dict[str, float] = {}
        self._emit("on_train_begin")
        try:
            while not self.done:
                self._emit("on_epoch_begin")
                metrics = self._run_epoch() or metrics
                self._emit("on_epoch_end")
        except BaseException as error:
            self._emit("on_exception", error)
            raise
        self._emit("on_train_end")
        return metrics

    def _run_epoch(self) -> dict[str, float]:
        """Steps from the current data position to the end of the epoch (or of training)."""
        metrics: dict[str, float] = {}
        for window in windows(self.data.train_batches(self.epoch, start=self.iteration), self.accumulation_steps):
            self._emit("on_step_begin")
            metrics = self.train_step(window)
            if self.done or (self.eval_every and self.step % self.eval_every == 0):
                metrics.update(self.evaluate())
            self._emit("on_step_end", metrics)
            if self.done:
                return metrics
            if self.stop_reason is not None:
                raise StopRequested(self.stop_reason, self.step)
        self.epoch, self.iteration = self.epoch + 1, 0
        return metrics

    def train_step(self, window: list[dict[str, Tensor]]) -> dict[str, float]:
        """One optimizer step over a window of micro-batches."""
        start = time.perf_counter()
        num_items = sum(self.strategy.num_items(batch) for batch in window)
        totals: dict[str, Tensor] = {}
        tokens = 0
        for batch in window:
            self._emit("on_batch_begin")
            batch = self.hardware.to_device(batch)
            with self.hardware.autocast():
                loss, parts = self.strategy.loss(self.model, batch, num_items)
            if (aux := collect_aux_loss(self.model)) is not None:
                aux = aux / len(window)      # per-sequence means: N equal micro-batches = one batch of N
                loss, parts = loss + aux, {**parts, "aux_loss": aux.detach()}
            loss.backward()
            _accumulate(totals, {"loss": loss.detach(), **parts})
            tokens += batch["input_ids"].numel()
            self.iteration += 1
            self._emit("on_batch_end")
        self.grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        self._emit("on_before_optimizer_step")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        values = dict(zip(totals, torch.stack(list(totals.values())).tolist()))   # one device sync
        aux = {"aux_loss": values.pop("aux_loss")} if "aux_loss" in values else {}   # not the strategy's
        seconds = time.perf_counter() - start
        return {"step": self.step, "epoch": self.epoch, "iteration": self.iteration, "lr": lr,
                **self.strategy.summarize(values), **aux, "grad_norm": float(self.grad_norm),
                "tokens_per_s": tokens / seconds, "elapsed_s": time.perf_counter() - self._clock_zero}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss (one window over the eval batches) plus the data's task metrics."""
        self.model.eval()
        batches = list(islice(self.data.eval_batches(), self.eval_batches))
        num_items = sum(self.strategy.num_items(batch) for batch in batches)
        totals: dict[str, Tensor] = {}
        for batch in batches:
            with self.hardware.autocast():
                loss, parts = self.strategy.loss(self.model, self.hardware.to_device(batch), num_items)
            _accumulate(totals, {"loss": loss, **parts})
        values = dict(zip(totals, torch.stack(list(totals.values())).tolist()))
        metrics = {**self.strategy.summarize(values), **self.data.task_metrics(self.model, self.hardware.device)}
        self.model.train()
        return {f"eval/{k}": v for k, v in metrics.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "iteration": self.iteration,
                "elapsed_s": time.perf_counter() - self._clock_zero}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.iteration = state["step"], state["epoch"], state["iteration"]
        self.elapsed_s = state["elapsed_s"]

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


def _accumulate(totals: dict[str, Tensor], values: dict[str, Tensor]) -> None:
    for key, value in values.items():
        value = value.detach().float()
        totals[key] = totals[key] + value if key in totals else value
