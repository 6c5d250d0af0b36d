"""Parameter groups by name pattern."""

from __future__ import annotations

import pytest
from torch import nn

from llmtrain.optim import adamw


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4, bias=True)
        self.attn_norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight       # tied: must be seen once


def _groups(opt):
    return {tuple(g["names"]): (g["lr"], g["weight_decay"]) for g in opt.param_groups}


def test_first_matching_pattern_wins_and_tied_weights_appear_once():
    opt = adamw(Tiny().named_parameters(), lr=1e-3, weight_decay=0.1, groups=[
        {"pattern": "*norm.*", "weight_decay": 0.0},
        {"pattern": "*.bias", "weight_decay": 0.0, "lr": 5e-4},
        {"pattern": "embed.*", "lr": 1e-4},
    ])
    assert _groups(opt) == {
        ("attn_norm.weight", "attn_norm.bias"): (1e-3, 0.0),
        ("proj.bias",): (5e-4, 0.0),
        ("embed.weight",): (1e-4, 0.1),
        ("proj.weight",): (1e-3, 0.1),
    }
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(Tiny().parameters()))


def test_frozen_parameters_are_left_out():
    model = Tiny()
    model.proj.requires_grad_(False)
    names = [n for g in adamw(model.named_parameters(), lr=1e-3).param_groups for n in g["names"]]
    assert "proj.weight" not in names and "embed.weight" in names


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": -1e-3}, r"optimizer.lr=-0.001"),
    ({"lr": 1e-3, "weight_decay": -0.1}, r"weight_decay=-0.1"),
    ({"lr": 1e-3, "groups": [{"pattern": "*", "momentum": 0.9}]}, "momentum"),
    ({"lr": 1e-3, "groups": [{"pattern": "*", "lr": -1.0}]}, "lr must be > 0"),
])
def test_bad_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adamw(Tiny().named_parameters(), **kwargs)
