"""Greedy decoding for evaluation.

Prompts of equal length are decoded together, so no padding or position shifting is needed;
every step recomputes the full forward (cheap for the short answers of the built-in task).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn


@torch.no_grad()
def greedy_decode(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int,
                  device: torch.device | str = "cpu") -> list[list[int]]:
    """The greedy continuation of each prompt, cut before the first `eos_id` (at most `max_new_tokens`).

    `model(ids_BT)` must return logits_BTV. Returns one list of new token ids per prompt, in order.
    """
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)
    outputs: list[list[int]] = [[] for _ in prompts]
    for indices in by_length.values():
        ids_BT = torch.tensor([list(prompts[i]) for i in indices], dtype=torch.long, device=device)
        new_BN = _decode_bucket(model, ids_BT, max_new_tokens, eos_id)
        for i, row in zip(indices, new_BN.tolist()):
            outputs[i] = row[:row.index(eos_id)] if eos_id in row else row
    return outputs


def _decode_bucket(model: nn.Module, ids_BT: torch.Tensor, max_new_tokens: int, eos_id: int) -> torch.Tensor:
    prompt_len = ids_BT.shape[1]
    finished_B = torch.zeros(ids_BT.shape[0], dtype=torch.bool, device=ids_BT.device)
    for _ in range(max_new_tokens):
        next_B = model(ids_BT)[:, -1].argmax(-1)
        ids_BT = torch.cat([ids_BT, next_B[:, None]], dim=1)
        finished_B |= next_B == eos_id
        if finished_B.all():
            break
    return ids_BT[:, prompt_len:]
