"""Greedy decoding on equal-length buckets."""

from __future__ import annotations

import torch

from llmtrain.generate import greedy_decode

EOS = 0


class CountUp(torch.nn.Module):
    """Always predicts last token + 1, and EOS after token 9."""

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        nxt = ids_BT[:, -1] + 1
        nxt = torch.where(nxt > 9, torch.full_like(nxt, EOS), nxt)
        logits = torch.zeros(*ids_BT.shape, 12)
        logits[torch.arange(len(ids_BT)), -1, nxt] = 1.0
        return logits


def test_each_prompt_gets_its_continuation_cut_at_eos():
    prompts = [[5], [1, 2], [7], [3, 8]]           # two lengths, so two buckets
    out = greedy_decode(CountUp(), prompts, max_new_tokens=4, eos_id=EOS)
    assert out == [[6, 7, 8, 9], [3, 4, 5, 6], [8, 9], [9]]


def test_max_new_tokens_bounds_the_output():
    assert greedy_decode(CountUp(), [[1]], max_new_tokens=2, eos_id=EOS) == [[2, 3]]
