"""MoE feed-forward (SPECS 3): parity with a per-token loop, routing weights, balance loss, trainability."""

from __future__ import annotations

import functools

import pytest
import torch
from hydra.utils import instantiate

from llmtrain.entry import train
from llmtrain.models.attention_gqa import GQAttention
from llmtrain.models.moe import MoE, balance, collect_aux_loss, moe_expert_hidden_dim
from llmtrain.models.transformer import Transformer
from llmtrain.pretrained import build
from tests.conftest import SMOKE, compose_cfg
from tests.reference import naive_balance, naive_moe


def moe(**kwargs) -> MoE:
    torch.manual_seed(0)
    layer = MoE(**{"dim": 16, "n_routed_experts": 4, "n_experts_per_tok": 2, "n_shared_experts": 1,
                   "expert_hidden_dim": 24} | kwargs)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)     # a router far from uniform, so the top-K choice matters
    return layer


VARIANTS = [{}, {"norm_topk_prob": False}, {"n_experts_per_tok": 1}, {"n_shared_experts": 0},
            {"n_shared_experts": 2, "n_experts_per_tok": 3, "routed_scaling_factor": 2.5}]


@pytest.mark.parametrize("kwargs", VARIANTS, ids=[str(v) for v in VARIANTS])
def test_matches_per_token_reference(kwargs):
    layer = moe(**kwargs)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x).double(), naive_moe(layer, x), atol=1e-5, rtol=1e-5)


def test_train_and_eval_outputs_match():
    layer = moe()
    x = torch.randn(4, 9, 16)
    train_out = layer.train()(x)
    eval_out = layer.eval()(x)
    assert (train_out - eval_out).abs().max() <= 1e-6


def test_routed_scaling_factor_applies_without_renormalisation():
    x = torch.randn(2, 5, 16)
    base = moe(n_shared_experts=0, norm_topk_prob=False)
    scaled = moe(n_shared_experts=0, norm_topk_prob=False, routed_scaling_factor=2.0)
    torch.testing.assert_close(scaled(x), 2.0 * base(x))
    weights, _ = scaled.route(scaled.router_scores(x.view(-1, 16)))
    assert weights.sum(-1).max() < 2.0      # unnormalised softmax scores, times 2


def test_k1_skips_renormalisation_so_the_router_learns_from_the_lm_loss():
    """SPECS 3.4: renormalising a single score would give weight 1 and no router gradient."""
    layer = moe(n_experts_per_tok=1, norm_topk_prob=True, aux_loss_coef=0.0)
    x = torch.randn(2, 6, 16)
    scores = layer.router_scores(x.view(-1, 16))
    weights, _ = layer.route(scores)
    torch.testing.assert_close(weights[:, 0], scores.max(-1).values)
    layer(x).square().mean().backward()
    assert layer.gate.weight.grad.norm() > 1e-3


def test_shipped_config_routes_lm_gradient_to_the_router(tmp_path):
    cfg = compose_cfg("model=moe", f"paths.output_dir={tmp_path}")
    torch.manual_seed(0)
    layer = instantiate(cfg.model.ffn)(dim=cfg.model.dim)
    layer(torch.randn(2, 8, cfg.model.dim)).square().mean().backward()
    assert layer.pop_aux_loss() is not None and layer.gate.weight.grad.norm() > 1e-3


def test_balance_matches_formula_on_hand_built_routing():
    scores = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    experts = torch.tensor([[0, 1], [0, 1], [3, 2]])
    got = balance(scores[None], experts[None])
    assert got.item() == pytest.approx(naive_balance(scores, experts), abs=1e-6)
    uniform = balance(torch.full((1, 4, 4), 0.25), torch.tensor([[[0, 1], [2, 3], [0, 2], [1, 3]]]))
    assert uniform.item() == pytest.approx(1.0, abs=1e-6)


def test_uniform_router_gives_exactly_the_coefficient():
    layer = moe(aux_loss_coef=0.01)
    with torch.no_grad():
        layer.gate.weight.zero_()     # every score 1/E: sum_i f_i P_i = 1 whatever the top-K picks
    layer(torch.randn(3, 5, 16))
    assert layer.pop_aux_loss().item() == pytest.approx(0.01, abs=1e-8)


