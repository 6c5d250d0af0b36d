"""The one training loop: epoch -> accumulation window -> micro-batch, with callback hooks.

The loop never branches on the strategy. Each optimizer step consumes a window of
`accumulation_steps` micro-batches: each is moved to the device and given to `strategy.prepare`
(identity, or GRPO's rollouts) before the first forward, the prepared window goes to
`strategy.prepare_window` (statistics of the whole window over the ranks, e.g. GRPO's batch reward
std), then every micro-batch loss is divided by the number of loss items in the whole prepared
window (SPECS 4.2), so a window is exactly one large batch. Auxiliary losses that model modules
record during a training forward (the MoE balance loss) are collected after each micro-batch,
divided by the window length (they are per-sequence means) and added to that micro-batch's loss;
the logged `loss` includes them and `aux_loss` reports their window mean (evaluation adds none).
Hooks, in order: on_train_begin, on_epoch_begin, on_step_begin, on_batch_begin, on_batch_end,
on_before_optimizer_step, on_step_end, on_epoch_end, on_train_end (or on_exception, when the loop
raises, Ctrl-C included).

A window whose loss or gradient norm is not finite (NaN/inf) is never trained on: its update is
skipped (`nonfinite="skip"`, counted in `nonfinite_steps`) or the run stops after it with a
checkpoint (`nonfinite="stop"`, NonFiniteError); see `Trainer._update`. Under fp16 a finite loss
with inf gradients is the loss scaler overshooting, its normal back-off (the scale grows every 2000
steps until it overflows): that step is skipped and counted in `scaler_skips`, not as a non-finite
step, unless `MAX_SCALER_BACKOFFS` come in a row (the scale would be ~2^-50 of where it started).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
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

log = logging.getLogger(__name__)
NONFINITE_POLICIES = ("skip", "stop")


class StopRequested(KeyboardInterrupt):
    """Raised between two steps after `Trainer.request_stop` (SIGTERM, or a first Ctrl-C).

    The model, optimizer, scheduler and data position are consistent at that point, so the
    checkpoint callback saves them and `resume=` continues exactly where the run stopped.
    """

    def __init__(self, reason: str, step: int) -> None:
        super().__init__(f"{reason}: stopped after step {step}")
        self.reason, self.step = reason, step

    def __reduce__(self) -> tuple:
        return type(self), (self.reason, self.step)     # picklable: a rank process returns it (llmtrain.launch)


class NonFiniteError(RuntimeError):
    """Raised after a step whose loss or gradients were not finite, when the policy says stop.

    The bad update was not applied and the step counts as skipped, so the state is consistent (as
    with StopRequested) and the checkpoint callback saves it, setting `checkpoint`: the weights
    there are those from before the non-finite step(s), and `resume=` goes on with the next window.
    """

    def __init__(self, step: int, what: str, streak: int, limit: int | None) -> None:
        super().__init__(step, what, streak, limit)
        self.step, self.what, self.streak, self.limit = step, what, streak, limit   # limit: None = policy stop
        self.checkpoint: str | None = None

    def __str__(self) -> str:
        if self.limit is None:
            why = f"non-finite {self.what}; its update was skipped and the run stopped (trainer.nonfinite=stop)"
        else:
            why = (f"{self.streak} steps in a row with a non-finite loss or gradients (last: {self.what}; "
                   f"trainer.max_nonfinite_steps={self.limit}): the run has diverged")
        saved = (f"checkpoint {self.checkpoint} holds the weights from before the non-finite step(s)"
                 if self.checkpoint else "no checkpoint of this step was saved (see the log)")
        where = self.checkpoint or "<run directory>"
        return (f"step {self.step}: {why}; {saved}. To go on past it: resume={where} trainer.nonfinite=skip. "
                "To retry with a lower learning rate, start a new run (a resumed run keeps its checkpoint's "
                f"learning rate), e.g. model.init_from={where} optimizer.lr=<lower>.")


MAX_SCALER_BACKOFFS = 50      # fp16 back-offs in a row (each halves the scale) before they count as divergence


def check_settings(max_steps: int | None = None, epochs: int | None = None, accumulation_steps: int = 1,
                   eval_every: int | None = None, eval_batches: int | None = None, nonfinite: str = "skip",
                   max_nonfinite_steps: int = 10) -> None:
    """Refuse bad trainer.* values, naming them; the Trainer's own arguments, checkable before the
    data is set up (llmtrain.entry runs this first, with the config's values)."""
    if max_steps is None and epochs is None:
        raise ValueError("trainer.max_steps and trainer.epochs are both null: set at least one")
    for name, value in (("max_steps", max_steps), ("epochs", epochs)):
        if value is not None and value < 1:
            raise ValueError(f"trainer.{name}={value} must be >= 1 or null")
    if accumulation_steps < 1:
        raise ValueError(f"trainer.accumulation_steps={accumulation_steps} must be >= 1")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"trainer.eval_every={eval_every} must be >= 1 or null")
    if eval_batches is not None and eval_batches < 1:
        raise ValueError(f"trainer.eval_batches={eval_batches} must be >= 1 or null (null: the whole split)")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"trainer.nonfinite={nonfinite!r} must be one of {', '.join(NONFINITE_POLICIES)}")
    if max_nonfinite_steps < 1:
        raise ValueError(f"trainer.max_nonfinite_steps={max_nonfinite_steps} must be >= 1")


