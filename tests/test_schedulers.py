"""Schedule multipliers against the exact values of SPECS 6.1 / 6.2, and through LambdaLR."""

from __future__ import annotations

import pytest
import torch

from llmtrain.schedulers import constant, cosine, cosine_multiplier, sgdr, sgdr_multiplier


def test_cosine_exact_values():
    got = [cosine_multiplier(s, total_steps=10, warmup_steps=2, min_rate=0.1) for s in range(10)]
    want = [0.5, 1.0, 1.0, 0.9657, 0.8682, 0.7222, 0.55, 0.3778, 0.2318, 0.1343]
    assert got == pytest.approx(want, abs=1e-4)
    assert cosine_multiplier(10, total_steps=10, warmup_steps=2, min_rate=0.1) == pytest.approx(0.1)


def test_sgdr_exact_values_with_restarts_at_2_6_14():
    got = [sgdr_multiplier(s, warmup_steps=0, cycle_steps=2, t_mult=2, min_rate=0.1) for s in range(15)]
    want = [1.0, 0.55, 1.0, 0.8682, 0.55, 0.2318, 1.0, 0.9657, 0.8682, 0.7222, 0.55, 0.3778, 0.2318,
            0.1343, 1.0]
    assert got == pytest.approx(want, abs=1e-4)


def test_sgdr_warmup_comes_once_before_the_first_cycle():
    got = [sgdr_multiplier(s, warmup_steps=4, cycle_steps=2, t_mult=2, min_rate=0.1) for s in range(7)]
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.55, 1.0])


def _lrs(make, steps: int, **kwargs) -> list[float]:
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.1}])
    sched = make(opt, total_steps=steps, **kwargs)
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return seen


def test_lambdalr_applies_the_multiplier_and_keeps_group_ratios():
    seen = _lrs(cosine, 10, warmup_steps=2, min_rate=0.1)
    assert [a for a, _ in seen] == pytest.approx(
        [cosine_multiplier(s, total_steps=10, warmup_steps=2, min_rate=0.1) for s in range(10)])
    assert all(b == pytest.approx(a * 0.1) for a, b in seen)


def test_constant_after_warmup():
    assert [a for a, _ in _lrs(constant, 5, warmup_steps=2)] == pytest.approx([0.5, 1, 1, 1, 1])


@pytest.mark.parametrize("kwargs, match", [
    ({"warmup_steps": -1}, "warmup_steps=-1"),
    ({"min_rate": 1.5}, "min_rate=1.5"),
])
def test_bad_cosine_values_are_named(kwargs, match):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=match):
        cosine(opt, total_steps=10, **kwargs)


def test_cosine_warmup_longer_than_the_run_warns_and_only_ramps(caplog):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = cosine(opt, total_steps=3, warmup_steps=100)       # `model/size=small trainer.max_steps=3`
    assert "warmup_steps=100 >= the run's 3 steps" in caplog.text
    assert [scheduler.lr_lambdas[0](s) for s in range(3)] == pytest.approx([0.01, 0.02, 0.03])


def test_sgdr_warmup_longer_than_the_run_warns_as_cosine_does(caplog):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sgdr(opt, total_steps=10, warmup_steps=150)                     # `scheduler=sgdr trainer.max_steps=10`
    assert "warmup_steps=150 >= the run's 10 steps" in caplog.text and "middle of a cycle" not in caplog.text


def test_sgdr_warns_when_training_stops_mid_cycle(caplog):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sgdr(opt, total_steps=10, cycle_steps=2, t_mult=2)
    assert "middle of a cycle" in caplog.text
    caplog.clear()
    sgdr(opt, total_steps=14, cycle_steps=2, t_mult=2)
    assert "middle of a cycle" not in caplog.text


def test_sgdr_does_not_warn_when_a_long_run_ends_on_a_late_cycle(caplog):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sgdr(opt, total_steps=3000, cycle_steps=2, t_mult=1)           # the 1500th end, far past the first 8
    sgdr(opt, total_steps=100 + 2046, warmup_steps=100, cycle_steps=2, t_mult=2)   # the 10th end
    assert "middle of a cycle" not in caplog.text
    sgdr(opt, total_steps=3001, cycle_steps=2, t_mult=1)
    assert "cycles end after 3000 or 3002 steps" in caplog.text    # the nearest ends, not the first 8
