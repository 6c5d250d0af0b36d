"""Slow, obviously-correct references for the model components (STYLE 2.10).

Each function follows the textbook formula with explicit loops, masks and repeats, so a fast
path in llmtrain.models can be compared against it. Nothing here is used outside tests.

Shape legend: B batch, H query heads, K kv heads, T sequence, E head dim, D width, F hidden.
"""

import math

import torch
from torch import Tensor


def naive_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """g * x / sqrt(mean(x^2) + eps) over the last axis, in float64."""
    x = x.double()
    return weight.double() * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def naive_rope(x_BHTE: Tensor, positions_T: Tensor, theta: float) -> Tensor:
    """Rotate each pair (x[i], x[i + E/2]) by pos * theta^(-2i/E), in float64, one pair at a time."""
    x = x_BHTE.double()
    out = torch.empty_like(x)
    half = x.shape[-1] // 2
    pos_T = positions_T.double()
    for i in range(half):
        angle_T = pos_T * theta ** (-2.0 * i / x.shape[-1])
        cos_T, sin_T = torch.cos(angle_T), torch.sin(angle_T)
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * cos_T - b * sin_T
        out[..., i + half] = a * sin_T + b * cos_T
    return out


def naive_causal_attention(q_BHTE: Tensor, k_BKTE: Tensor, v_BKTE: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(E) + causal mask) v with kv heads repeated consecutively."""
    n_rep = q_BHTE.shape[1] // k_BKTE.shape[1]
    k_BHTE = k_BKTE.repeat_interleave(n_rep, dim=1)  # query head h reads kv head h // n_rep
    v_BHTE = v_BKTE.repeat_interleave(n_rep, dim=1)
    T = q_BHTE.shape[2]
    scores_BHTT = q_BHTE @ k_BHTE.transpose(-1, -2) / math.sqrt(q_BHTE.shape[-1])
    future_TT = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    scores_BHTT = scores_BHTT.masked_fill(future_TT, float("-inf"))
    return torch.softmax(scores_BHTT, dim=-1) @ v_BHTE


def naive_swiglu(x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor) -> Tensor:
    """w2 (silu(w1 x) * w3 x) with silu(z) = z * sigmoid(z) written out."""
    gate = x @ w1.T
    return (gate * torch.sigmoid(gate) * (x @ w3.T)) @ w2.T


def naive_gqa(attn: torch.nn.Module, x_BTD: Tensor, theta: float) -> Tensor:
    """GQAttention's forward rebuilt from its weights with the naive pieces above (float64)."""
    B, T, _ = x_BTD.shape
    x = x_BTD.double()

    def heads(linear: torch.nn.Linear, n: int) -> Tensor:
        y = x @ linear.weight.double().T
        if linear.bias is not None:
            y = y + linear.bias.double()
        return y.view(B, T, n, -1).transpose(1, 2)

    positions_T = torch.arange(T)
    q_BHTE = naive_rope(heads(attn.wq, attn.n_heads), positions_T, theta)
    k_BKTE = naive_rope(heads(attn.wk, attn.n_kv_heads), positions_T, theta)
    y_BHTE = naive_causal_attention(q_BHTE, k_BKTE, heads(attn.wv, attn.n_kv_heads))
    return y_BHTE.transpose(1, 2).reshape(B, T, -1) @ attn.wo.weight.double().T


def naive_block(block: torch.nn.Module, x_BTD: Tensor, theta: float, eps: float) -> Tensor:
    """x + attn(norm(x)), then + ffn(norm(x)), from a Block's weights, in float64."""
    x = x_BTD.double()
    x = x + naive_gqa(block.attn, naive_rms_norm(x, block.attn_norm.weight, eps), theta)
    ffn = block.ffn
    h = naive_rms_norm(x, block.ffn_norm.weight, eps)
    return x + naive_swiglu(h, ffn.w1.weight.double(), ffn.w2.weight.double(), ffn.w3.weight.double())
