"""SwiGLU feed-forward network (Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202).

FFN(x) = w2(silu(w1 x) * (w3 x)). Names follow Meta's Llama: w1 = HF gate_proj (inside the
silu), w3 = up_proj, w2 = down_proj. The function is not symmetric in w1 and w3; swapping them is
a silent export bug (SPECS 1.4).

Shape legend: B batch, T sequence, D model width, F hidden width.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmtrain.models.linear import Linear, kept_product


def swiglu_hidden_dim(dim: int, multiple_of: int = 64) -> int:
    """MiniMind's 2025 rule: multiple_of * ceil(int(8 * dim / 3) / multiple_of); 512 -> 1408.

    8/3 keeps the parameter count of a 4*dim two-matrix MLP with three matrices; rounding up to a
    multiple keeps matmul shapes friendly to tiled kernels.
    """
    return multiple_of * math.ceil(int(8 * dim / 3) / multiple_of)


class SwiGLU(nn.Module):
    """Gated feed-forward block with a SiLU gate.

    Args:
        dim: Model width D.
        hidden_dim: Hidden width F; None applies `swiglu_hidden_dim(dim, multiple_of)`.
        multiple_of: Rounding granularity of the default hidden width.
    """

    def __init__(self, dim: int, hidden_dim: int | None = None, multiple_of: int = 64) -> None:
        super().__init__()
        if dim <= 0 or multiple_of <= 0:
            raise ValueError(
                f"dim and multiple_of must be positive, got dim={dim}, multiple_of={multiple_of}"
            )
        hidden_dim = swiglu_hidden_dim(dim, multiple_of) if hidden_dim is None else hidden_dim
        if hidden_dim <= 0:
            raise ValueError(f"SwiGLU hidden_dim must be positive, got hidden_dim={hidden_dim}")
        self.hidden_dim = hidden_dim
        self.w1 = Linear(dim, hidden_dim, bias=False)
        self.w3 = Linear(dim, hidden_dim, bias=False)
        self.w2 = Linear(hidden_dim, dim, bias=False)

    def forward(self, x_BTD: Tensor) -> Tensor:
        """Returns y_BTD."""
        gate_up_BTG = kept_product(self, x_BTD, (self.w1, self.w3))      # no autograd, CPU: one fused matmul
        if gate_up_BTG is not None:
            gate_BTF, up_BTF = gate_up_BTG.chunk(2, dim=-1)
            return self.w2(F.silu(gate_BTF).mul_(up_BTF))
        return self.w2(F.silu(self.w1(x_BTD)) * self.w3(x_BTD))
