"""The loop: token-weighted accumulation equals one big batch; the scheduler steps per window."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from llmtrain.callbacks.base import Callback
from llmtrain.callbacks.checkpoint import Checkpoint
from llmtrain.callbacks.grad_clip import GradClip
from llmtrain.callbacks.history import History
from llmtrain.callbacks.metrics import JsonlMetrics
from llmtrain.checkpoint import load_checkpoint
from llmtrain.hardware import Hardware
from llmtrain.models.attention_gqa import GQAttention
from llmtrain.models.ffn import SwiGLU
from llmtrain.models.moe import MoE
from llmtrain.models.transformer import Transformer
from llmtrain.optim import adamw
from llmtrain.schedulers import constant
from llmtrain.strategies.seq import NextToken
from llmtrain.trainer import NonFiniteError, StopRequested, Trainer, plan_steps
from tests.faults import NaNAt
from tests.reference import naive_balance


class RowData:
    """Fixed rows served `batch_size` at a time, in order (a stand-in for a real data source)."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor, batch_size: int) -> None:
        self.ids, self.labels, self.batch_size = ids, labels, batch_size

    def num_batches(self) -> int:
        return len(self.ids) // self.batch_size

    def train_batches(self, epoch: int, start: int = 0):
        for i in range(start, self.num_batches()):
            rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield {"input_ids": self.ids[rows], "labels": self.labels[rows]}

    def eval_batches(self):
        yield from self.train_batches(0)

    def task_metrics(self, model, device) -> dict[str, float]:
        return {}


class GradSnapshot(Callback):
    def on_before_optimizer_step(self, trainer) -> None:
        self.grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


def uneven_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """4 rows whose numbers of target tokens differ a lot (2, 5, 9 and 15 of 16)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 16))
    labels = ids.clone()
    for row, n_masked in enumerate([14, 11, 7, 1]):
        labels[row, :n_masked] = -100
    return ids, labels


def make_trainer(batch_size: int, accumulation_steps: int, callbacks=(), ffn=SwiGLU, **options) -> Trainer:
    torch.manual_seed(0)
    options.setdefault("max_steps", 1)
    model = Transformer(vocab_size=50, dim=32, n_layers=2, attention=functools.partial(GQAttention, n_heads=4,
                        n_kv_heads=2), ffn=functools.partial(ffn))
    return Trainer(model=model, strategy=NextToken(), data=RowData(*uneven_rows(), batch_size),
                   optimizer=adamw(model.named_parameters(), lr=1e-3), scheduler=constant,
                   hardware=Hardware(device="cpu", precision="fp32"), callbacks=list(callbacks),
                   accumulation_steps=accumulation_steps, **options)


def test_accumulated_window_has_the_gradients_of_one_big_batch():
    results = []
    for batch_size, accumulation in [(4, 1), (1, 4), (2, 2)]:
        snapshot = GradSnapshot()
        metrics = make_trainer(batch_size, accumulation, [snapshot]).fit()
        results.append((snapshot.grads, metrics["loss"]))
    (big, big_loss), *others = results
    for grads, loss in others:
        assert abs(loss - big_loss) < 1e-6
        for name in big:
            torch.testing.assert_close(grads[name], big[name], atol=1e-6, rtol=1e-5)


MOE = functools.partial(MoE, n_routed_experts=4, n_experts_per_tok=2, expert_hidden_dim=16, aux_loss_coef=0.1)


def test_moe_accumulated_window_with_aux_loss_has_the_gradients_of_one_big_batch():
    results = []
    for batch_size, accumulation in [(4, 1), (1, 4), (2, 2)]:
        snapshot = GradSnapshot()
        metrics = make_trainer(batch_size, accumulation, [snapshot], ffn=MOE).fit()
        results.append((snapshot.grads, metrics))
    (big, big_metrics), *others = results
    assert big_metrics["aux_loss"] > 0.1      # 2 layers, about 1 x coef each
    for grads, metrics in others:
        for key in ("loss", "aux_loss"):
            assert abs(metrics[key] - big_metrics[key]) < 1e-6, key
        for name in big:
            torch.testing.assert_close(grads[name], big[name], atol=1e-6, rtol=1e-5)


def test_moe_logged_loss_is_cross_entropy_plus_the_balance_formula():
    trainer = make_trainer(4, 1, ffn=MOE)
    ids, labels = uneven_rows()
    router_inputs = []
    hooks = [layer.ffn.register_forward_hook(lambda m, args, out: router_inputs.append(args[0].detach()))
             for layer in trainer.model.layers]
    with torch.no_grad():
        logits = trainer.model(ids)
    for hook in hooks:
        hook.remove()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    aux = 0.0
    for layer, u_BTD in zip(trainer.model.layers, router_inputs):
        scores_BTE = torch.softmax(u_BTD @ layer.ffn.gate.weight.T, dim=-1)
        experts_BTK = scores_BTE.topk(2, dim=-1).indices
        aux += 0.1 * sum(naive_balance(scores_BTE[b], experts_BTK[b]) for b in range(4)) / 4
    metrics = trainer.fit()
    assert abs(metrics["aux_loss"] - aux) < 1e-6
    assert abs(metrics["loss"] - (ce.item() + aux)) < 1e-5 and abs(math.log(metrics["ppl"]) - ce.item()) < 1e-5


def test_logged_loss_is_the_token_mean_of_the_window():
    trainer = make_trainer(1, 4)
    ids, labels = uneven_rows()
    with torch.no_grad():
        logits = trainer.model(ids)
        want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert abs(trainer.fit()["loss"] - want.item()) < 1e-5


class WindowSeen(NextToken):
    """Records the prepare_window calls; the loss must get the batches they return."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, object]] = []

    def prepare_window(self, batches, all_reduce_sum):
        self.calls.append((len(batches), all_reduce_sum))
        return [{**batch, "window": torch.tensor(len(batches))} for batch in batches]

    def loss(self, model, batch, num_items):
        assert "window" in batch
        return super().loss(model, batch, num_items)


