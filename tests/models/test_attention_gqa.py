import pytest
import torch

from llmtrain.models.attention_gqa import GQAttention
from llmtrain.models.rope import RotaryEmbedding
from tests.reference import naive_causal_attention, naive_gqa, naive_rope

THETA = 1e4


def rope_for(attn: GQAttention, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    return RotaryEmbedding(attn.rope_dim, THETA, max_seq_len=64)(T)


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_matches_naive_reference(n_heads, n_kv_heads):
    torch.manual_seed(0)
    attn = GQAttention(dim=32, n_heads=n_heads, n_kv_heads=n_kv_heads)
    x_BTD = torch.randn(2, 7, 32)
    y_BTD = attn(x_BTD, *rope_for(attn, 7))
    torch.testing.assert_close(y_BTD.double(), naive_gqa(attn, x_BTD, THETA), atol=1e-5, rtol=1e-5)


def test_sdpa_matches_naive_attention_on_projected_heads():
    torch.manual_seed(0)
    attn = GQAttention(dim=32, n_heads=4, n_kv_heads=2)
    x_BTD = torch.randn(2, 7, 32)
    q_BHTE, k_BKTE, v_BKTE = attn.project(x_BTD, *rope_for(attn, 7))
    assert q_BHTE.shape == (2, 4, 7, 8) and k_BKTE.shape == v_BKTE.shape == (2, 2, 7, 8)
    y_BHTE = naive_causal_attention(q_BHTE, k_BKTE, v_BKTE)
    expected_BTD = attn.wo(y_BHTE.transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(attn(x_BTD, *rope_for(attn, 7)), expected_BTD, atol=1e-5, rtol=1e-5)


def test_project_rotates_q_and_k_but_not_v():
    torch.manual_seed(0)
    attn = GQAttention(dim=16, n_heads=2, n_kv_heads=1)
    x_BTD = torch.randn(1, 5, 16)
    q_BHTE, k_BKTE, v_BKTE = attn.project(x_BTD, *rope_for(attn, 5))
    raw_q = attn.wq(x_BTD).view(1, 5, 2, 8).transpose(1, 2)
    raw_v = attn.wv(x_BTD).view(1, 5, 1, 8).transpose(1, 2)
    expected_q = naive_rope(raw_q, torch.arange(5), THETA)
    torch.testing.assert_close(q_BHTE.double(), expected_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_BKTE, raw_v)


def test_kv_heads_are_repeated_consecutively():
    # v of kv head j is the constant j; each query head then outputs its kv head's constant.
    attn = GQAttention(dim=16, n_heads=4, n_kv_heads=2, head_dim=4, bias=True)
    with torch.no_grad():
        attn.wv.weight.zero_()
        attn.wv.bias.copy_(torch.tensor([0.0] * 4 + [1.0] * 4))
        attn.wo.weight.copy_(torch.eye(16))
    y_BTD = attn(torch.randn(1, 3, 16), *rope_for(attn, 3))
    per_head = y_BTD.view(1, 3, 4, 4)[0, :, :, 0]
    torch.testing.assert_close(per_head, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(3, 4))


def test_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    attn = GQAttention(dim=32, n_heads=4, n_kv_heads=2)
    x = torch.randn(1, 6, 32)
    y = x.clone()
    y[:, 4:] += 1.0
    cos, sin = rope_for(attn, 6)
    torch.testing.assert_close(attn(x, cos, sin)[:, :4], attn(y, cos, sin)[:, :4])


def test_bias_only_on_qkv():
    attn = GQAttention(dim=16, n_heads=2, bias=True)
    assert all(m.bias is not None for m in (attn.wq, attn.wk, attn.wv)) and attn.wo.bias is None
    assert GQAttention(dim=16, n_heads=2).wq.bias is None


def test_explicit_head_dim_and_rope_dim():
    attn = GQAttention(dim=16, n_heads=4, n_kv_heads=2, head_dim=6)
    assert attn.rope_dim == 6 and attn.wq.weight.shape == (24, 16) and attn.wk.weight.shape == (12, 16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=48, n_heads=6, n_kv_heads=4), "n_heads=6 is not divisible by n_kv_heads=4"),
        (dict(dim=30, n_heads=4), r"dim=30 is not divisible by n_heads=4; .*\+model.attention.head_dim=<n>"),
        (dict(dim=32, n_heads=4, head_dim=7), "head_dim=7"),
        (dict(dim=32, n_heads=4, n_kv_heads=0), "n_kv_heads=0"),
    ],
)
def test_constructor_errors_name_the_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GQAttention(**kwargs)
