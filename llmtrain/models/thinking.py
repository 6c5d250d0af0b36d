"""HRPO's latent thinking: a gated blend of a latent vector into the next input embedding (SPECS 5).

Hybrid Reasoning Policy Optimization (Yue et al. 2025, arXiv:2505.18454; code Yueeeeeeee/HRPO).
While a completion is "thinking" (before its answer marker, llmtrain.thinking_decode), the input
of each new token x is not its embedding e = E[x] alone but

    r = sigmoid(W_r e + b_r),  i = sigmoid(W_i e + b_i)           gates from the token's embedding
    a = exp(-c softplus(-Lambda) r)                                 in (0, 1), elementwise
    input = a * e + sqrt(1 - a^2 + 1e-8) * (i * h)                  (SPECS 5.2, Griffin's RG-LRU gate)

where h is the latent of the distribution x was sampled from. Two latents, two classes:

- `ThinkingResidual` (the paper): h = (p @ E) / ||p||_2, the probability-weighted embedding
  normalised by the L2 norm of the probabilities (p one-hot gives h = E[x] exactly). It has no
  parameters, so the rollout stores h itself.
- `ProjectedThinkingResidual` (a fork's variant): h = normalize(W_p s), a learnable projection of
  the last hidden state s (post final norm), initialised with std 0.001. The rollout stores s, and
  the training forward applies the current projection, so W_p gets gradients.

Either way the rollout stores a per-position vector (`source`), and `forward` turns it into h
(`latent`) and blends it with the current gates; gradients reach the gates and Lambda, never the
stored vector. Everything here runs in float32 whatever the autocast dtype: near 1, bf16 spacing
(2^-8) would turn a = 0.999 into 1.0 and a = 0.997 into 0.99609 (SPECS 5.7).

Parameter names are the original's (`thinking_residual_gate_r`, `thinking_residual_gate_i`,
`thinking_residual_Lambda.Lambda`, plus `thinking_projection`), which optimizer groups match.

Shape legend: B batch, T sequence, D model width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmtrain.models.linear import Linear


def latent_from_probs(probs_BV: Tensor, embed_VD: Tensor) -> Tensor:
    """(p @ E) / ||p||_2 per row, float32 (SPECS 5.1): E[x] for a one-hot p, scaled up for a flat one."""
    probs_BV = probs_BV.float()
    return (probs_BV @ embed_VD.float()) / probs_BV.norm(dim=-1, keepdim=True)


class ThinkingLambda(nn.Module):
    """Holds Lambda (D,) under the original's name `thinking_residual_Lambda.Lambda`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.Lambda = nn.Parameter(torch.empty(dim))


