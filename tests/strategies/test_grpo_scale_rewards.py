"""GRPO's scale_rewards (SPECS 4.4.1): group, batch (the window's std over all ranks) and none (Dr. GRPO)."""

from __future__ import annotations

import math

import pytest
import torch

from llmtrain.strategies.dapo import DAPO
from llmtrain.strategies.dr_grpo import DrGRPO
from llmtrain.strategies.grpo import GRPO
from llmtrain.strategies.rewards import Accuracy
from tests.strategies.test_grpo import grpo, hand_made_batch, prompts_data, tiny_model

SPECS_REWARDS = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])         # SPECS 4.4.4's fixture, G = 4


def local(value: torch.Tensor) -> torch.Tensor:
    return value


def windowed_advantages(strategy: GRPO, batches: list[dict]) -> torch.Tensor:
    batches = strategy.prepare_window(batches, local)
    return torch.cat([strategy.advantages(b["rewards"][:, 0].view(-1, 4), b.get("batch_reward_std")).flatten()
                      for b in batches])


def test_each_scale_gives_its_formula_on_the_specs_fixture():
    batch = {"rewards": SPECS_REWARDS[:, None]}
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    std = float(SPECS_REWARDS.std())                               # unbiased, of all 8: 0.5175
    assert std == pytest.approx((1.875 / 7) ** 0.5)
    want = {"group": torch.tensor([1.4997, -0.4999, -0.4999, -0.4999, 0, 0, 0, 0]),
            "batch": centred / (std + 1e-4), "none": centred}
    for scale, advantages in want.items():
        got = windowed_advantages(GRPO(rewards=[Accuracy()], scale_rewards=scale), [batch])
        torch.testing.assert_close(got, advantages, atol=1e-4, rtol=0)
    assert DrGRPO(rewards=[Accuracy()]).scale_rewards == "none"
    assert DrGRPO(rewards=[Accuracy()], scale_rewards="batch").scale_rewards == "batch"


def test_the_batch_std_spans_the_window_and_the_ranks():
    strategy = GRPO(rewards=[Accuracy()], scale_rewards="batch")
    halves = [{"rewards": SPECS_REWARDS[:4, None]}, {"rewards": SPECS_REWARDS[4:, None]}]
    whole = windowed_advantages(strategy, [{"rewards": SPECS_REWARDS[:, None]}])
    torch.testing.assert_close(windowed_advantages(strategy, halves), whole)
    other_rank = strategy.sampled_moments(halves[1])                 # rank 1 holds the second group
    [rank0] = strategy.prepare_window([halves[0]], lambda moments: moments + other_rank)
    assert float(rank0["batch_reward_std"]) == pytest.approx(float(SPECS_REWARDS.std()))


@pytest.mark.parametrize("cls", [GRPO, DAPO])
def test_a_batch_scaled_window_of_two_micro_batches_has_the_gradient_of_one_big_batch(cls):
    model, strategy = tiny_model(), grpo(cls, kl_coef=0.0, scale_rewards="batch")
    big = hand_made_batch()
    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]

    def gradients(batches: list[dict]) -> list[torch.Tensor]:
        model.zero_grad()
        batches = strategy.prepare_window(batches, local)
        num_items = sum(strategy.num_items(b) for b in batches)
        for batch in batches:
            strategy.loss(model, batch, num_items)[0].backward()
        return [p.grad.clone() for p in model.parameters()]

    want, got = gradients([big]), gradients(halves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    strategy.scale_rewards = "group"                                  # the two stds differ here
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(gradients([big]), want))


def test_with_filter_groups_the_batch_std_is_that_of_every_sampled_completion():
    strategy = grpo(kl_coef=0.0, filter_groups=True, scale_rewards="batch")
    big = hand_made_batch()
    big["rewards"][4:] = 1.0                                          # the second group is dropped
    [kept] = strategy.prepare_window([strategy.keep_varied_groups(big)], local)
    assert len(kept["rewards"]) == 4
    assert float(kept["batch_reward_std"]) == pytest.approx(float(big["rewards"].std()))


def test_reused_rollouts_stay_the_buffered_objects_and_checkpoints_hold_no_std():
    strategy, model = grpo(num_iterations=2, kl_coef=0.0, scale_rewards="batch"), tiny_model()
    batches = list(prompts_data().train_batches(0))
    [fresh] = strategy.prepare_window([strategy.prepare(model, batches[0], step=0)], local)
    reused = strategy.prepare(model, batches[1], step=1)
    assert reused is strategy.rollouts.buffer[0] and "batch_reward_std" not in reused
    [again] = strategy.prepare_window([reused], local)
    assert torch.equal(again["batch_reward_std"], fresh["batch_reward_std"])
    assert not any("batch_reward_std" in key for key in strategy.state_dict())


def test_the_loss_counts_the_groups_of_equal_rewards_and_needs_the_window_std():
    model, batch = tiny_model(), hand_made_batch()
    batch["rewards"][4:] = 1.0
    strategy = grpo(kl_coef=0.0, scale_rewards="batch")
    with pytest.raises(ValueError, match="prepare_window"):
        strategy.loss(model, batch, 8)
    [prepared] = strategy.prepare_window([batch], local)
    _, parts = strategy.loss(model, prepared, 8)
    assert strategy.summarize({k: float(v) for k, v in parts.items()})["frac_reward_zero_std"] == 0.5


def test_an_unknown_scale_is_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"strategy.scale_rewards='std'"):
        GRPO(rewards=[Accuracy()], scale_rewards="std")


def test_the_trainer_gives_batch_scaling_its_window_std_in_training_and_evaluation():
    from llmtrain.hardware import Hardware
    from llmtrain.optim import adamw
    from llmtrain.schedulers import constant
    from llmtrain.trainer import Trainer

    model, data = tiny_model(), prompts_data()
    strategy = grpo(kl_coef=0.0, scale_rewards="batch")
    metrics = Trainer(model=model, strategy=strategy, data=data, optimizer=adamw(model.named_parameters(), lr=1e-3),
                      scheduler=constant, hardware=Hardware(device="cpu", precision="fp32"), max_steps=2,
                      accumulation_steps=2, eval_every=1, eval_batches=2).fit()     # a missing std would raise
    assert 0 <= metrics["frac_reward_zero_std"] <= 1 and 0 <= metrics["eval/frac_reward_zero_std"] <= 1
    assert all(math.isfinite(v) for v in metrics.values())