def test_each_prepared_window_goes_through_prepare_window_once_reduced_over_ranks_in_training_only():
    trainer = make_trainer(1, 2, max_steps=2, eval_every=2)
    trainer.strategy = strategy = WindowSeen()
    trainer.fit()
    assert [n for n, _ in strategy.calls] == [2, 2, 4]                 # two training windows, one evaluation
    assert all(reduce == trainer.hardware.all_reduce_sum for _, reduce in strategy.calls[:2])
    assert strategy.calls[2][1] != trainer.hardware.all_reduce_sum       # evaluation is local


def test_scheduler_steps_once_per_window():
    trainer = make_trainer(1, 2)
    trainer.total_steps = 2                       # 4 micro-batches, 2 windows
    trainer.fit()
    assert trainer.scheduler.last_epoch == 2 and trainer.step == 2 and trainer.iteration == 4


def test_plan_steps_counts_a_short_last_window():
    assert plan_steps(None, 2, batches_per_epoch=10, accumulation_steps=4) == 6
    assert plan_steps(5, 2, batches_per_epoch=10, accumulation_steps=4) == 5
    assert plan_steps(100, None, batches_per_epoch=10, accumulation_steps=4) == 100


class HookLog(Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_epoch_begin(self, trainer) -> None:
        self.calls.append(f"epoch{trainer.epoch}")

    def on_step_end(self, trainer, metrics) -> None:
        self.calls.append(f"step{trainer.step}")


def test_epochs_run_every_batch_and_fire_the_hooks_in_order():
    hooks = HookLog()
    trainer = make_trainer(1, 3, [hooks])           # 4 micro-batches per epoch: windows of 3 and 1
    trainer.total_steps = plan_steps(None, 2, trainer.data.num_batches(), 3)
    trainer.fit()
    assert hooks.calls == ["epoch0", "step1", "step2", "epoch1", "step3", "step4"]
    assert trainer.step == 4 and trainer.epoch == 1 and trainer.iteration == 4


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, trainer) -> None:
        if trainer.step + 1 == self.step:
            trainer.request_stop("SIGTERM")      # mid-step, as a signal handler would


def test_a_requested_stop_finishes_the_step_then_raises():
    trainer = make_trainer(1, 1, [StopAt(2)])
    trainer.total_steps = 5
    with pytest.raises(StopRequested, match="SIGTERM: stopped after step 2") as stop:
        trainer.fit()
    assert stop.value.step == trainer.step == 2 and trainer.iteration == 2


