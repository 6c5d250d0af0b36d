"""An MLA transformer's latent KV cache: cached decode == full recompute, cache size (SPECS 2.2, 2.5, 7.3, 7.6)."""

import functools

import pytest
import torch

from llmtrain.generate import generate
from llmtrain.models.attention_mla import MLAttention
from llmtrain.models.ffn import SwiGLU
from llmtrain.models.transformer import Transformer
from tests.models.test_kv_cache import LENGTHS, V, left_padded, prompts
C, R = 20, 8  # kv_lora_rank != nope (16), v (12) != nope + rope (24)


def tiny_mla(q_lora_rank: int | None = 10) -> Transformer:
    torch.manual_seed(0)
    attention = functools.partial(MLAttention, n_heads=4, kv_lora_rank=C, qk_nope_head_dim=16, qk_rope_head_dim=R,
                                  v_head_dim=12, q_lora_rank=q_lora_rank)
    model = Transformer(vocab_size=V, dim=32, n_layers=2, attention=attention,
                        ffn=functools.partial(SwiGLU, hidden_dim=48), rope_theta=1e4, max_seq_len=128,
                        init_std=0.1)  # larger than the default so greedy argmaxes are not near-ties
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


@torch.no_grad()
def test_cached_decode_equals_full_forward_at_every_step():
    """64 greedy steps from left-padded mixed-length prompts; each step's logits == a full forward."""
    model, rows = tiny_mla(), prompts()
    P = max(LENGTHS)
    ids, mask = left_padded(rows)
    cache = model.new_cache(len(rows), P + 64)
    logits_BV = model(ids, attention_mask_BT=mask, cache=cache)[:, -1]
    for _ in range(64):
        full_BV = torch.stack([model(torch.tensor([row]))[0, -1] for row in rows])
        torch.testing.assert_close(logits_BV, full_BV, atol=1e-5, rtol=1e-5)
        next_B = logits_BV.argmax(-1)
        rows = [row + [t] for row, t in zip(rows, next_B.tolist())]
        logits_BV = model(next_B[:, None], cache=cache)[:, -1]  # T = 1: the absorbed path
    assert cache.length == P + 64


@pytest.mark.parametrize("q_lora_rank", [None, 10])
@torch.no_grad()
def test_greedy_generation_of_64_tokens_equals_full_recompute(q_lora_rank):
    model, rows = tiny_mla(q_lora_rank), prompts()
    result = generate(model, rows, max_new_tokens=64, eos_id=V, pad_id=0, temperature=0.0)  # eos never sampled
    for row, tokens in zip(rows, result.tokens_BN.tolist()):
        expected = list(row)
        for _ in range(64):
            expected.append(int(model(torch.tensor([expected]))[0, -1].argmax()))
        assert tokens == expected[len(row):]


@torch.no_grad()
def test_prefill_in_chunks_equals_one_forward():
    model = tiny_mla()
    ids = torch.randint(0, V, (2, 12))
    cache = model.new_cache(2, 12)
    chunks = [model(ids[:, a:b], cache=cache) for a, b in ((0, 4), (4, 9), (9, 10), (10, 12))]
    torch.testing.assert_close(torch.cat(chunks, 1), model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_holds_latent_plus_rope_numbers_per_token_per_layer(dtype):
    model = tiny_mla()
    B, S = 3, 20
    cache = model.new_cache(B, S, dtype=dtype)
    assert len(cache.layers) == model.n_layers
    for layer in cache.layers:
        assert layer.latent_BSC.shape == (B, S, C) and layer.rope_BSR.shape == (B, S, R)
    n_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.latent_BSC, layer.rope_BSR))
    assert n_bytes / (B * S) == (C + R) * model.n_layers * dtype.itemsize
