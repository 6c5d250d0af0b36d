"""Multi-head Latent Attention of DeepSeek-V2 (DeepSeek-AI 2024, arXiv:2405.04434, section 2.1).

Keys and values of all H heads are expanded from one RMS-normalised latent of width C
(kv_lora_rank); position enters only through a decoupled rope key of width R that every head
shares. A KV cache therefore holds C + R numbers per token and layer (SPECS 2.2) instead of
2 * H * E. The query may be low-rank too (q_lora_rank, with its own RMSNorm). Names follow
DeepSeek-V3's inference/model.py: wq or (wq_a, q_norm, wq_b), wkv_a, kv_norm, wkv_b, wo.
Split orders (SPECS 2.1/2.4): wkv_a rows are [latent ; rope], wq and wkv_b rows are per head
[q_nope ; q_pe] and [k_nope ; v]. The softmax scale is 1/sqrt(N + R) in both forms below.

Two exact forms of the same attention:
- naive (training and prefill): expand k_nope and v per head from the latent, then SDPA;
- absorbed (one-token decode from the cache, SPECS 2.3): fold W_UK into the query and W_UV
  after the weighted sum, so attention runs in latent space and the cache is never expanded.

Shape legend: B batch, T new tokens, S keys (cached + new), D model width, H heads,
N qk_nope_head_dim, R qk_rope_head_dim, Q = N + R, V v_head_dim, C kv_lora_rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmtrain.models.kv_cache import causal_mask, check_room
from llmtrain.models.linear import Linear, kept_product
from llmtrain.models.norm import RMSNorm
from llmtrain.models.rope import apply_rope


class MLACache:
    """Preallocated normalised latents and rotated rope keys of one MLA layer (SPECS 2.2, 7.3).

    Memory: kv_lora_rank + qk_rope_head_dim numbers per token, whatever the number of heads.

    Args:
        batch_size: B.
        max_len: S, the most tokens the cache holds (prompt + generated).
        kv_lora_rank: C.
        rope_dim: R.
        dtype: Storage dtype (the activation dtype).
        device: Where the buffers live.
    """

    def __init__(self, batch_size: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        self.latent_BSC = torch.zeros(batch_size, max_len, kv_lora_rank, dtype=dtype, device=device)
        self.rope_BSR = torch.zeros(batch_size, max_len, rope_dim, dtype=dtype, device=device)
        self.max_len, self.length = max_len, 0

    def append(self, latent_BTC: Tensor, k_pe_BTR: Tensor) -> tuple[Tensor, Tensor]:
        """Write T new entries at [length, length + T), advance `length`, return every entry so far."""
        start, end = self.length, self.length + latent_BTC.shape[1]
        check_room(start, latent_BTC.shape[1], self.max_len)
        self.latent_BSC[:, start:end] = latent_BTC
        self.rope_BSR[:, start:end] = k_pe_BTR
        self.length = end
        return self.latent_BSC[:, :end], self.rope_BSR[:, :end]

    def repeat_rows_(self, n: int) -> None:
        """Each row becomes n contiguous copies of itself (the interface of llmtrain/models/kv_cache.py)."""
        self.latent_BSC, self.rope_BSR = (t.repeat_interleave(n, 0) for t in (self.latent_BSC, self.rope_BSR))


class MLAttention(nn.Module):
    """Causal multi-head latent attention with decoupled RoPE.

    Args:
        dim: Model width D (input and output size).
        n_heads: Number of heads H; every head has its own k_nope and v (no GQA inside MLA).
        kv_lora_rank: Width C of the cached key/value latent.
        qk_nope_head_dim: Per-head query/key width N without position.
        qk_rope_head_dim: Per-head query width R that RoPE rotates, also the width of the shared
            rope key; must be even.
        v_head_dim: Per-head value width V (may differ from N + R).
        q_lora_rank: Width of the query latent; None projects the query directly from x.
        norm_eps: Epsilon of the latent RMSNorms (DeepSeek and HF use 1e-6).
        n_kv_heads: Must stay None. It exists only to refuse, with a useful message, the value a
            GQA size preset (model/size=tiny|small|1b) merges into this node.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        q_lora_rank: int | None = None,
        norm_eps: float = 1e-6,
        n_kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        _check_sizes(dim, n_heads, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, q_lora_rank,
                     n_kv_heads)
        self.n_heads, self.kv_lora_rank, self.q_lora_rank = n_heads, kv_lora_rank, q_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.rope_dim = qk_rope_head_dim  # the transformer builds its RoPE table for this width
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.softmax_scale = qk_head_dim**-0.5  # N + R, not V nor C + R, even when absorbed
        if q_lora_rank is None:
            self.wq = Linear(dim, n_heads * qk_head_dim, bias=False)
        else:
            self.wq_a = Linear(dim, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank, norm_eps)
            self.wq_b = Linear(q_lora_rank, n_heads * qk_head_dim, bias=False)
        self.wkv_a = Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank, norm_eps)  # on the latent only, never on the rope key
        self.wkv_b = Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = Linear(n_heads * v_head_dim, dim, bias=False)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype,
                  device: torch.device | str | None) -> MLACache:
        """An empty cache for `max_len` tokens (kv_lora_rank + qk_rope_head_dim numbers per token)."""
        return MLACache(batch_size, max_len, self.kv_lora_rank, self.qk_rope_head_dim, dtype, device)

    def project(self, x_BTD: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Everything attention needs from the new tokens.

        Args:
            x_BTD: Normalised input.
            cos: RoPE cosines from `RotaryEmbedding.forward` (width R).
            sin: RoPE sines, same shape as `cos`.

        Returns:
            q_nope_BHTN, q_pe_BHTR (rotated), latent_BTC (normalised), k_pe_BTR (rotated): the
            last two are exactly what the cache stores.
        """
        B, T, _ = x_BTD.shape
        q_in = self.wq if self.q_lora_rank is None else self.wq_a
        fused_BTX = kept_product(self, x_BTD, (q_in, self.wkv_a))   # no autograd, CPU: one matmul for both
        if fused_BTX is not None:
            q_BTX, kv_BTX = fused_BTX.split([q_in.out_features, self.wkv_a.out_features], dim=-1)
        else:
            q_BTX, kv_BTX = q_in(x_BTD), self.wkv_a(x_BTD)
        if self.q_lora_rank is not None:
            q_BTX = self.wq_b(self.q_norm(q_BTX))
        q_BHTQ = q_BTX.view(B, T, self.n_heads, -1).transpose(1, 2)
        q_nope_BHTN, q_pe_BHTR = q_BHTQ.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent_BTC, k_pe_BTR = kv_BTX.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe_BTR = apply_rope(k_pe_BTR.unsqueeze(1), cos, sin).squeeze(1)  # one "head" shared by all
        return q_nope_BHTN, apply_rope(q_pe_BHTR, cos, sin), self.kv_norm(latent_BTC), k_pe_BTR

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                cache: MLACache | None = None) -> Tensor:
        """Causal attention of the T new tokens over the cached ones and themselves; returns y_BTD.

        Args:
            x_BTD: Normalised input.
            cos: RoPE cosines for the new tokens' positions.
            sin: RoPE sines, same shape as `cos`.
            mask: None for causal attention, else bool (B, 1, T, S), True = may attend, with
                S = cache.length + T (T without a cache).
            cache: Written at [length, length + T) and advanced; None for training.
        """
        B, T, _ = x_BTD.shape
        q_nope_BHTN, q_pe_BHTR, latent_BSC, k_pe_BSR = self.project(x_BTD, cos, sin)
        attend = self.attend_naive
        if cache is not None:
            if mask is None and cache.length > 0 and T > 1:   # one new token sees every key: no mask
                mask = causal_mask(T, cache.length, x_BTD.device)  # SDPA's is_causal is top-left aligned
            latent_BSC, k_pe_BSR = cache.append(latent_BSC, k_pe_BSR)
            # A decode step reads the whole cache for one query: absorbing the weights avoids
            # expanding S latents to H heads. Prefill has T ~ S queries, where the expansion is
            # amortised and the N-wide dot products are cheaper than C-wide ones (SPECS 2.3).
            attend = self.attend_absorbed if T == 1 else self.attend_naive
        y_BHTV = attend(q_nope_BHTN, q_pe_BHTR, latent_BSC, k_pe_BSR, mask)
        return self.wo(y_BHTV.transpose(1, 2).reshape(B, T, self.n_heads * self.v_head_dim))

    def attend_naive(self, q_nope_BHTN: Tensor, q_pe_BHTR: Tensor, latent_BSC: Tensor, k_pe_BSR: Tensor,
                     mask: Tensor | None) -> Tensor:
        """Per-head keys and values expanded from the latent, then SDPA; returns y_BHTV.

        mask None means causal with S == T (training).
        """
        B, S, _ = latent_BSC.shape
        kv_BHSX = self.wkv_b(latent_BSC).view(B, S, self.n_heads, -1).transpose(1, 2)
        k_nope_BHSN, v_BHSV = kv_BHSX.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_pe_BHSR = k_pe_BSR.unsqueeze(1).expand(B, self.n_heads, S, self.qk_rope_head_dim)
        q_BHTQ = torch.cat((q_nope_BHTN, q_pe_BHTR), dim=-1)
        k_BHSQ = torch.cat((k_nope_BHSN, k_pe_BHSR), dim=-1)
        # SDPA's fused kernels need equal q/k and v widths; otherwise it falls back to the math
        # kernel, measured 40x slower forward+backward on CPU (B16 H4 T128, Q=48, V=32: 4.3 s vs
        # 0.1 s). Zero columns change neither the scores nor the weighted sum (HF pads v the same
        # way for flash-attention); the scale is passed because SDPA's default reads q's width.
        Q, V = q_BHTQ.shape[-1], v_BHSV.shape[-1]
        if V < Q:
            v_BHSV = F.pad(v_BHSV, (0, Q - V))
        elif Q < V:
            q_BHTQ, k_BHSQ = F.pad(q_BHTQ, (0, V - Q)), F.pad(k_BHSQ, (0, V - Q))
        y_BHTX = F.scaled_dot_product_attention(q_BHTQ, k_BHSQ, v_BHSV, attn_mask=mask, is_causal=mask is None,
                                                scale=self.softmax_scale)
        return y_BHTX[..., :V]

    def attend_absorbed(self, q_nope_BHTN: Tensor, q_pe_BHTR: Tensor, latent_BSC: Tensor, k_pe_BSR: Tensor,
                        mask: Tensor | None) -> Tensor:
        """The same attention computed in latent space (SPECS 2.3); returns y_BHTV.

        q_nope . (W_UK c) = (W_UK^T q_nope) . c, and sum_s p_s W_UV c_s = W_UV sum_s p_s c_s, so
        neither k_nope nor v is ever formed. mask None means causal with S == T.
        """
        B, H, T, N = q_nope_BHTN.shape
        S, C, R, V = latent_BSC.shape[1], self.kv_lora_rank, self.qk_rope_head_dim, self.v_head_dim
        w_HXC = self.wkv_b.weight.view(H, N + V, C)
        # Batched products with the heads (or the query rows) folded into the batch or the rows,
        # M = H T: a decode step's five einsums took 212 us per tiny layer (B16 H4 S60) against 79 us
        # this way, 368 against 238 us at the small sizes (H8 C256), 2 CPU threads.
        q_abs_HMC = torch.bmm(q_nope_BHTN.transpose(0, 1).reshape(H, B * T, N), w_HXC[:, :N])
        q_abs_BMC = q_abs_HMC.view(H, B, T, C).transpose(0, 1).reshape(B, H * T, C)
        scores_BMS = torch.baddbmm(torch.bmm(q_pe_BHTR.reshape(B, H * T, R), k_pe_BSR.transpose(1, 2)),
                                   q_abs_BMC, latent_BSC.transpose(1, 2))
        scores_BHTS = scores_BMS.view(B, H, T, S).float() * self.softmax_scale
        if mask is None and T > 1:  # one new token sees every key: nothing to mask
            mask = causal_mask(T, S - T, latent_BSC.device)
        if mask is not None:
            scores_BHTS = scores_BHTS.masked_fill(~mask, float("-inf"))
        p_BHTS = scores_BHTS.softmax(dim=-1)  # float32 softmax, SPECS 2.3
        if p_BHTS.dtype != latent_BSC.dtype:
            p_BHTS = p_BHTS.to(latent_BSC.dtype)
        context_BMC = torch.bmm(p_BHTS.reshape(B, H * T, S), latent_BSC)
        context_HMC = context_BMC.view(B, H, T, C).transpose(0, 1).reshape(H, B * T, C)
        y_HMV = torch.bmm(context_HMC, w_HXC[:, N:].transpose(1, 2))
        return y_HMV.view(H, B, T, V).transpose(0, 1)


def _check_sizes(dim: int, n_heads: int, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                 v_head_dim: int, q_lora_rank: int | None, n_kv_heads: int | None) -> None:
    if n_kv_heads is not None:
        raise ValueError(
            f"MLAttention has no n_kv_heads (got n_kv_heads={n_kv_heads}): every MLA head expands its own "
            "key and value from the shared latent (SPECS 2.1). A GQA size preset (model/size=tiny, small "
            "or 1b) sets it; with model=mla use model/size=mla_tiny, mla_small or mla_1b")
    sizes = {"dim": dim, "n_heads": n_heads, "kv_lora_rank": kv_lora_rank, "qk_nope_head_dim": qk_nope_head_dim,
             "qk_rope_head_dim": qk_rope_head_dim, "v_head_dim": v_head_dim}
    if q_lora_rank is not None:
        sizes["q_lora_rank"] = q_lora_rank
    if bad := {name: value for name, value in sizes.items() if value <= 0}:
        raise ValueError(f"MLAttention sizes must be positive, got {bad}")
    if qk_rope_head_dim % 2 != 0:
        raise ValueError(f"qk_rope_head_dim={qk_rope_head_dim} must be even (RoPE rotates pairs)")