class WeightLog(Callback):
    """The weights after each step (index 0: before the first)."""

    def on_train_begin(self, trainer) -> None:
        self.at = [[p.detach().clone() for p in trainer.params]]

    def on_step_end(self, trainer, metrics) -> None:
        self.at.append([p.detach().clone() for p in trainer.params])


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_nan_loss_skips_its_update_is_counted_and_training_goes_on(tmp_path, caplog):
    weights, history = WeightLog(), History()
    metrics_file = JsonlMetrics(str(tmp_path / "metrics.jsonl"))
    trainer = make_trainer(1, 1, [NaNAt([2]), weights, history, metrics_file])
    trainer.total_steps = 4
    trainer.fit()
    assert same(weights.at[1], weights.at[2])                     # step 2 changed nothing (AdamW decays even
    assert not same(weights.at[2], weights.at[3])                 # on a zero gradient), later steps update
    assert trainer.optimizer.state[trainer.params[0]]["step"] == 3 and trainer.scheduler.last_epoch == 4
    assert [row["nonfinite_steps"] for row in history.rows] == [0, 1, 1, 1] and trainer.step == 4
    assert math.isnan(history.rows[1]["loss"]) and "step 2: non-finite loss and gradients" in caplog.text

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")
    rows = [json.loads(line, parse_constant=strict) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["loss"] is None and rows[2]["loss"] > 0        # NaN is written as null


def test_an_inf_gradient_is_skipped_before_gradient_clipping_sees_it(caplog):
    weights = WeightLog()
    trainer = make_trainer(1, 1, [NaNAt([1], part="gradients"), GradClip(1.0), weights])
    trainer.total_steps = 2
    trainer.fit()
    assert same(weights.at[0], weights.at[1]) and all(p.isfinite().all() for p in trainer.params)
    assert "step 1: non-finite gradients (loss " in caplog.text and trainer.nonfinite_steps == 1


def test_stop_policy_checkpoints_the_weights_from_before_the_nan_and_raises(tmp_path):
    weights = WeightLog()
    checkpoints = Checkpoint(str(tmp_path / "checkpoints"), every_steps=100)
    trainer = make_trainer(1, 1, [NaNAt([3]), weights, checkpoints], nonfinite="stop")
    trainer.total_steps = 4
    with pytest.raises(NonFiniteError, match="step 3: non-finite loss and gradients") as stop:
        trainer.fit()
    path = tmp_path / "checkpoints" / "step_000003"
    assert stop.value.checkpoint == str(path) and f"resume={path} trainer.nonfinite=skip" in str(stop.value)
    resumed = make_trainer(1, 1)
    load_checkpoint(path, resumed)
    assert same(resumed.params, weights.at[2])                    # the step-3 checkpoint holds step 2's weights
    assert resumed.step == resumed.iteration == 3 and resumed.nonfinite_steps == 1   # the next window is 4


def test_max_nonfinite_steps_in_a_row_stop_a_skipping_run():
    spaced = make_trainer(1, 1, [NaNAt([1, 3])], max_nonfinite_steps=2)
    spaced.total_steps = 4
    spaced.fit()
    assert spaced.nonfinite_steps == 2 and spaced.step == 4
    in_a_row = make_trainer(1, 1, [NaNAt([2, 3])], max_nonfinite_steps=2)
    in_a_row.total_steps = 4
    with pytest.raises(NonFiniteError, match=r"step 3: 2 steps in a row .* trainer.max_nonfinite_steps=2"):
        in_a_row.fit()
    assert in_a_row.step == 3 and in_a_row.nonfinite_steps == 2


@pytest.mark.parametrize("options, message", [
    ({"nonfinite": "ignore"}, "trainer.nonfinite='ignore' must be one of skip, stop"),
    ({"max_nonfinite_steps": 0}, "trainer.max_nonfinite_steps=0 must be >= 1"),
])
def test_bad_nonfinite_options_fail_naming_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(1, 1, **options)


@pytest.mark.parametrize("options, message", [
    ({"max_steps": 0}, r"trainer.max_steps=0 must be >= 1 or null"),
    ({"max_steps": -3}, r"trainer.max_steps=-3 must be >= 1 or null"),
    ({"max_steps": None, "epochs": 0}, r"trainer.epochs=0 must be >= 1 or null"),
    ({"eval_batches": 0}, r"trainer.eval_batches=0 must be >= 1 or null"),
])
def test_step_and_eval_counts_below_one_fail_before_training(options, message):
    """Caught when the trainer is built, not at the first evaluation after hours of training."""
    with pytest.raises(ValueError, match=message):
        make_trainer(1, 1, **options)


def test_fp16_loss_scale_back_offs_are_not_divergence():
    """The scaler's scale grows until it overflows, then halves: that skipped step is normal under fp16,
    and must neither stop a `nonfinite=stop` run nor count toward "the run has diverged"."""
    torch.manual_seed(0)
    model = Transformer(vocab_size=50, dim=32, n_layers=2, attention=functools.partial(GQAttention, n_heads=4,
                        n_kv_heads=2), ffn=functools.partial(SwiGLU))
    hardware = Hardware(device="cpu", precision="fp16")
    hardware.scaler._init_scale = 2.0 ** 24                # overflows for the first several steps
    ids = torch.randint(0, 50, (80, 16))
    trainer = Trainer(model=model, strategy=NextToken(), data=RowData(ids, ids, 4),
                      optimizer=adamw(model.named_parameters(), lr=3e-3), scheduler=constant, hardware=hardware,
                      max_steps=20, nonfinite="stop", max_nonfinite_steps=2)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = trainer.fit()
    assert trainer.step == 20 and trainer.nonfinite_steps == 0
    assert 2 < trainer.scaler_skips < 20 and metrics["scaler_skips"] == trainer.scaler_skips
    assert hardware.scaler.get_scale() < 2.0 ** 24
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))   # later steps trained