@pytest.mark.parametrize("seq_aux", [True, False])
def test_aux_loss_is_the_mean_over_balance_groups(seq_aux):
    layer = moe(aux_loss_coef=0.1, seq_aux=seq_aux)
    x = torch.randn(3, 6, 16)
    layer(x)
    scores = layer.router_scores(x.view(-1, 16)).detach()
    experts = scores.topk(2, dim=-1).indices
    groups = [slice(6 * b, 6 * b + 6) for b in range(3)] if seq_aux else [slice(None)]
    want = 0.1 * sum(naive_balance(scores[g], experts[g]) for g in groups) / len(groups)
    assert layer.pop_aux_loss().item() == pytest.approx(want, abs=1e-6)
    assert layer.pop_aux_loss() is None      # popping clears


def test_aux_loss_recorded_only_when_training_with_grad():
    layer = moe()
    x = torch.randn(2, 4, 16)
    layer.eval()(x)
    with torch.no_grad():
        layer.train()(x)
    assert layer.pop_aux_loss() is None
    layer(x)
    once = layer.pop_aux_loss()
    layer(x)
    layer(x)
    twice = layer.pop_aux_loss()     # two forwards count as one batch of both: the mean, not the sum
    assert once.requires_grad and torch.allclose(once, twice)


def test_experts_without_tokens_get_zero_gradients_not_none():
    layer = moe(n_routed_experts=8, n_experts_per_tok=1)
    layer(torch.randn(1, 1, 16)).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    assert sum(int(e.w1.weight.grad.abs().sum() > 0) for e in layer.experts) == 1


def test_default_expert_width_keeps_active_parameters_of_the_dense_ffn():
    assert moe_expert_hidden_dim(128, n_active=3) == 128         # dense tiny: F = 384 = 3 * 128
    assert MoE(dim=128).expert_hidden_dim == 128
    with pytest.raises(ValueError, match="n_experts_per_tok=5"):
        MoE(dim=16, n_routed_experts=4, n_experts_per_tok=5)


def test_meta_built_model_is_initialised_by_init_weights():
    """Experts are plain SwiGLUs, so Transformer.init_weights covers them after to_empty (no hook)."""
    with torch.device("meta"):
        model = Transformer(vocab_size=50, dim=64, n_layers=2, attention=functools.partial(GQAttention, n_heads=4),
                            ffn=functools.partial(MoE, n_routed_experts=8, expert_hidden_dim=256))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    moe_layer = model.layers[0].ffn
    assert torch.stack([e.w1.weight for e in moe_layer.experts]).std().item() == pytest.approx(0.02, rel=0.05)
    residual = torch.stack([e.w2.weight for e in moe_layer.experts]).std().item()
    assert residual == pytest.approx(0.02 / 2, rel=0.05)                 # 1/sqrt(2 * n_layers)
    assert moe_layer.gate.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.isfinite(model(torch.randint(0, 50, (1, 5)))).all()


def test_collect_aux_loss_sums_layers_and_clears():
    torch.manual_seed(0)
    model = Transformer(vocab_size=50, dim=32, n_layers=3, attention=functools.partial(GQAttention, n_heads=4),
                        ffn=functools.partial(MoE, aux_loss_coef=0.5))
    model(torch.randint(0, 50, (2, 8)))
    per_layer = [layer.ffn._balance[0][0].mean() * 0.5 for layer in model.layers]   # (terms, groups) of one forward
    torch.testing.assert_close(collect_aux_loss(model), torch.stack(per_layer).sum())
    assert collect_aux_loss(model) is None


def test_mla_attention_with_moe_ffn_builds(tmp_path):
    """`model=mla model/ffn=moe`: the DeepSeek-V2 pairing is one override, no new file."""
    cfg = compose_cfg("model=mla", "model/ffn=moe", f"paths.output_dir={tmp_path}")
    with torch.device("meta"):
        net = build(cfg.model, vocab_size=264)
    assert type(net.layers[0].attn).__name__ == "MLAttention" and isinstance(net.layers[-1].ffn, MoE)


