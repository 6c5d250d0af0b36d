import functools
import math

import pytest
import torch

from llmtrain.models.attention_gqa import GQAttention
from llmtrain.models.ffn import SwiGLU
from llmtrain.models.moe import MoE, collect_aux_loss
from llmtrain.models.transformer import Transformer
from tests.reference import naive_block


def tiny(**overrides) -> Transformer:
    kwargs = dict(
        vocab_size=50,
        dim=32,
        n_layers=2,
        attention=functools.partial(GQAttention, n_heads=4, n_kv_heads=2),
        ffn=functools.partial(SwiGLU, hidden_dim=48),
        rope_theta=1e4,
        max_seq_len=64,
    )
    return Transformer(**(kwargs | overrides))


def expected_params(V, D, L, H, K, E, F, tied, bias=False):
    """Closed form: embeddings + L * (attention + SwiGLU + 2 norms) + final norm."""
    attention = D * H * E + 2 * D * K * E + H * E * D + (H * E + 2 * K * E if bias else 0)
    per_layer = attention + 3 * D * F + 2 * D
    return V * D * (1 if tied else 2) + L * per_layer + D


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_param_count_matches_closed_form(tied, bias):
    attention = functools.partial(GQAttention, n_heads=4, n_kv_heads=2, head_dim=6, bias=bias)
    model = tiny(tie_embeddings=tied, attention=attention)
    assert model.num_params() == expected_params(50, 32, 2, 4, 2, 6, 48, tied, bias)


def test_tied_head_and_embedding_are_one_parameter():
    model = tiny()
    assert model.lm_head.weight is model.embed.weight
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    assert len({p.data_ptr() for p in model.parameters()}) == len(list(model.parameters()))
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed.weight


def test_logits_shape_and_dtype_follow_the_model():
    model = tiny()
    ids = torch.randint(0, 50, (2, 9))
    assert model(ids).shape == (2, 9, 50) and model(ids).dtype == torch.float32
    assert model.to(torch.bfloat16)(ids).dtype == torch.bfloat16


@pytest.mark.parametrize("keep", [1, 3])
def test_logits_to_keep_gives_the_last_positions_of_the_full_output(keep):
    torch.manual_seed(0)
    model = tiny().eval()
    ids, mask = torch.randint(0, 50, (2, 7)), torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])  # one row left-padded
    full_logits, full_hidden = model(ids, attention_mask_BT=mask, return_hidden=True)
    logits, hidden = model(ids, attention_mask_BT=mask, return_hidden=True, logits_to_keep=keep)
    assert logits.shape == (2, keep, 50) and hidden.shape == (2, keep, 32)
    torch.testing.assert_close(logits, full_logits[:, -keep:])
    torch.testing.assert_close(hidden, full_hidden[:, -keep:])
    assert model(ids, logits_to_keep=0).shape == (2, 7, 50)


def test_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = tiny()
    ids = torch.randint(0, 50, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 50
    torch.testing.assert_close(model(ids)[:, :6], model(changed)[:, :6])
    assert not torch.allclose(model(ids)[:, 6:], model(changed)[:, 6:])


def test_block_matches_reference_block():
    torch.manual_seed(0)
    model = tiny(norm_eps=1e-5)
    block = model.layers[1]
    with torch.no_grad():
        block.attn_norm.weight.uniform_(0.5, 1.5)
        block.ffn_norm.weight.uniform_(0.5, 1.5)
    x_BTD = torch.randn(2, 7, 32)
    y_BTD = block(x_BTD, *model.rope(7))
    expected_BTD = naive_block(block, x_BTD, theta=1e4, eps=1e-5)
    torch.testing.assert_close(y_BTD.double(), expected_BTD, atol=1e-5, rtol=1e-5)


def test_explicit_positions_equal_default():
    model = tiny()
    ids = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(model(ids, torch.arange(8)), model(ids))
    torch.testing.assert_close(model(ids, torch.arange(8).expand(2, 8)), model(ids))


def test_each_layer_gets_its_own_modules():
    model = tiny(n_layers=3)
    assert len({id(layer.attn) for layer in model.layers}) == 3
    assert len({id(layer.ffn) for layer in model.layers}) == 3


def test_init_scales_residual_outputs():
    torch.manual_seed(0)
    model = tiny(dim=256, n_layers=8, vocab_size=300, ffn=functools.partial(SwiGLU, hidden_dim=512))
    layer = model.layers[0]
    assert layer.attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.ffn.w1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for w in (layer.attn.wo.weight, layer.ffn.w2.weight):
        assert w.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.equal(layer.attn_norm.weight, torch.ones(256))


def test_builds_on_meta_and_materialises():
    with torch.device("meta"):
        model = tiny()
    model.to_empty(device="cpu")
    assert model.lm_head.weight is model.embed.weight  # to_empty alone would untie them
    model.init_weights()
    assert torch.isfinite(model(torch.randint(0, 50, (1, 5)))).all()


def test_hydra_partial_config_instantiates():
    instantiate = pytest.importorskip("hydra.utils").instantiate
    cfg = {
        "_target_": "llmtrain.models.transformer.Transformer",
        "vocab_size": 264,
        "dim": 128,
        "n_layers": 4,
        "attention": {
            "_target_": "llmtrain.models.attention_gqa.GQAttention",
            "_partial_": True,
            "n_heads": 4,
            "n_kv_heads": 2,
        },
        "ffn": {"_target_": "llmtrain.models.ffn.SwiGLU", "_partial_": True, "hidden_dim": None},
    }
    model = instantiate(cfg)
    assert model.layers[3].attn.n_kv_heads == 2 and model.layers[0].ffn.hidden_dim == 384
    assert model.num_params() == expected_params(264, 128, 4, 4, 2, 32, 384, tied=True)


def test_bad_sizes_name_the_values():
    with pytest.raises(ValueError, match="n_layers=0"):
        tiny(n_layers=0)


def padded(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T) padded with id 0 on `side`, and the mask of the real tokens."""
    T = max(len(row) for row in rows)
    ids, mask = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.bool)
    for b, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(T - len(row), T)
        ids[b, span], mask[b, span] = row, True
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_takes_no_part_in_the_moe_aux_loss(side):
    """Per-sequence balance (seq_aux) of a padded batch == the mean over its rows run one by one."""
    torch.manual_seed(0)
    model = tiny(ffn=functools.partial(MoE, n_routed_experts=4, expert_hidden_dim=16, aux_loss_coef=0.1))
    rows = [torch.randint(1, 50, (n,)) for n in (7, 3, 5)]
    solo = []
    for row in rows:
        model(row[None])
        solo.append(collect_aux_loss(model))
    ids, mask = padded(rows + [torch.zeros(0, dtype=torch.long)], side)     # plus a row of padding alone
    # Left padding is what attention_mask_BT describes; right padding needs no attention mask.
    model(ids, **({"attention_mask_BT": mask} if side == "left" else {"token_mask_BT": mask}))
    torch.testing.assert_close(collect_aux_loss(model), torch.stack(solo).mean(), atol=1e-6, rtol=1e-5)


def test_a_dense_model_ignores_the_token_mask():
    model = tiny().eval()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3], dtype=torch.bool)
    assert torch.equal(model(ids, token_mask_BT=mask), model(ids))
