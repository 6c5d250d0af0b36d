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


def naive_moe(moe: torch.nn.Module, x_BTD: Tensor) -> Tensor:
    """MoE forward token by token in float64 (SPECS 3.1): softmax router, top-K, optional
    renormalisation (never for K = 1), routed_scaling_factor, plus the shared expert."""
    x_ND = x_BTD.double().reshape(-1, x_BTD.shape[-1])
    y_ND = torch.zeros_like(x_ND)
    K = moe.n_experts_per_tok

    def swiglu(ffn: torch.nn.Module, u: Tensor) -> Tensor:
        return naive_swiglu(u, ffn.w1.weight.double(), ffn.w2.weight.double(), ffn.w3.weight.double())

    for n, u in enumerate(x_ND):
        scores = torch.softmax(moe.gate.weight.double() @ u, dim=0)
        chosen = sorted(range(len(scores)), key=lambda e: -scores[e].item())[:K]
        weights = [scores[e] for e in chosen]
        if moe.norm_topk_prob and K > 1:
            weights = [w / sum(weights) for w in weights]
        for e, w in zip(chosen, weights):
            y_ND[n] += w * moe.routed_scaling_factor * swiglu(moe.experts[e], u)
        if moe.shared is not None:
            y_ND[n] += swiglu(moe.shared, u)
    return y_ND.view(x_BTD.shape)


def naive_balance(scores_TE: Tensor, experts_TK: Tensor) -> float:
    """sum_i f_i P_i over one group of T tokens, with f and P written out as in SPECS 3.2."""
    T, E = scores_TE.shape
    K = experts_TK.shape[1]
    total = 0.0
    for i in range(E):
        f_i = E / (K * T) * sum(int(i in experts_TK[t].tolist()) for t in range(T))
        P_i = sum(scores_TE[t, i].item() for t in range(T)) / T
        total += f_i * P_i
    return total


def naive_mla(attn: torch.nn.Module, x_BTD: Tensor, theta: float) -> Tensor:
    """MLAttention's forward rebuilt from its weights by SPECS 2.1, term by term, in float64.

    Keys and values are expanded per head, the rope key is one vector broadcast to every head,
    and the two score terms are added before an explicit causal mask.
    """
    B, T, _ = x_BTD.shape
    H, N, R, V, C = (attn.n_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim,
                     attn.kv_lora_rank)
    x = x_BTD.double()
    if attn.q_lora_rank is None:
        q = x @ attn.wq.weight.double().T
    else:
        c_q = naive_rms_norm(x @ attn.wq_a.weight.double().T, attn.q_norm.weight, attn.q_norm.eps)
        q = c_q @ attn.wq_b.weight.double().T
    q_BHTQ = q.view(B, T, H, N + R).transpose(1, 2)
    kv_a = x @ attn.wkv_a.weight.double().T
    c_kv_BTC = naive_rms_norm(kv_a[..., :C], attn.kv_norm.weight, attn.kv_norm.eps)
    positions_T = torch.arange(T)
    q_pe_BHTR = naive_rope(q_BHTQ[..., N:], positions_T, theta)
    k_pe_B1TR = naive_rope(kv_a[..., C:].unsqueeze(1), positions_T, theta)
    kv_BHTX = (c_kv_BTC @ attn.wkv_b.weight.double().T).view(B, T, H, N + V).transpose(1, 2)
    k_nope_BHTN, v_BHTV = kv_BHTX[..., :N], kv_BHTX[..., N:]
    scores_BHTT = (q_BHTQ[..., :N] @ k_nope_BHTN.transpose(-1, -2)
                   + q_pe_BHTR @ k_pe_B1TR.transpose(-1, -2)) / math.sqrt(N + R)
    future_TT = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    p_BHTT = torch.softmax(scores_BHTT.masked_fill(future_TT, float("-inf")), dim=-1)
    y_BHTV = p_BHTT @ v_BHTV
    return y_BHTV.transpose(1, 2).reshape(B, T, H * V) @ attn.wo.weight.double().T
