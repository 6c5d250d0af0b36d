"""nn.Linear whose fp32 CPU matmuls run on oneDNN instead of the BLAS that `F.linear` calls.

PyTorch's CPU `F.linear` on fp32 goes to MKL's sgemm (aten::addmm/mm), while oneDNN (bundled
with every x86 build, used by PyTorch for bf16 and by inductor's frozen CPU graphs) is left out
of fp32. The two differ a lot on some machines: on this project's 2-core AMD EPYC VM (AVX-512),
measured with 2 threads, oneDNN's fp32 inner product ran the training shapes at 420-480 GFLOP/s
where MKL ran 170-215 (2048 x 128 x 384: 0.43 vs 0.97 ms; 2048 x 512 x 1408: 6.6 vs 13.8 ms),
and a 16-row decode matmul 3x faster (16 x 512 x 1408: 65 vs 204 us), which made the whole tiny
training step 1.4x and the small one 1.5x faster. Both accumulate in fp32 (errors against a
float64 product: about 2e-6 vs 1e-6 on outputs of order 1); they only sum in another order, so a
run's losses agree with the MKL path to the last few digits, not bit for bit.

`linear(x, w, b)` takes oneDNN (`torch.ops.mkldnn._linear_pointwise`, the same inner product
for all three matmuls of a linear layer: y = x w^T, dx = dy w, dw = dy^T x) only where it is the
same computation as F.linear: CPU, float32 input and weight, no autocast, not inside
torch.compile (inductor picks its own kernels), an input of 2 or more dims, and at least
`MIN_MACS` multiply-adds: a oneDNN call costs about 12 us before any arithmetic against MKL's 3-5,
so the small matmuls of a tiny model's decode step (16 x 128 x 128: 14 vs 7 us) stay on MKL, and
the two break even near 1M multiply-adds (16 x 512 x 128: 24 vs 25 us; 64 x 128 x 384: 37 vs 59 us
for oneDNN). Everything else, and the whole process after `use_onednn(False)`
(`hardware.onednn_linear=false`), is plain F.linear. The first matmul of a new shape builds a
oneDNN primitive (about 0.6 ms, then cached).

`Linear` is nn.Linear with that forward (same parameters, names, init and state dict), so every
model file, the HF converters and FSDP see an ordinary linear layer.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_INNER_PRODUCT = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
MIN_MACS = 1 << 21          # multiply-adds (rows x in x out) below which MKL's lower call overhead wins


def onednn_available() -> bool:
    """oneDNN's inner product exists in this build and the CPU is x86 (where it was measured faster)."""
    try:
        has_op = _INNER_PRODUCT is not None and torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        has_op = False
    return has_op and platform.machine().lower() in ("x86_64", "amd64")


_enabled = onednn_available()


def use_onednn(enabled: bool) -> bool:
    """Route eligible fp32 CPU linears to oneDNN (True) or F.linear (False), for the whole process;
    returns whether oneDNN is now used (False when this build or CPU has no oneDNN path)."""
    global _enabled
    _enabled = bool(enabled) and onednn_available()
    return _enabled


def onednn_enabled() -> bool:
    return _enabled


def _inner_product(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    return _INNER_PRODUCT(x, w, b, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x w^T + b with all three matmuls (forward, dx, dw) on oneDNN's inner product."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _inner_product(x, w, b)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _inner_product(dy, w.t())                             # dy w
        dy_MN = dy.reshape(-1, dy.shape[-1])
        if ctx.needs_input_grad[1]:
            dw = _inner_product(dy_MN.t(), x.reshape(-1, x.shape[-1]).t())   # dy^T x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy_MN.sum(0)
        return dx, dw, db


def _eligible(x: Tensor, w: Tensor) -> bool:
    return (_enabled and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and x.dim() >= 2 and 0 < x.numel() * w.shape[0] >= MIN_MACS and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """F.linear(x, w, b), on oneDNN where that is the same computation (see the module docstring)."""
    if not _eligible(x, w):
        return F.linear(x, w, b)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return _OneDNNLinear.apply(x, w, b)
    return _inner_product(x, w, b)


class Linear(nn.Linear):
    """nn.Linear computed by `linear` (oneDNN for fp32 on CPU); parameters and state dict unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
