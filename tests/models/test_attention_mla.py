"""MLAttention against the naive SPECS 2.1 formula, absorbed vs naive, and its KV cache (SPECS 2.2-2.5)."""

import pytest
import torch

from llmtrain.models.attention_mla import MLAttention
from llmtrain.models.kv_cache import padding_attention_mask
from llmtrain.models.rope import RotaryEmbedding
from tests.reference import naive_mla

THETA = 1e4
# d_v (12) != d_qk (16 + 8) and d_c (20) != d_nope (16): the sizes at which the pitfalls of
# SPECS 2.5 (wrong scale, wrong split, wrong absorption) show.
SIZES = dict(dim=32, n_heads=4, kv_lora_rank=20, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)


def random_mla(q_lora_rank: int | None = None, **overrides) -> MLAttention:
    torch.manual_seed(0)
    attn = MLAttention(**(SIZES | {"q_lora_rank": q_lora_rank} | overrides))
    with torch.no_grad():
        for name, p in attn.named_parameters():
            # gains of one would not test where the norms sit; 0.3 keeps the softmax away from one-hot
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.3)
    return attn


def rope_for(attn: MLAttention, T: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return RotaryEmbedding(attn.rope_dim, THETA, max_seq_len=64)(T, torch.arange(start, start + T))


@pytest.mark.parametrize("q_lora_rank", [None, 10])
def test_matches_naive_reference(q_lora_rank):
    attn = random_mla(q_lora_rank)
    x_BTD = torch.randn(2, 9, 32)
    y_BTD = attn(x_BTD, *rope_for(attn, 9))
    torch.testing.assert_close(y_BTD.double(), naive_mla(attn, x_BTD, THETA), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_absorbed_equals_naive(padded):
    attn = random_mla(q_lora_rank=10)
    x_BTD = torch.randn(3, 8, 32)
    mask = None
    if padded:  # left padding of 0, 2 and 5 tokens, as generation builds it
        key_mask_BS = torch.arange(8) >= torch.tensor([[0], [2], [5]])
        mask = padding_attention_mask(key_mask_BS, n_new=8)
    q_nope, q_pe, latent, k_pe = attn.project(x_BTD, *rope_for(attn, 8))
    naive = attn.attend_naive(q_nope, q_pe, latent, k_pe, mask)
    absorbed = attn.attend_absorbed(q_nope, q_pe, latent, k_pe, mask)
    assert absorbed.shape == (3, 4, 8, 12)
    torch.testing.assert_close(absorbed, naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefill", [1, 5])
def test_cached_decode_equals_full_forward_at_every_step(prefill):
    attn = random_mla(q_lora_rank=10)
    x_BTD = torch.randn(2, 11, 32)
    full_BTD = attn(x_BTD, *rope_for(attn, 11))
    cache = attn.new_cache(2, 16, torch.float32, "cpu")
    steps = [attn(x_BTD[:, :prefill], *rope_for(attn, prefill), cache=cache)]
    for t in range(prefill, 11):  # one token at a time: the absorbed path
        steps.append(attn(x_BTD[:, t:t + 1], *rope_for(attn, 1, start=t), cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full_BTD, atol=1e-5, rtol=1e-5)
    assert cache.length == 11


def test_cache_holds_normalised_latent_and_rotated_rope_key_only():
    attn = random_mla()
    x_BTD = torch.randn(2, 5, 32)
    cache = attn.new_cache(2, 7, torch.float32, "cpu")
    attn(x_BTD, *rope_for(attn, 5), cache=cache)
    assert cache.latent_BSC.shape == (2, 7, 20) and cache.rope_BSR.shape == (2, 7, 8)
    _, _, latent_BTC, k_pe_BTR = attn.project(x_BTD, *rope_for(attn, 5))
    torch.testing.assert_close(cache.latent_BSC[:, :5], latent_BTC)
    torch.testing.assert_close(cache.rope_BSR[:, :5], k_pe_BTR)
    raw_BTC = attn.wkv_a(x_BTD)[..., :20]
    torch.testing.assert_close(latent_BTC, attn.kv_norm(raw_BTC))  # cached after the RMSNorm


def test_cache_overflow_is_a_value_error():
    attn = random_mla()
    cache = attn.new_cache(1, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="KV cache full"):
        attn(torch.randn(1, 5, 32), *rope_for(attn, 5), cache=cache)


def test_zero_value_rows_give_exactly_zero_output():
    attn = random_mla()
    with torch.no_grad():  # rows per head are [k_nope (16) ; v (12)]: zero every head's v rows
        attn.wkv_b.weight.view(4, 28, 20)[:, 16:] = 0
    x_BTD = torch.randn(2, 6, 32)
    assert torch.count_nonzero(attn(x_BTD, *rope_for(attn, 6))) == 0
    cache = attn.new_cache(2, 8, torch.float32, "cpu")
    attn(x_BTD, *rope_for(attn, 6), cache=cache)
    assert torch.count_nonzero(attn(x_BTD[:, :1], *rope_for(attn, 1, start=6), cache=cache)) == 0


def test_rope_key_is_not_normalised():
    # Doubling the rope rows of wkv_a doubles the rope key and leaves the normalised latent alone.
    attn = random_mla()
    x_BTD = torch.randn(1, 4, 32)
    _, _, latent, k_pe = attn.project(x_BTD, *rope_for(attn, 4))
    with torch.no_grad():
        attn.wkv_a.weight[20:] *= 2
    _, _, latent2, k_pe2 = attn.project(x_BTD, *rope_for(attn, 4))
    torch.testing.assert_close(latent2, latent)
    torch.testing.assert_close(k_pe2, 2 * k_pe)


def test_future_tokens_do_not_change_the_past():
    attn = random_mla(q_lora_rank=10)
    x = torch.randn(1, 6, 32)
    y = x.clone()
    y[:, 4:] += 1.0
    torch.testing.assert_close(attn(x, *rope_for(attn, 6))[:, :4], attn(y, *rope_for(attn, 6))[:, :4])


def test_layout_and_cache_size():
    attn = random_mla(q_lora_rank=10)
    shapes = {name: tuple(p.shape) for name, p in attn.named_parameters()}
    assert shapes == {
        "wq_a.weight": (10, 32), "q_norm.weight": (10,), "wq_b.weight": (4 * 24, 10),
        "wkv_a.weight": (20 + 8, 32), "kv_norm.weight": (20,), "wkv_b.weight": (4 * (16 + 12), 20),
        "wo.weight": (32, 4 * 12),
    }
    assert attn.rope_dim == 8 and attn.softmax_scale == 24**-0.5
    assert "wq.weight" in dict(random_mla().named_parameters())


@pytest.mark.parametrize("bad, message", [
    ({"n_heads": 0}, r"positive.*'n_heads': 0"),
    ({"kv_lora_rank": -1}, r"positive.*'kv_lora_rank': -1"),
    ({"q_lora_rank": 0}, r"positive.*'q_lora_rank': 0"),
    ({"qk_rope_head_dim": 7}, r"qk_rope_head_dim=7 must be even"),
    ({"n_kv_heads": 2}, r"no n_kv_heads \(got n_kv_heads=2\).*model/size=mla_tiny"),
])
def test_bad_sizes_are_refused_naming_the_value(bad, message):
    with pytest.raises(ValueError, match=message):
        MLAttention(**(SIZES | bad))