def plan_steps(max_steps: int | None, epochs: int | None, batches_per_epoch: int, accumulation_steps: int) -> int:
    """Optimizer steps of the run: `max_steps`, or `epochs` full epochs, whichever ends first (the
    values as `check_settings` let them through)."""
    if batches_per_epoch < 1:
        raise ValueError("the training split holds no full batch: lower data.batch_size or add data")
    per_epoch = math.ceil(batches_per_epoch / accumulation_steps)   # a short last window still steps
    limits = [n for n in (max_steps, None if epochs is None else epochs * per_epoch) if n is not None]
    return min(limits)


def logged_group(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The param group whose lr the `lr` metric shows: optimizer.lr's own (llmtrain.optim marks it
    with pattern None; rule groups such as HRPO's gates come first), else the first group."""
    return next((g for g in optimizer.param_groups if "pattern" in g and g["pattern"] is None),
                optimizer.param_groups[0])


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
        nonfinite: what a window with a NaN/inf loss or gradient norm does: "skip" its update (counted
            in the `nonfinite_steps` metric) or "stop" the run after it (NonFiniteError).
        max_nonfinite_steps: skipped steps in a row after which "skip" stops anyway: a run that only
            produces NaNs has diverged, and skipping forever would only burn the compute budget.
    """

    def __init__(self, model: nn.Module, strategy: Strategy, data: Any, optimizer: torch.optim.Optimizer,
                 scheduler: Callable[..., LRScheduler], hardware: Hardware, callbacks: Sequence[Callback] = (),
                 max_steps: int | None = None, epochs: int | None = None, accumulation_steps: int = 1,
                 eval_every: int | None = None, eval_batches: int | None = None, config_yaml: str = "",
                 nonfinite: str = "skip", max_nonfinite_steps: int = 10) -> None:
        check_settings(max_steps=max_steps, epochs=epochs, accumulation_steps=accumulation_steps,
                       eval_every=eval_every, eval_batches=eval_batches, nonfinite=nonfinite,
                       max_nonfinite_steps=max_nonfinite_steps)
        self.model, self.strategy, self.data = model, strategy, data
        self.optimizer, self.hardware = optimizer, hardware
        self.callbacks = sorted(callbacks, key=lambda c: getattr(c, "runs_last", False))   # stable: config order
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
        self.nonfinite, self.max_nonfinite_steps = nonfinite, max_nonfinite_steps
        self.nonfinite_steps = self.nonfinite_streak = 0   # skipped updates: in all, and in a row up to now
        self.scaler_skips = self.scaler_streak = 0         # fp16 loss-scale back-offs: in all, and in a row
        self.nonfinite_what: str | None = None          # what was not finite in the last step, else None

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
            self._check_nonfinite()
            if self.done:
                return metrics
            if self.hardware.all_reduce_sum(int(self.stop_reason is not None)):   # all ranks stop at one step
                raise StopRequested(self.stop_reason or "SIGTERM", self.step)
        self.epoch, self.iteration = self.epoch + 1, 0
        return metrics

    def train_step(self, window: list[dict[str, Tensor]]) -> dict[str, float]:
        """One optimizer step over a window of micro-batches."""
        start = time.perf_counter()
        window = [self._prepare(batch, self.step) for batch in window]   # all before any update (rollouts)
        window = self.strategy.prepare_window(window, self.hardware.all_reduce_sum)   # window-wide statistics
        num_items = self.hardware.all_reduce_sum(sum(self.strategy.num_items(batch) for batch in window))  # global
        totals: dict[str, Tensor] = {}
        tokens = 0
        for batch in window:
            self._emit("on_batch_begin")
            self.hardware.require_gradient_sync(self.model, batch is window[-1])   # ranks sync once per window
            with self.hardware.autocast():
                loss, parts = self.strategy.loss(self.model, batch, num_items)
            if (aux := collect_aux_loss(self.model)) is not None:
                aux = aux / (len(window) * self.hardware.world_size)   # per-sequence means: N micro-batches = one of N
                loss, parts = loss + aux, {**parts, "aux_loss": aux.detach()}
            self.hardware.backward(loss)
            _accumulate(totals, {"loss": loss.detach(), **parts})
            tokens += batch["input_ids"].numel()
            self.iteration += 1
            self._emit("on_batch_end")
        self.grad_norm = self.hardware.grad_norm(self.optimizer, self.params)
        norm = self.grad_norm.detach().float().to(totals["loss"].device)
        summed = self.hardware.all_reduce_sum(torch.stack(list(totals.values())))   # over ranks: rank 0 logs them
        values = dict(zip([*totals, "grad_norm"], torch.cat([summed, norm[None]]).tolist()))  # one sync
        grad_norm = values.pop("grad_norm")
        lr = logged_group(self.optimizer)["lr"]
        updated = self._update(values["loss"], grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        if updated:
            self.scheduler.step()
        else:                                  # the schedule follows the step counter, skipped steps included
            _step_quietly(self.scheduler)
        self.step += 1
        aux = {"aux_loss": values.pop("aux_loss")} if "aux_loss" in values else {}   # not the strategy's
        seconds = time.perf_counter() - start
        return {"step": self.step, "epoch": self.epoch, "iteration": self.iteration, "lr": lr,
                **self.strategy.summarize(values), **aux, "grad_norm": grad_norm,
                "nonfinite_steps": self.nonfinite_steps,
                **({"scaler_skips": self.scaler_skips} if self.hardware.scaler is not None else {}),
                "tokens_per_s": tokens * self.hardware.world_size / seconds,
                "elapsed_s": time.perf_counter() - self._clock_zero}

    def _update(self, loss: float, grad_norm: float) -> bool:
        """`optimizer.step()` and True, unless the window's loss or gradient norm is NaN/inf.

        Checked after the whole window's backward and before on_before_optimizer_step, so gradient
        clipping never sees a NaN (it would spread it to every weight). A bad window's update is
        skipped: the gradients are zeroed and the weights and optimizer moments stay as they were,
        but the step still counts, so the step counter, the scheduler and the data position advance
        as for any step: lr(step) and the data order stay those of a clean run, the run still ends
        at `total_steps`, and the window that produced the NaN is not replayed. The two values come
        from the one device sync per step that the metrics need anyway (now before the update).
        """
        bad = [name for name, value in (("loss", loss), ("gradients", grad_norm)) if not math.isfinite(value)]
        if (bad == ["gradients"] and self.hardware.scaler is not None
                and self.scaler_streak < MAX_SCALER_BACKOFFS):
            self.nonfinite_what = None              # the scaler overshot: it lowers its scale in this call
            self.hardware.optimizer_step(self.optimizer, skip=True)
            self.scaler_skips += 1
            self.scaler_streak += 1
            log.info("step %d: fp16 gradients overflowed the loss scale: update skipped, scale lowered to %g",
                     self.step + 1, self.hardware.scaler.get_scale())
            return False
        self.scaler_streak = 0
        self.nonfinite_what = " and ".join(bad) or None
        if self.nonfinite_what is None:
            self.nonfinite_streak = 0
            self._emit("on_before_optimizer_step")
            self.hardware.optimizer_step(self.optimizer)
            return True
        self.hardware.optimizer_step(self.optimizer, skip=True)    # an fp16 loss scaler still lowers its scale
        self.nonfinite_steps += 1
        self.nonfinite_streak += 1
        log.warning("step %d: non-finite %s (loss %s, grad_norm %s): update skipped, weights unchanged "
                    "(%d skipped in all, %d in a row; trainer.nonfinite=%s)", self.step + 1, self.nonfinite_what,
                    loss, grad_norm, self.nonfinite_steps, self.nonfinite_streak, self.nonfinite)
        return False

    def _check_nonfinite(self) -> None:
        """After on_step_end (so the step's metrics row and periodic checkpoint exist): stop if the
        policy says so, or if `max_nonfinite_steps` steps in a row were skipped."""
        if self.nonfinite_what is None:
            return
        if self.nonfinite == "stop":
            raise NonFiniteError(self.step, self.nonfinite_what, self.nonfinite_streak, None)
        if self.nonfinite_streak >= self.max_nonfinite_steps:
            raise NonFiniteError(self.step, self.nonfinite_what, self.nonfinite_streak, self.max_nonfinite_steps)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss (one window over the eval batches) plus the data's task metrics."""
        self.model.eval()
        batches = [self._prepare(batch, None) for batch in islice(self.data.eval_batches(), self.eval_batches)]
        batches = self.strategy.prepare_window(batches, _local_sum)         # local, as its num_items
        num_items = sum(self.strategy.num_items(batch) for batch in batches)
        totals: dict[str, Tensor] = {}
        for batch in batches:
            with self.hardware.autocast():
                loss, parts = self.strategy.loss(self.model, batch, num_items)
            _accumulate(totals, {"loss": loss, **parts})
        values = dict(zip(totals, torch.stack(list(totals.values())).tolist()))
        metrics = {**self.strategy.summarize(values), **self.data.task_metrics(self.model, self.hardware.device)}
        self.model.train()
        return {f"eval/{k}": v for k, v in metrics.items()}

    def _prepare(self, batch: dict[str, Tensor], step: int | None) -> dict[str, Tensor]:
        """The batch on the device, as the strategy wants it (e.g. with GRPO's sampled completions)."""
        with self.hardware.autocast():
            return self.strategy.prepare(self.model, self.hardware.to_device(batch), step)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "iteration": self.iteration,
                "elapsed_s": time.perf_counter() - self._clock_zero,
                "nonfinite_steps": self.nonfinite_steps, "nonfinite_streak": self.nonfinite_streak,
                "scaler_skips": self.scaler_skips, "scaler_streak": self.scaler_streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.iteration = state["step"], state["epoch"], state["iteration"]
        self.elapsed_s = state["elapsed_s"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)          # absent in older checkpoints
        self.nonfinite_streak = state.get("nonfinite_streak", 0)
        self.scaler_skips, self.scaler_streak = state.get("scaler_skips", 0), state.get("scaler_streak", 0)

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


def _step_quietly(scheduler: LRScheduler) -> None:
    """`scheduler.step()` without torch's warning that it came before any `optimizer.step()`: after a
    skipped first update that order is intended (the schedule follows the step counter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()


def _local_sum(value: Tensor) -> Tensor:
    """The evaluation's `all_reduce_sum`: each rank evaluates its own batches alone."""
    return value


def _accumulate(totals: dict[str, Tensor], values: dict[str, Tensor]) -> None:
    for key, value in values.items():
        value = value.detach().float()
        totals[key] = totals[key] + value if key in totals else value