def test_moe_model_trains_through_run_config(tmp_path):
    cfg = compose_cfg("model=moe", *SMOKE, "trainer.max_steps=4", "trainer.eval_every=4", "data.n_train=2000",
                      "data.n_eval=40", "data.accuracy_examples=8", f"paths.output_dir={tmp_path}")
    metrics, objects = train(cfg)
    assert isinstance(objects["model"].layers[0].ffn, MoE)
    layers, coef, experts = cfg.model.n_layers, cfg.model.ffn.aux_loss_coef, cfg.model.ffn.n_routed_experts
    assert 0.5 * layers * coef < metrics["aux_loss"] < layers * coef * experts   # 1 x coef per layer at balance
    assert torch.isfinite(torch.tensor([metrics["loss"], metrics["eval/loss"]])).all()


def masked_reference(layer: MoE, x_BTD, mask_BT, seq_aux: bool) -> float:
    """coef * mean over the groups with real tokens of naive_balance over those tokens (SPECS 3.2)."""
    scores_BTE = layer.router_scores(x_BTD.reshape(-1, x_BTD.shape[-1])).detach().view(*x_BTD.shape[:2], -1)
    groups = [(scores_BTE[b], mask_BT[b]) for b in range(len(x_BTD))] if seq_aux else [(scores_BTE, mask_BT)]
    terms = [naive_balance(s[m], s[m].topk(layer.n_experts_per_tok, dim=-1).indices) for s, m in groups if m.any()]
    return layer.aux_loss_coef * sum(terms) / len(terms)


@pytest.mark.parametrize("seq_aux", [True, False])
def test_appending_fully_padded_rows_leaves_the_aux_loss_unchanged(seq_aux):
    """SPECS 3.4: padding takes no part in f or P, so extra rows of padding change nothing."""
    layer = moe(aux_loss_coef=0.1, seq_aux=seq_aux)
    x = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False                        # right padding
    mask[2, :3] = False                        # left padding
    layer(x, token_mask_BT=mask)
    aux = layer.pop_aux_loss()
    assert aux.item() == pytest.approx(masked_reference(layer, x, mask, seq_aux), abs=1e-7)
    padded_x = torch.cat([x, torch.randn(2, 6, 16)])        # a pad's hidden state is anything
    layer(padded_x, token_mask_BT=torch.cat([mask, torch.zeros(2, 6, dtype=torch.bool)]))
    torch.testing.assert_close(layer.pop_aux_loss(), aux, atol=1e-7, rtol=1e-6)


def test_padding_gets_no_router_gradient_and_padding_alone_gives_zero_not_nan():
    layer = moe()
    x = torch.randn(2, 5, 16, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    layer(x, token_mask_BT=mask)
    layer.pop_aux_loss().backward()
    assert x.grad[~mask].abs().max() == 0 and x.grad[mask].abs().max() > 0
    layer(x, token_mask_BT=torch.zeros(2, 5, dtype=torch.bool))
    assert layer.pop_aux_loss().item() == 0.0


@pytest.mark.parametrize("seq_aux", [True, False])
def test_uniform_router_with_padding_still_gives_exactly_the_coefficient(seq_aux):
    layer = moe(aux_loss_coef=0.01, seq_aux=seq_aux)
    with torch.no_grad():
        layer.gate.weight.zero_()
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    layer(torch.randn(3, 5, 16), token_mask_BT=mask)
    assert layer.pop_aux_loss().item() == pytest.approx(0.01, abs=1e-8)


def calls_per_expert(layer: MoE) -> list[int]:
    calls = [0] * len(layer.experts)
    for e, expert in enumerate(layer.experts):
        expert.register_forward_pre_hook(lambda module, args, e=e: calls.__setitem__(e, calls[e] + 1))
    return calls


def test_without_autograd_experts_without_tokens_are_not_run():
    layer = moe(n_routed_experts=8, n_experts_per_tok=1)
    calls = calls_per_expert(layer)
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        layer(x)
    assert sum(calls) == 1                       # the one chosen expert
    layer(x)
    assert calls.count(0) == 0                   # with autograd every expert joins the graph (DDP)
    with torch.no_grad():
        assert layer(torch.randn(2, 0, 16)).shape == (2, 0, 16)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_outputs_with_and_without_autograd_match(mode):
    layer = getattr(moe(n_routed_experts=8, n_experts_per_tok=2), mode)()
    x = torch.randn(1, 3, 16)                    # 6 slots over 8 experts: some get none
    with_grad = layer(x)
    with torch.no_grad():
        without = layer(x)
    layer.pop_aux_loss()
    assert (with_grad - without).abs().max() <= 1e-6