class ThinkingResidual(nn.Module):
    """The gates of SPECS 5.2 with the paper's probability-weighted latent.

    Args:
        dim: Model width D.
        answer_marker: Text that ends thinking: a row blends until its decoded completion contains
            it (the token that completes it is plain). The original uses "####".
        r_min, r_max: Range of u ~ U(r_min, r_max) in Lambda's init; at init a = u^r lies in (r_min, 1).
        c: The constant c of the gate (8.0 in Griffin and HRPO).
        latent_temperature: The sampling temperature the latents are trained with (GRPO's
            strategy.temperature). Greedy decoding (evaluation) picks the argmax token but builds
            the latent from softmax(logits / latent_temperature), as the original does (SPECS 5.5).
    """

    def __init__(self, dim: int, answer_marker: str = "<answer>", r_min: float = 0.99, r_max: float = 0.999,
                 c: float = 8.0, latent_temperature: float = 1.0) -> None:
        super().__init__()
        if not 0 < r_min < r_max < 1 or c <= 0 or not answer_marker or latent_temperature <= 0:
            raise ValueError(f"need 0 < r_min < r_max < 1, c > 0, a non-empty answer_marker and latent_temperature "
                             f"> 0; got r_min={r_min}, r_max={r_max}, c={c}, answer_marker={answer_marker!r}, "
                             f"latent_temperature={latent_temperature}")
        self.answer_marker, self.r_min, self.r_max, self.c = answer_marker, r_min, r_max, c
        self.latent_temperature = latent_temperature
        self.thinking_residual_gate_r = Linear(dim, dim)
        self.thinking_residual_gate_i = Linear(dim, dim)
        self.thinking_residual_Lambda = ThinkingLambda(dim)
        ThinkingResidual.reset_parameters(self)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Gates: nn.Linear's default init. Lambda = -log(u^(-1/c) - 1), u ~ U(r_min, r_max), so that
        softplus(-Lambda) = -ln(u) / c and a = u^r (SPECS 5.2)."""
        self.thinking_residual_gate_r.reset_parameters()
        self.thinking_residual_gate_i.reset_parameters()
        u_D = torch.empty_like(self.thinking_residual_Lambda.Lambda).uniform_(self.r_min, self.r_max)
        self.thinking_residual_Lambda.Lambda.copy_(-torch.log(u_D ** (-1.0 / self.c) - 1.0))

    def source(self, probs_BV: Tensor, hidden_BD: Tensor, embed_VD: Tensor) -> Tensor:
        """What the rollout stores for a token sampled from `probs_BV`: here the latent itself."""
        return latent_from_probs(probs_BV, embed_VD)

    def latent(self, source_BTD: Tensor) -> Tensor:
        """The latent h from a stored `source` (float32)."""
        return source_BTD.float()

    def retention(self, e_BTD: Tensor) -> Tensor:
        """a = exp(-c softplus(-Lambda) r(e)) in float32: the share of the token embedding kept."""
        with torch.autocast(e_BTD.device.type, enabled=False):
            r_BTD = torch.sigmoid(self.thinking_residual_gate_r(e_BTD.float()))
            return torch.exp(-self.c * F.softplus(-self.thinking_residual_Lambda.Lambda.float()) * r_BTD)

    def blend(self, e_BTD: Tensor, h_BTD: Tensor) -> tuple[Tensor, Tensor]:
        """(a e + sqrt(1 - a^2 + 1e-8) (i h), a), both float32, for token embeddings e and latents h."""
        with torch.autocast(e_BTD.device.type, enabled=False):
            e_BTD = e_BTD.float()
            a_BTD = self.retention(e_BTD)
            i_BTD = torch.sigmoid(self.thinking_residual_gate_i(e_BTD))
            return a_BTD * e_BTD + torch.sqrt(1 - a_BTD ** 2 + 1e-8) * (i_BTD * h_BTD.float()), a_BTD

    def forward(self, e_BTD: Tensor, source_BTD: Tensor, thinking_BT: Tensor) -> Tensor:
        """The model's input embeddings: the blend where `thinking_BT`, e elsewhere (e's dtype)."""
        with torch.autocast(e_BTD.device.type, enabled=False):
            x_BTD, _ = self.blend(e_BTD, self.latent(source_BTD))
        return torch.where(thinking_BT[..., None].bool(), x_BTD.to(e_BTD.dtype), e_BTD)


class ProjectedThinkingResidual(ThinkingResidual):
    """The gates with a learned latent: h = normalize(W_p s) of the last hidden state s (SPECS 5.1 variant).

    Args:
        dim: Model width D.
        projection_std: Std of the normal init of W_p (its bias starts at 0).
        **kwargs: As ThinkingResidual (answer_marker, r_min, r_max, c).
    """

    def __init__(self, dim: int, projection_std: float = 0.001, **kwargs: float | str) -> None:
        super().__init__(dim, **kwargs)
        if projection_std <= 0:
            raise ValueError(f"projection_std={projection_std} must be > 0")
        self.projection_std = projection_std
        self.thinking_projection = Linear(dim, dim)
        self._reset_projection()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._reset_projection()

    @torch.no_grad()
    def _reset_projection(self) -> None:
        nn.init.normal_(self.thinking_projection.weight, std=self.projection_std)
        nn.init.zeros_(self.thinking_projection.bias)

    def source(self, probs_BV: Tensor, hidden_BD: Tensor, embed_VD: Tensor) -> Tensor:
        """The last hidden state (float32); the projection is applied at use, with its current weights."""
        return hidden_BD.float()

    def latent(self, source_BTD: Tensor) -> Tensor:
        with torch.autocast(source_BTD.device.type, enabled=False):
            return F.normalize(self.thinking_projection(source_BTD.float()), dim=-1)

