"""Reward functions that see token ids (`completion_ids`) and DAPO's soft overlong punishment (eq. 13)."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from llmtrain.strategies import rollout as rollout_module
from llmtrain.strategies.grpo import GRPO
from llmtrain.strategies.rewards import Accuracy, OverlongPenalty, wants_completion_ids
from tests.strategies.test_grpo import TOKENIZER, distinct_chars, grpo, prompts_data, tiny_model


def dapo_eq13(length: int, l_max: int, l_cache: int) -> float:
    """The paper's formula, written out case by case."""
    if length <= l_max - l_cache:
        return 0.0
    if length <= l_max:
        return ((l_max - l_cache) - length) / l_cache
    return -1.0


def test_the_overlong_penalty_follows_eq_13_at_its_boundaries():
    penalty = OverlongPenalty(max_length=10, cache_length=4)
    lengths = [0, 5, 6, 7, 8, 9, 10, 11, 40]
    got = penalty([""] * 9, [""] * 9, [""] * 9, completion_ids=[[1] * n for n in lengths])
    assert got == [dapo_eq13(n, 10, 4) for n in lengths]
    assert got == [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]


@pytest.mark.parametrize("max_length, cache_length", [(8, 8), (8, 0), (4, 9)])
def test_the_overlong_penalty_refuses_a_ramp_outside_the_limit(max_length, cache_length):
    with pytest.raises(ValueError, match=f"cache_length={cache_length}, max_length={max_length}"):
        OverlongPenalty(max_length=max_length, cache_length=cache_length)


def texts_only(prompts, completions, answers):
    return [0.0] * len(completions)


def with_ids(prompts, completions, answers, completion_ids):
    return [float(len(ids)) for ids in completion_ids]


def ends_with_eos(prompts, completions, answers, **kwargs):
    eos = kwargs["eos"]
    return [float(ids[-1] == eos) for ids in kwargs["completion_ids"]]


def test_only_functions_that_take_completion_ids_are_given_them():
    assert [wants_completion_ids(fn) for fn in (texts_only, Accuracy(), with_ids, ends_with_eos,
                                                functools.partial(with_ids), OverlongPenalty(8, 2), len)] \
        == [False, False, True, True, True, True, False]


def test_a_rollout_passes_the_ids_up_to_the_first_eos_and_text_only_rewards_still_work(monkeypatch):
    model, batch = tiny_model(), next(prompts_data(batch_size=4).train_batches(0))
    first = int(grpo(max_new_tokens=6).prepare(model, batch, step=0)["input_ids"][0, -6])   # row 0's first token
    ends = functools.partial(ends_with_eos, eos=first)                     # taken as EOS: row 0 ends at once
    strategy = GRPO(rewards=[distinct_chars, with_ids, ends, OverlongPenalty(max_length=6, cache_length=3)],
                    max_new_tokens=6, kl_coef=0.0)
    strategy.setup(model, SimpleNamespace(tokenizer=SimpleNamespace(**{k: getattr(TOKENIZER, k) for k in (
        "pad_id", "bos_id", "vocab_size", "decode")}, eos_id=first)))
    monkeypatch.setattr(rollout_module, "wants_completion_ids", None)    # read at construction, not per call
    rollout = strategy.prepare(model, batch, step=0)                      # the same draws
    chars_R, length_R, ends_R, penalty_R = rollout["rewards"].unbind(-1)
    lengths = rollout["completion_mask"].sum(-1)
    assert torch.equal(length_R, lengths.float()) and torch.equal(ends_R, (~rollout["truncated"]).float())
    assert rollout["truncated"].any() and not rollout["truncated"].all()
    assert chars_R.tolist() == [len(set(row["completion"])) for row in strategy.rollouts.last_texts]   # texts only
    assert penalty_R.tolist() == [dapo_eq13(n, 6, 3) for n in lengths.tolist()] and penalty_R.max() > -1
