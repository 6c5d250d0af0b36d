"""Greedy decoding on equal-length buckets."""

from __future__ import annotations

import pytest
import torch

from llmtrain.generate import greedy_decode

EOS = 0


class CountUp(torch.nn.Module):
    """Always predicts last token + 1, and EOS after token 9; counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        nxt_B = ids_BT[:, -1] + 1
        nxt_B = torch.where(nxt_B > 9, torch.full_like(nxt_B, EOS), nxt_B)
        logits_BTV = torch.zeros(*ids_BT.shape, 12)
        logits_BTV[torch.arange(len(ids_BT)), -1, nxt_B] = 1.0
        return logits_BTV


def test_each_prompt_gets_its_continuation_cut_at_eos():
    prompts = [[5], [1, 2], [7], [3, 8]]           # two lengths, so two buckets
    out = greedy_decode(CountUp(), prompts, max_new_tokens=4, eos_id=EOS)
    assert out == [[6, 7, 8, 9], [3, 4, 5, 6], [8, 9], [9]]


def test_a_bucket_stops_once_every_row_has_ended():
    model = CountUp()
    assert greedy_decode(model, [[7], [8]], max_new_tokens=10, eos_id=EOS) == [[8, 9], [9]]
    assert model.calls == 3                        # 8|9, 9|EOS, EOS|...: all rows done


def test_max_new_tokens_bounds_the_output():
    assert greedy_decode(CountUp(), [[1]], max_new_tokens=2, eos_id=EOS) == [[2, 3]]
    assert greedy_decode(CountUp(), [[1]], max_new_tokens=0, eos_id=EOS) == [[]]


def test_an_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        greedy_decode(CountUp(), [[1], []], max_new_tokens=2, eos_id=EOS)
