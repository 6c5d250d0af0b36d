"""DeepSeek-MoE / MiniMind-MoE feed-forward (DeepSeekMoE, arXiv:2401.06066; DeepSeek-V2 sec. 2.2).

    y = shared(u) + sum_{i in TopK(u)} g_i(u) * expert_i(u)                       (SPECS 3.1)
    s = softmax(u W_g^T)  (float32);  g = s_topk [/ sum s_topk if renormalised] * routed_scaling_factor

Every expert is a SwiGLU. The Ns shared experts of width I are held as one SwiGLU of width Ns*I
(mathematically the same, SPECS 3.1), so they share the dense FFN's init and HF export names.
Routed experts are a ModuleList of SwiGLU: `Transformer.init_weights` then initialises them like
any FFN (w2 residual-scaled), also after `to_empty` off the meta device, with no hook needed.
Dispatch sorts the N*K (token, expert) slots by expert, runs each expert once on its contiguous
slice and `index_add_`s the weighted outputs back: a Python loop over experts, never over tokens,
and the same code in train and eval mode (MiniMind keeps two paths that can drift, SPECS 3.4).
With autograd on, an expert no token chose still runs on its empty slice, so that its weights join
the graph and DDP sees every parameter used; without autograd (evaluation, rollouts) it is skipped.

Load balancing (SPECS 3.2, DeepSeek normalisation: exactly `aux_loss_coef` at uniform routing):

    f_i = E / (K T) * #{t : i in TopK(t)},   P_i = mean_t s_{i,t},   aux = coef * sum_i f_i P_i

over the real tokens t of each sequence (`seq_aux=True`, DeepSeek / MiniMind 2025; averaged over
the sequences that have any) or of the whole forward (`seq_aux=False`). Real tokens are those of
`token_mask_BT` (1 = real, 0 = padding; None = all real), which the Transformer passes down from its
own `token_mask_BT` / `attention_mask_BT`: padding takes no part in f or P, so appending fully padded
rows leaves the loss unchanged (SPECS 3.4; MiniMind counts padding, having no mask), and a batch of
padding alone records 0. It is recorded only in training mode with autograd on, and collected by
the trainer with `collect_aux_loss(model)` (one call per micro-batch), which keeps the strategies
unaware of it; code that runs training forwards outside the Trainer should call it too, or the
recorded terms (and their graphs) are kept.

K = 1 with renormalisation would make every routing weight exactly 1, so the LM loss would send
no gradient to the router (SPECS 3.4). Like MiniMind 2025 and DeepSeek's remote code, this module
skips the renormalisation when K = 1: the weight is the raw softmax score.

Shape legend: B batch, T sequence, D model width, N = B*T tokens, E routed experts, K experts per
token, S = N*K routing slots, G balance groups (sequences, or one for the whole forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmtrain.models.ffn import SwiGLU, swiglu_hidden_dim


def moe_expert_hidden_dim(dim: int, n_active: int, multiple_of: int = 64) -> int:
    """Expert width I that keeps the active FFN parameters near a dense SwiGLU's: n_active*I ~ F.

    n_active = shared + routed-per-token experts. Tiny (D=128, 1 shared + top-2): F=384 -> I=128.
    """
    return max(multiple_of, multiple_of * round(swiglu_hidden_dim(dim, multiple_of) / n_active / multiple_of))


class MoE(nn.Module):
    """Shared + top-K routed SwiGLU experts with a softmax router.

    Args:
        dim: Model width D.
        n_routed_experts: Routed experts E.
        n_experts_per_tok: Experts per token K (1 <= K <= E).
        n_shared_experts: Always-active experts Ns (0 = none), held as one SwiGLU of width Ns*I.
        expert_hidden_dim: Width I of every expert; None = `moe_expert_hidden_dim(dim, Ns + K)`.
        norm_topk_prob: Renormalise the K selected scores to sum to 1 (ignored when K = 1, see above).
        routed_scaling_factor: Multiplies the routed weights, renormalised or not (DeepSeek-V2: 16).
        aux_loss_coef: alpha of the balance loss; 0 records none.
        seq_aux: Balance per sequence (True) or over the whole forward's tokens (False), real tokens only.
    """

    def __init__(self, dim: int, n_routed_experts: int = 4, n_experts_per_tok: int = 2, n_shared_experts: int = 1,
                 expert_hidden_dim: int | None = None, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, aux_loss_coef: float = 0.01, seq_aux: bool = True) -> None:
        super().__init__()
        if n_routed_experts < 1 or not 1 <= n_experts_per_tok <= n_routed_experts or n_shared_experts < 0:
            raise ValueError(f"need n_routed_experts >= 1, 1 <= n_experts_per_tok <= n_routed_experts and "
                             f"n_shared_experts >= 0, got n_routed_experts={n_routed_experts}, "
                             f"n_experts_per_tok={n_experts_per_tok}, n_shared_experts={n_shared_experts}")
        if routed_scaling_factor <= 0 or aux_loss_coef < 0:
            raise ValueError(f"need routed_scaling_factor > 0 and aux_loss_coef >= 0, got routed_scaling_factor="
                             f"{routed_scaling_factor}, aux_loss_coef={aux_loss_coef}")
        if expert_hidden_dim is None:
            expert_hidden_dim = moe_expert_hidden_dim(dim, n_shared_experts + n_experts_per_tok)
        self.n_routed_experts, self.n_experts_per_tok = n_routed_experts, n_experts_per_tok
        self.n_shared_experts, self.expert_hidden_dim = n_shared_experts, expert_hidden_dim
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.aux_loss_coef, self.seq_aux = aux_loss_coef, seq_aux
        self.gate = nn.Linear(dim, n_routed_experts, bias=False)     # router W_g (E, D)
        self.experts = nn.ModuleList(SwiGLU(dim, expert_hidden_dim) for _ in range(n_routed_experts))
        self.shared = SwiGLU(dim, n_shared_experts * expert_hidden_dim) if n_shared_experts else None
        # Per forward since the last collection: (sum_i f_i P_i per balance group, 1 where the group
        # has real tokens), both (G,); a group of padding alone has term 0 and does not count.
        self._balance: list[tuple[Tensor, Tensor]] = []

    def forward(self, x_BTD: Tensor, token_mask_BT: Tensor | None = None) -> Tensor:
        """Returns y_BTD; in training mode with grad enabled also records the balance term.

        `token_mask_BT` (1 = real token) only selects the tokens the balance loss counts; every
        token's output is computed the same way.
        """
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        scores_NE = self.router_scores(x_ND)
        weight_NK, expert_NK = self.route(scores_NE)
        y_ND = self.dispatch(x_ND, weight_NK, expert_NK)
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)
        if self.training and torch.is_grad_enabled() and self.aux_loss_coef > 0:
            G = B if self.seq_aux else 1
            mask_GT = None if token_mask_BT is None else token_mask_BT.reshape(G, -1)
            terms_G = balance(scores_NE.view(G, -1, self.n_routed_experts),
                              expert_NK.view(G, -1, self.n_experts_per_tok), mask_GT)
            groups_G = terms_G.new_ones(G) if mask_GT is None else mask_GT.any(dim=-1).to(terms_G.dtype)
            self._balance.append((terms_G, groups_G))
        return y_ND.view(B, T, D)

    def router_scores(self, x_ND: Tensor) -> Tensor:
        """softmax(x W_g^T) in float32, even under autocast: bf16 logits flip top-K choices (SPECS 3.4)."""
        with torch.autocast(x_ND.device.type, enabled=False):
            return F.linear(x_ND.float(), self.gate.weight.float()).softmax(dim=-1)

    def route(self, scores_NE: Tensor) -> tuple[Tensor, Tensor]:
        """Top-K weights (float32) and expert ids, both (N, K)."""
        weight_NK, expert_NK = scores_NE.topk(self.n_experts_per_tok, dim=-1)
        if self.norm_topk_prob and self.n_experts_per_tok > 1:
            weight_NK = weight_NK / weight_NK.sum(dim=-1, keepdim=True)
        # Applied whether or not the weights were renormalised (sglang-jax #1282, SPECS 3.4).
        return weight_NK * self.routed_scaling_factor, expert_NK

    def dispatch(self, x_ND: Tensor, weight_NK: Tensor, expert_NK: Tensor) -> Tensor:
        """sum_k weight[n, k] * expert_{expert[n, k]}(x[n]), one batched call per expert."""
        K = expert_NK.shape[1]
        order_S = expert_NK.flatten().argsort(stable=True)     # slots grouped by expert
        token_S = order_S // K
        counts = torch.bincount(expert_NK.flatten(), minlength=self.n_routed_experts).tolist()   # host sync
        # Under autograd an expert with no tokens still runs on an empty slice, so its weights join
        # the graph (zero gradients) and DDP never sees unused parameters (SPECS 3.4). Without
        # autograd there is no graph to join: the call would be pure overhead.
        keep_empty = torch.is_grad_enabled()
        chunks = x_ND[token_S].split(counts)
        outputs = [expert(chunk) for expert, chunk, n in zip(self.experts, chunks, counts) if n or keep_empty]
        if not outputs:                 # no tokens at all (N = 0) and no autograd
            return x_ND.new_zeros(x_ND.shape)
        y_SD = torch.cat(outputs)
        y_SD = y_SD * weight_NK.flatten()[order_S, None].to(y_SD.dtype)
        return y_SD.new_zeros(x_ND.shape).index_add_(0, token_S, y_SD)

    def pop_aux_loss(self) -> Tensor | None:
        """coef * mean over the balance groups recorded since the last call (None if none); clears them.

        Groups without real tokens (fully padded rows) are left out of the mean. Several forwards
        between two calls (e.g. a prompt and its completions in GRPO) count as one batch.
        """
        if not self._balance:
            return None
        terms_G, groups_G = (torch.cat(parts) for parts in zip(*self._balance))
        aux = self.aux_loss_coef * terms_G.sum() / groups_G.sum().clamp(min=1)    # padding alone: 0, not NaN
        self._balance = []
        return aux


def balance(scores_GTE: Tensor, expert_GTK: Tensor, mask_GT: Tensor | None = None) -> Tensor:
    """sum_i f_i P_i per group (G,): 1.0 at uniform routing, E / K when every token picks the same K experts.

    f_i = E / (K T) * (slots of the group routed to i), P_i = mean router score of i, over the T
    tokens of the group with mask_GT == 1 (None = all); 0 for a group without any. f is a count,
    so only P carries gradient (SPECS 3.2).
    """
    G, T, E = scores_GTE.shape
    K = expert_GTK.shape[-1]
    slots_GS = expert_GTK.reshape(G, T * K)
    if mask_GT is None:
        weight_GS = torch.ones_like(slots_GS, dtype=scores_GTE.dtype)
        mean_GE, scale = scores_GTE.mean(dim=1), E / (K * T)
    else:
        real_GT = mask_GT.to(scores_GTE.dtype)
        n_G1 = real_GT.sum(dim=1, keepdim=True).clamp(min=1)          # a row of padding alone: 0 / 1, not NaN
        weight_GS = real_GT.repeat_interleave(K, dim=1)                # slot t*K + k belongs to token t
        mean_GE, scale = (scores_GTE * real_GT[..., None]).sum(dim=1) / n_G1, (E / K) / n_G1
    counts_GE = scores_GTE.new_zeros(G, E).scatter_add_(1, slots_GS, weight_GS)
    return (counts_GE * scale * mean_GE).sum(dim=-1)


def collect_aux_loss(model: nn.Module) -> Tensor | None:
    """Sum of the auxiliary losses every submodule recorded since the last collection (and clear them).

    Any module with a `pop_aux_loss() -> Tensor | None` method takes part; None when none recorded one.
    """
    losses = [aux for m in model.modules() if hasattr(m, "pop_aux_loss") and (aux := m.pop_aux_loss()) is not None]
    return torch.stack(losses).sum() if losses else None
