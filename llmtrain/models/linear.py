"""nn.Linear whose fp32 CPU matmuls run on oneDNN when training and on kept transposed weights without
autograd, instead of the product that `F.linear` calls.

PyTorch's CPU `F.linear` on fp32 goes to MKL's sgemm (aten::addmm/mm), while oneDNN (bundled
with every x86 build, used by PyTorch for bf16 and by inductor's frozen CPU graphs) is left out
of fp32. The two differ a lot on some machines: on this project's 2-core AMD EPYC VM (AVX-512),
measured with 2 threads, oneDNN's fp32 inner product ran the training shapes at 420-480 GFLOP/s
where MKL ran 170-215 (2048 x 128 x 384: 0.43 vs 0.97 ms; 2048 x 512 x 1408: 6.6 vs 13.8 ms),
and a 16-row decode matmul 3x faster (16 x 512 x 1408: 65 vs 204 us), which made the whole tiny
training step 1.4x and the small one 1.5x faster. Both accumulate in fp32 (errors against a
float64 product: about 2e-6 vs 1e-6 on outputs of order 1); they only sum in another order, so a
run's losses agree with the MKL path to the last few digits, not bit for bit. That gain needs
AVX-512: on an AVX2-only draw of the VM (AMD EPYC, Zen 3) oneDNN was slower than MKL at every
training shape, so the oneDNN path is taken only where torch dispatches AVX-512 kernels
(`onednn_pays_off`).

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

Without autograd (generation, evaluation, a frozen reference), `Linear` takes a third path for
fp32 CPU inputs: y = x @ w_t with w_t a contiguous (in, out) copy of its weight, kept on the
module and made again whenever the weight changes (its version counter or storage moved). BLAS's
plain "NN" product is the fast one for few rows: on a 2-core Intel Xeon VM (Sapphire Rapids,
AVX-512, 2 threads) a 16-row decode matmul ran 1.5-2.4x faster than F.linear's "NT" product on the
(out, in) weight and than oneDNN (16 x 512 x 1408: 104 vs 215 and 169 us; 16 x 512 x 6400: 512 vs
1008 and 738 us; 16 x 128 x 128: 4.7 vs 6.9 and 21 us) and no slower at 512 rows (2-7% faster).
The price is one more copy of the weights in memory while a model is used without grad, and one
transpose per weight update before the next no-grad call (one pass over the weights, the cost of
a single decode step). Modules whose linears share an input fuse them the same way
(`kept_weight_t`: GQA's q, k and v; MLA's query (or query-latent) and kv-latent projections;
SwiGLU's gate and up), one matmul instead of two or three.
With autograd on, a copy could not carry the gradient, so training keeps
the two paths above.

`use_onednn(False)` (`hardware.onednn_linear=false`) turns both of llmtrain's own paths off:
every call is then plain F.linear.

`Linear` is nn.Linear with that forward (same parameters, names, init and state dict: the copy is
a plain attribute, not a buffer), so every model file, the HF converters and FSDP see an ordinary
linear layer; a sharded (DTensor) or inference-mode weight never gets a copy. A copy is trusted
while the weight's version counter and storage pointer stay the same, which holds for optimizer
steps, `load_state_dict` and any in-place op on the parameter, but not for writes that bypass the
counter (`p.data.copy_(...)`, FSDP2's all-gather into a reused buffer, torch's fused optimizer
kernels): the FSDP engine calls `disable_weight_copies` on its model, llmtrain.optim.adamw moves the
counters after each fused step, and code that writes weights another such way should do one of the two.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_INNER_PRODUCT = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
MIN_MACS = 1 << 21          # multiply-adds (rows x in x out) below which MKL's lower call overhead wins


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def onednn_available() -> bool:
    """oneDNN's inner product exists in this build and the CPU is x86."""
    try:
        has_op = _INNER_PRODUCT is not None and torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        has_op = False
    return has_op and _is_x86()


def onednn_pays_off() -> bool:
    """torch runs AVX-512 kernels on this CPU, where oneDNN's fp32 inner product was measured faster.

    On an AVX2-only draw of the VM (AMD EPYC, Zen 3) it was slower than MKL at every training shape
    (1248 x 128 x 384, 2 threads: forward 997 vs 877 us, dw 1925 vs 937 us, as it needs both operands
    transposed into copies), and the tiny training step took 213 instead of 176 ms.
    """
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


