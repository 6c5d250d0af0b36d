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


@pytest.mark.parametrize("fused, want", [(None, True), (False, False), (True, True)])
def test_cpu_parameters_take_the_fused_kernel_unless_told_otherwise(fused, want):
    import torch
    model = Tiny()
    opt = adamw(model.named_parameters(), lr=1e-2, fused=fused)
    assert bool(opt.defaults["fused"]) is want
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = model.proj.weight.detach().clone()
    opt.step()                                   # the fused kernel runs on CPU tensors
    assert not torch.equal(model.proj.weight, before)


def test_the_fused_step_matches_the_default_one():
    import torch
    steps = []
    for fused in (None, False):
        torch.manual_seed(0)
        model = Tiny()
        opt = adamw(model.named_parameters(), lr=1e-2, fused=fused)
        for i in range(3):
            torch.manual_seed(i + 1)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
        steps.append([p.detach().clone() for p in model.parameters()])
    for got, want in zip(*steps):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)


def test_a_fused_step_moves_the_version_counters_so_no_grad_weight_copies_follow():
    """The fused kernel writes behind the version counter; llmtrain.models.linear's kept copies key
    on it, so without the step hook an evaluation after training would use the first weights."""
    import torch
    import torch.nn.functional as F
    from llmtrain.models.linear import Linear, use_onednn
    use_onednn(True)
    torch.manual_seed(0)
    layer, x = Linear(16, 8), torch.randn(4, 16)
    opt = adamw(layer.named_parameters(), lr=0.1)
    assert opt.defaults["fused"]
    with torch.no_grad():
        layer(x)                                 # keeps a copy of the initial weight
    layer(x).sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_the_lr_metric_follows_optimizer_lr_not_the_first_rule_group():
    """HRPO's gate group (lr 1e-4) comes first; `lr` in metrics.jsonl must be the base lr."""
    import torch

    from llmtrain.trainer import logged_group
    opt = adamw(Tiny().named_parameters(), lr=3e-3, groups=[{"pattern": "embed.*", "lr": 1e-4}])
    assert opt.param_groups[0]["lr"] == 1e-4 and logged_group(opt)["lr"] == 3e-3
    only_rules = adamw(Tiny().named_parameters(), lr=3e-3, groups=[{"pattern": "*", "lr": 1e-4}])
    assert logged_group(only_rules)["lr"] == 1e-4          # no unmatched parameter: the first group
    plain = torch.optim.SGD(Tiny().parameters(), lr=0.5)   # a user's own optimizer
    assert logged_group(plain)["lr"] == 0.5


def test_a_pattern_that_matches_nothing_is_warned_about_unless_optional(caplog):
    rules = [{"pattern": "*atention*", "lr": 1e-4}, {"pattern": "*thinking*", "lr": 1e-4, "optional": True}]
    with caplog.at_level("WARNING", logger="llmtrain.optim"):
        adamw(Tiny().named_parameters(), lr=1e-3, groups=rules)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "'*atention*' matches no parameter" in warned[0] and "'embed.weight'" in warned[0]


def test_the_shipped_groups_warn_about_nothing_on_every_model_option(caplog):
    """The default rules for biases and HRPO's modules are optional, so a default run logs no warning."""
    from hydra.utils import instantiate

    from llmtrain.pretrained import build
    from tests.conftest import compose_cfg
    for overrides in ([], ["model=mla"], ["model=moe"], ["model/thinking=hrpo"], ["model/thinking=hrpo_proj"]):
        cfg = compose_cfg(*overrides, "model.vocab_size=264", "paths.output_dir=unused")
        caplog.clear()
        with caplog.at_level("WARNING", logger="llmtrain.optim"):
            instantiate(cfg.optimizer)(build(cfg.model).named_parameters())
        assert not caplog.records, (overrides, [r.getMessage() for r in caplog.records])
