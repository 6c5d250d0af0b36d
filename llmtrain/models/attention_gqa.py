"""Grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245) with rotary positions.

H query heads share Hkv key/value heads; query head h reads kv head h // (H / Hkv), each kv head
serving a consecutive block of query heads (HF, Meta and MiniMind order; SPECS 1.5). With
Hkv == H this is multi-head attention, with Hkv == 1 multi-query attention. `bias=True` adds
biases to the q/k/v projections only, as Qwen2 does.

The KV-cache interface (`new_cache`, `forward(..., mask, cache)`) is the one documented in
llmtrain/models/kv_cache.py.

Shape legend: B batch, T sequence (new tokens), S keys (cached + new), D model width, H query
heads, K kv heads, R = H/K query heads per kv head, E head dim.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmtrain.models.kv_cache import GQACache, causal_mask
from llmtrain.models.linear import Linear, kept_product
from llmtrain.models.rope import apply_rope


class GQAttention(nn.Module):
    """Causal self-attention with n_kv_heads <= n_heads key/value heads.

    Args:
        dim: Model width D (input and output size).
        n_heads: Number of query heads H.
        n_kv_heads: Number of key/value heads K; None means K = H. Must divide H.
        head_dim: Per-head width E; None means D / H. Must be even (RoPE rotates pairs).
        bias: Biases on wq, wk, wv (Qwen2 style); wo never has one.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        head_dim = _default_head_dim(dim, n_heads) if head_dim is None else head_dim
        _check_sizes(dim, n_heads, n_kv_heads, head_dim)
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope_dim = head_dim  # the transformer builds its RoPE table for this width
        self.wq = Linear(dim, n_heads * head_dim, bias=bias)
        self.wk = Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.wv = Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.wo = Linear(n_heads * head_dim, dim, bias=False)

    def project(self, x_BTD: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries and keys after RoPE, and values; kv heads are not repeated.

        Args:
            x_BTD: Normalised input.
            cos: RoPE cosines from `RotaryEmbedding.forward`.
            sin: RoPE sines, same shape as `cos`.

        Returns:
            q_BHTE, k_BKTE, v_BKTE.
        """
        B, T, _ = x_BTD.shape
        if self.wq.bias is None:
            qkv_BTC = kept_product(self, x_BTD, (self.wq, self.wk, self.wv))
            if qkv_BTC is not None:
                return self._split_fused(qkv_BTC, cos, sin)
        q_BHTE = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k_BKTE = self.wk(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v_BKTE = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q_BHTE, cos, sin), apply_rope(k_BKTE, cos, sin), v_BKTE

    def _split_fused(self, qkv_BTC: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`project` without autograd on CPU (llmtrain.models.linear): q, k and v from one matmul on
        their kept stacked weight, one RoPE call for q and k together; a decode step of the tiny
        model makes 8 calls fewer per layer."""
        B, T, _ = qkv_BTC.shape
        H, K, E = self.n_heads, self.n_kv_heads, self.head_dim
        qk_BNTE = apply_rope(qkv_BTC[..., :(H + K) * E].view(B, T, H + K, E).transpose(1, 2), cos, sin)
        v_BKTE = qkv_BTC[..., (H + K) * E:].view(B, T, K, E).transpose(1, 2)
        return qk_BNTE[:, :H], qk_BNTE[:, H:], v_BKTE

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype,
                  device: torch.device | str | None) -> GQACache:
        """An empty preallocated cache of `max_len` tokens: k and v of shape (B, K, max_len, E)."""
        return GQACache(batch_size, self.n_kv_heads, max_len, self.head_dim, dtype, device)

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                cache: GQACache | None = None) -> Tensor:
        """Attention of the T new tokens over the cached ones and themselves; returns y_BTD.

        Args:
            x_BTD: Normalised input of the new tokens.
            cos: RoPE cosines for the new tokens' positions.
            sin: RoPE sines, same shape as `cos`.
            mask: None for plain causal attention, else bool (B, 1, T, S), True = may attend,
                S = cache.length + T (T without a cache).
            cache: Written at [length, length + T) and advanced by T; None (training) keeps the
                is_causal fast path.
        """
        B, T, _ = x_BTD.shape
        q_BHTE, k_BKSE, v_BKSE = self.project(x_BTD, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k_BKSE, v_BKSE = cache.append(k_BKSE, v_BKSE)
            if mask is None and past > 0 and T > 1:
                mask = causal_mask(T, past, x_BTD.device)
        y_BHTE = self._attend(q_BHTE, k_BKSE, v_BKSE, mask, is_causal=mask is None and past == 0)
        if T == 1:   # with one token, (B, H, 1, E) reshapes to (B, 1, H E) without the transpose
            return self.wo(y_BHTE.reshape(B, 1, self.n_heads * self.head_dim))
        return self.wo(y_BHTE.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _attend(self, q_BHTE: Tensor, k_BKSE: Tensor, v_BKSE: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        """Attention of q over k, v with query head h reading kv head h // (H/K); returns y_BHTE."""
        B, H, T, E = q_BHTE.shape
        if T == 1:
            # Decode: one query per head against the cache. The H/K query heads of a kv head are
            # stacked as H/K rows of one product; plain matmul-softmax-matmul on the cache views
            # measured 30-64 us per call against 32-103 us for enable_gqa SDPA at B16 K2 S40-96,
            # H4 E32 and H8 E64, on 2 CPU threads. One new token sees every earlier key, so only
            # padding can be masked.
            q_BKRE = q_BHTE.reshape(B, self.n_kv_heads, H // self.n_kv_heads, E)
            scores_BKRS = torch.matmul(q_BKRE, k_BKSE.transpose(-1, -2)) * E**-0.5
            if mask is not None:
                scores_BKRS = scores_BKRS.masked_fill(~mask, float("-inf"))  # (B, 1, 1, S) broadcasts
            probs_BKRS = scores_BKRS.softmax(-1, dtype=torch.float32)
            if probs_BKRS.dtype != v_BKSE.dtype:
                probs_BKRS = probs_BKRS.to(v_BKSE.dtype)
            return torch.matmul(probs_BKRS, v_BKSE).view(B, H, 1, E)
        # enable_gqa maps query head h to kv head h // (H/K) without materialising the repeat;
        # measured faster than repeat_interleave on 2 CPU threads (fwd+bwd, 4.1 -> 2.6 ms at
        # B16 H4 K2 T128 E32; 35 -> 29 ms at B4 H8 K2 T512 E64).
        return F.scaled_dot_product_attention(q_BHTE, k_BKSE, v_BKSE, attn_mask=mask, is_causal=is_causal,
                                              enable_gqa=True)


def _default_head_dim(dim: int, n_heads: int) -> int:
    if n_heads <= 0 or dim % n_heads != 0:
        raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}; set head_dim explicitly "
                         "(+model.attention.head_dim=<n>: an even width per head)")
    return dim // n_heads


def _check_sizes(dim: int, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
    if dim <= 0 or n_heads <= 0 or n_kv_heads <= 0:
        raise ValueError(
            f"dim, n_heads and n_kv_heads must be positive, got dim={dim}, n_heads={n_heads}, "
            f"n_kv_heads={n_kv_heads}"
        )
    if n_heads % n_kv_heads != 0:
        raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
    if head_dim <= 0 or head_dim % 2 != 0:
        raise ValueError(f"head_dim={head_dim} must be positive and even (RoPE rotates pairs)")