_enabled = True                      # what `use_onednn` was last told
_onednn = onednn_available() and onednn_pays_off()
_copies = _is_x86()


def use_onednn(enabled: bool) -> bool:
    """Switch llmtrain's fp32 CPU linear paths on (True: oneDNN to train where `onednn_pays_off`, kept
    weight copies without autograd on x86) or off (False: F.linear everywhere), for the whole process;
    returns whether oneDNN is now used."""
    global _enabled, _onednn, _copies
    _enabled = bool(enabled)
    _onednn = _enabled and onednn_available() and onednn_pays_off()
    _copies = _enabled and _is_x86()
    return _onednn


def onednn_enabled() -> bool:
    return _onednn



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
    return (_onednn and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and x.dim() >= 2 and 0 < x.numel() * w.shape[0] >= MIN_MACS and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """F.linear(x, w, b), on oneDNN where that is the same computation (see the module docstring)."""
    if not _eligible(x, w):
        return F.linear(x, w, b)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return _OneDNNLinear.apply(x, w, b)
    return _inner_product(x, w, b)


def disable_weight_copies(model: nn.Module) -> None:
    """Never keep weight copies in `model` (every submodule): for weights whose storage is written
    behind their version counter, such as FSDP2's, which all-gathers each forward's parameters into
    a buffer it reuses, so the same pointer and version can hold new values."""
    for module in model.modules():
        module.__dict__["_weight_copies"] = False
        module.__dict__.pop("_stacked_weight_t", None)


_PLAIN_TENSORS = (Tensor, nn.Parameter)


def kept_weight_t(holder: nn.Module, x: Tensor, linears: Sequence[nn.Linear]) -> Tensor | None:
    """The weights of `linears` side by side as one contiguous (in, sum of outs) tensor kept on
    `holder`, for `x @ kept`; None where that path does not apply and the caller runs its plain one.

    It applies without autograd, for fp32 CPU input and plain fp32 weights (not sharded, not
    inference-mode), outside autocast and torch.compile, and while copies are allowed on `holder`
    (see `disable_weight_copies`). One linear gives its transposed weight; several sharing an input
    (q, k, v; MLA's q and kv latent; SwiGLU's gate and up) give one fused matmul, `x @ kept` = their
    outputs concatenated in the order of `linears`. The copy is a plain attribute of `holder`, made again when any
    weight's version counter or storage moved since.

    This runs once per module per decode step, so it reads each weight once from `_parameters` (a
    module attribute lookup costs about 1 us) and checks the cheap process-wide conditions first:
    about 4.6 us per fused gate/up call on 2 threads of a Sapphire Rapids VM, against 9.1 us for
    separate eligibility and lookup functions that each read `linear.weight`.
    """
    if (not _copies or torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu"
            or x.dim() < 2 or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()):
        return None
    state = holder.__dict__
    if not state.get("_weight_copies", True):
        return None
    weights = [linear._parameters["weight"] for linear in linears]
    for w in weights:
        if w.__class__ not in _PLAIN_TENSORS or w.dtype != torch.float32 or w.is_inference():
            return None
    key = [(w._version, w.data_ptr()) for w in weights]
    kept = state.get("_stacked_weight_t")
    if kept is None or kept[0] != key:
        with torch.inference_mode(False):        # a normal tensor, usable later under no_grad too
            kept = (key, torch.cat([w.detach().t() for w in weights], dim=1).contiguous())
        state["_stacked_weight_t"] = kept
    return kept[1]


class Linear(nn.Linear):
    """nn.Linear computed by `linear` (oneDNN for fp32 on CPU) or, without autograd, by x @ w_t on a
    kept (in, out) copy of the weight; parameters and state dict unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        w_t = kept_weight_t(self, x, (self,))
        if w_t is not None:
            y = torch.matmul(x, w_t)
            return y if self.bias is None else y.add_(self.bias)
        return linear(x, self.weight, self.bias)
