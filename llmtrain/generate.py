"""Greedy decoding for evaluation.

Prompts of equal length are decoded together, so no padding or position shifting is needed, and
every step recomputes the full forward: for the short answers of the built-in task that costs
less than the bookkeeping of a KV cache (a later version adds one for long generations).

Shape legend: B prompts in a bucket, T tokens so far, V vocabulary, N new tokens.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor, nn


@torch.no_grad()
def greedy_decode(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int,
                  device: torch.device | str = "cpu") -> list[list[int]]:
    """The greedy continuation of each prompt, cut before its first `eos_id`.

    Args:
        model: Called as `model(ids_BT) -> logits_BTV`; the caller chooses train or eval mode.
        prompts: Token ids per prompt (each non-empty).
        max_new_tokens: Most tokens generated per prompt.
        eos_id: Stops a row; not included in its output.
        device: Where the prompts are put (the model's device).

    Returns:
        One list of new token ids per prompt, in the order of `prompts`.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    outputs: list[list[int]] = [[] for _ in prompts]
    for indices in _buckets_by_length(prompts).values():
        ids_BT = torch.tensor([list(prompts[i]) for i in indices], dtype=torch.long, device=device)
        new_BN = _decode_bucket(model, ids_BT, max_new_tokens, eos_id)
        for i, row in zip(indices, new_BN.tolist()):
            outputs[i] = row[:row.index(eos_id)] if eos_id in row else row
    return outputs


def _buckets_by_length(prompts: Sequence[Sequence[int]]) -> dict[int, list[int]]:
    """Prompt indices grouped by token length."""
    buckets: dict[int, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; start it with <bos>")
        buckets[len(prompt)].append(i)
    return buckets


def _decode_bucket(model: nn.Module, ids_BT: Tensor, max_new_tokens: int, eos_id: int) -> Tensor:
    """Appends greedy tokens until every row has produced `eos_id` or the limit is reached; returns new_BN."""
    prompt_len = ids_BT.shape[1]
    finished_B = torch.zeros(ids_BT.shape[0], dtype=torch.bool, device=ids_BT.device)
    for _ in range(max_new_tokens):
        next_B = model(ids_BT)[:, -1].argmax(-1)
        ids_BT = torch.cat([ids_BT, next_B[:, None]], dim=1)
        finished_B |= next_B == eos_id
        if bool(finished_B.all()):
            break
    return ids_BT[:, prompt_len:]
