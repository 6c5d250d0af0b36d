"""KV cache and left padding for the GQA transformer: cached decode == full recompute (SPECS 7.2, 7.4, 7.6)."""

import functools

import pytest
import torch

from llmtrain.models.attention_gqa import GQAttention
from llmtrain.models.ffn import SwiGLU
from llmtrain.models.kv_cache import causal_mask, padding_attention_mask
from llmtrain.models.rope import RotaryEmbedding
from llmtrain.models.transformer import Transformer

LENGTHS = (3, 5, 8, 13)
V = 64


def tiny(max_seq_len: int = 128) -> Transformer:
    torch.manual_seed(0)
    attention = functools.partial(GQAttention, n_heads=4, n_kv_heads=2)
    ffn = functools.partial(SwiGLU, hidden_dim=48)
    return Transformer(vocab_size=V, dim=32, n_layers=2, attention=attention, ffn=ffn, rope_theta=1e4,
                       max_seq_len=max_seq_len).eval()


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (P - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in LENGTHS]


@torch.no_grad()
def test_cached_greedy_decode_equals_full_forward_at_every_step():
    """64 greedy steps, mixed prompt lengths: each step's logits == a full forward of each row's prefix."""
    model, rows = tiny(), prompts()
    ids, mask = left_padded(rows)
    cache = model.new_cache(len(rows), ids.shape[1] + 64)
    logits_BV = model(ids, attention_mask_BT=mask, cache=cache)[:, -1]
    for _ in range(64):
        full_BV = torch.stack([model(torch.tensor([row]))[0, -1] for row in rows])
        torch.testing.assert_close(logits_BV, full_BV, atol=1e-5, rtol=1e-5)
        next_B = logits_BV.argmax(-1)
        rows = [row + [t] for row, t in zip(rows, next_B.tolist())]
        logits_BV = model(next_B[:, None], cache=cache)[:, -1]
    assert cache.length == ids.shape[1] + 64


@torch.no_grad()
def test_prefill_in_chunks_equals_one_forward():
    """T > 1 new tokens after a non-empty cache: causal with an offset (not SDPA's top-left is_causal)."""
    model = tiny()
    ids = torch.randint(0, V, (2, 12))
    cache = model.new_cache(2, 12)
    chunks = [model(ids[:, a:b], cache=cache) for a, b in ((0, 4), (4, 9), (9, 10), (10, 12))]
    torch.testing.assert_close(torch.cat(chunks, 1), model(ids), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_left_padded_rows_equal_unpadded_rows_without_cache():
    model, rows = tiny(), prompts()
    ids, mask = left_padded(rows)
    logits_BTV = model(ids, attention_mask_BT=mask)
    assert torch.isfinite(logits_BTV).all()                 # pad query rows too
    for b, row in enumerate(rows):
        torch.testing.assert_close(logits_BTV[b, -len(row):], model(torch.tensor([row]))[0], atol=1e-5, rtol=1e-5)


def test_all_ones_attention_mask_equals_plain_forward():
    model = tiny()
    ids = torch.randint(0, V, (3, 10))
    torch.testing.assert_close(model(ids, attention_mask_BT=torch.ones_like(ids)), model(ids))


def test_left_padded_training_forward_has_finite_loss_and_gradients():
    model = tiny().train()
    ids, mask = left_padded(prompts())
    logits_BTV = model(ids, attention_mask_BT=mask)
    logp_BT = logits_BTV[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    loss = -torch.where(mask[:, 1:].bool(), logp_BT, 0.0).sum() / mask[:, 1:].sum()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_explicit_causal_mask_equals_the_is_causal_fast_path():
    torch.manual_seed(0)
    attn = GQAttention(dim=32, n_heads=4, n_kv_heads=2)
    cos, sin = RotaryEmbedding(8, 1e4, 16)(7)
    x_BTD = torch.randn(2, 7, 32)
    mask = causal_mask(7, 0, x_BTD.device)[None, None].expand(2, 1, 7, 7)
    torch.testing.assert_close(attn(x_BTD, cos, sin, mask=mask), attn(x_BTD, cos, sin), atol=1e-6, rtol=1e-5)


def test_padding_mask_hides_pad_keys_and_future_but_lets_a_pad_query_see_itself():
    key_mask = torch.tensor([[False, True, True, True]])
    allowed = padding_attention_mask(key_mask, n_new=2)[0, 0]  # queries are keys 2 and 3
    assert allowed.tolist() == [[False, True, True, False], [False, True, True, True]]
    allowed = padding_attention_mask(key_mask, n_new=4)[0, 0]
    assert allowed[0].tolist() == [True, False, False, False]  # the pad query sees only itself


def test_gqa_cache_holds_two_kv_heads_times_head_dim_per_token_per_layer():
    model = tiny()
    B, S = 3, 20
    cache = model.new_cache(B, S)
    attn = model.layers[0].attn
    assert len(cache.layers) == model.n_layers
    for layer in cache.layers:
        assert layer.k_BKSE.shape == layer.v_BKSE.shape == (B, attn.n_kv_heads, S, attn.head_dim)
        numbers = layer.k_BKSE.numel() + layer.v_BKSE.numel()
        assert numbers / (B * S) == 2 * attn.n_kv_heads * attn.head_dim  # kv heads stored once, not repeated


def test_cache_follows_the_model_dtype_and_stores_keys_after_rope():
    model = tiny()
    ids = torch.randint(0, V, (1, 5))
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(ids, cache=cache)
        x_BTD = model.layers[0].attn_norm(model.embed(ids))
        _, k_BKTE, v_BKTE = model.layers[0].attn.project(x_BTD, *model.rope(5))
    assert cache.layers[0].k_BKSE.dtype == torch.float32
    torch.testing.assert_close(cache.layers[0].k_BKSE[:, :, :5], k_BKTE)
    torch.testing.assert_close(cache.layers[0].v_BKSE[:, :, :5], v_BKTE)


def test_overflows_raise_clear_errors_not_index_errors():
    model = tiny(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model.new_cache(1, 17)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model.new_cache(1, 6)
    model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="4 cached \\+ 3 new tokens > max_len=6"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
