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
that CPU: on an AVX2-only draw of the VM (AMD EPYC, Zen 3) and on an Intel Xeon draw (AVX-512, AMX)
oneDNN was slower than MKL for training, so the oneDNN path is taken only on AMD CPUs where torch
dispatches AVX-512 kernels (`onednn_pays_off`).

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
Weights of `PACK_MIN_NUMEL` (256K) elements or more are kept, on AVX-512 CPUs, packed by MKL
for the decode step's row count instead (`_packed_copy`): F.linear's sgemm repacks its weight
operand in every call, a packed weight skips that, 10-25% faster than x @ w_t for decode rows,
with F.linear's values bit for bit; calls of more than `PACK_MAX_ROWS` rows then run on the
parameters. The price is one more copy of the weights in memory while a model is used without
grad, and one transpose (or pack) per weight update before the next no-grad call (one pass over
the weights, the cost of a single decode step). Modules whose linears share an input fuse them
the same way (`kept_product`: GQA's q, k and v; MLA's query (or query-latent) and kv-latent
projections; SwiGLU's gate and up), one matmul instead of two or three.
With autograd on, a copy could not carry the gradient, so training keeps
the two paths above. On CPUs where oneDNN is used for training, no-grad calls of 2M multiply-adds
or more go to oneDNN instead of a copy (see `kept_product`).

`use_onednn(False)` (`hardware.onednn_linear=false`) turns both of llmtrain's own paths off:
every call is then plain F.linear.

`Linear` is nn.Linear with that forward (same parameters, names, init and state dict: the copy is
a plain attribute, not a buffer), so every model file, the HF converters and FSDP see an ordinary
linear layer; a sharded (DTensor) or inference-mode weight never gets a copy. A copy is trusted
while the weight's version counter and storage pointer stay the same (the copy holds the weight's
storage, so a new one cannot reuse its address; `.to()`/`.half()` drop the copies), which holds for optimizer
steps, `load_state_dict` and any in-place op on the parameter, but not for writes that bypass the
counter (`p.data.copy_(...)`, FSDP2's all-gather into a reused buffer, torch's fused optimizer
kernels): the FSDP engine calls `disable_weight_copies` on its model, llmtrain.optim.adamw moves the
counters after each fused step, and code that writes weights another such way should do one of the two.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_INNER_PRODUCT = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
MIN_MACS = 1 << 21          # multiply-adds (rows x in x out) below which MKL's lower call overhead wins
_MKL_OPS = getattr(torch.ops, "mkl", None)
_PACK_WEIGHT = getattr(_MKL_OPS, "_mkl_reorder_linear_weight", None)   # what inductor's CPU freezing uses
_PACK_LINEAR = getattr(_MKL_OPS, "_mkl_linear", None)
PACK_MIN_NUMEL = 1 << 18    # stacked weights of at least this many elements get an MKL-packed copy
PACK_MAX_ROWS = 128         # calls of more rows than this run on the parameters (see kept_product)
# Where oneDNN pays off, no-grad calls this large skip the kept copies: the same break-even as MIN_MACS,
# under a name of its own so that tests can move either one alone.
NO_GRAD_ONEDNN_MIN_MACS = MIN_MACS


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def onednn_available() -> bool:
    """oneDNN's inner product exists in this build and the CPU is x86."""
    try:
        has_op = _INNER_PRODUCT is not None and torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        has_op = False
    return has_op and _is_x86()


def cpu_vendor() -> str:
    """The CPU's vendor id as Linux reports it ("AuthenticAMD", "GenuineIntel"), "" where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def onednn_pays_off() -> bool:
    """An AMD CPU on which torch runs AVX-512 kernels: the one kind where oneDNN's fp32 inner product
    was measured faster than MKL for training (AMD EPYC, AVX-512: tiny step 61.6 vs 87.5 ms).

    On an AVX2-only draw of the VM (AMD EPYC, Zen 3) it was slower than MKL at every training shape
    (1248 x 128 x 384, 2 threads: forward 997 vs 877 us, dw 1925 vs 937 us, as it needs both operands
    transposed into copies), and the tiny training step took 213 instead of 176 ms. On an Intel Xeon
    draw (AVX-512 with AMX) it was slower too: tiny GQA training step 87.0 vs 66.7 ms, small 1574 vs
    1398 ms, the GRPO benchmark's training 0.089 vs 0.072 s per step.
    """
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and cpu_vendor() == "AuthenticAMD"


def mkl_packing_available() -> bool:
    """MKL's packed sgemm (torch.ops.mkl._mkl_linear on a packed weight) exists in this build."""
    try:
        return _PACK_WEIGHT is not None and _PACK_LINEAR is not None and torch.backends.mkl.is_available()
    except (AttributeError, RuntimeError):
        return False


def mkl_packing_pays_off() -> bool:
    """torch runs AVX-512 kernels here: the only CPU kind on which the packed product was measured
    (faster, see `_packed_copy`); elsewhere the large weights keep the plain transposed copy."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


_enabled = True                      # what `use_onednn` was last told
_onednn = onednn_available() and onednn_pays_off()
_copies = _is_x86()
_packing = _copies and mkl_packing_available() and mkl_packing_pays_off()


def use_onednn(enabled: bool) -> bool:
    """Switch llmtrain's fp32 CPU linear paths on (True: oneDNN to train where `onednn_pays_off`, kept
    weight copies without autograd on x86) or off (False: F.linear everywhere), for the whole process;
    returns whether oneDNN is now used."""
    global _enabled, _onednn, _copies, _packing
    _enabled = bool(enabled)
    _onednn = _enabled and onednn_available() and onednn_pays_off()
    _copies = _enabled and _is_x86()
    _packing = _copies and mkl_packing_available() and mkl_packing_pays_off()
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
        module.__dict__.pop("_kept_weights", None)


_PLAIN_TENSORS = (Tensor, nn.Parameter)


def kept_product(holder: nn.Module, x: Tensor, linears: Sequence[nn.Linear], bias: Tensor | None = None) -> Tensor | None:
    """x times the weights of `linears` side by side (their outputs concatenated in order), plus `bias`,
    on a no-grad copy of those weights kept on `holder`; None where that path does not apply and
    the caller runs its plain one.

    It applies without autograd, for fp32 CPU input and plain fp32 weights (not sharded, not
    inference-mode), outside autocast and torch.compile, and while copies are allowed on `holder`
    (see `disable_weight_copies`). One linear gives its own product; several sharing an input
    (q, k, v; MLA's q and kv latent; SwiGLU's gate and up) give one fused matmul. The copy is a
    plain attribute of `holder`, made again when any weight's version counter or storage moved since.

    Which copy depends on the size of the stacked weight (see `_packed_copy` for the measurements):
    below `PACK_MIN_NUMEL` elements, a contiguous (in, out) transpose for `x @ w_t`; from there on,
    on CPUs where MKL's packed product was measured faster (`mkl_packing_pays_off`), the weight
    packed by MKL for the call's row count, which calls of up to `PACK_MAX_ROWS` rows (decode steps)
    use. Larger calls (a prompt's prefill, an evaluation batch) return None: the caller's plain
    path runs on the parameters, where the packed kernel's lead over F.linear shrinks to 5-15%
    and a second copy for each row count would cost another pass over the weights per call.

    Where oneDNN's inner product is on (`onednn_pays_off`: AMD CPUs with AVX-512), calls of
    `NO_GRAD_ONEDNN_MIN_MACS` multiply-adds or more return None too, so each linear goes to oneDNN
    as it did before these copies existed: on that CPU a 16-row decode matmul ran 3.1x faster on
    oneDNN than on F.linear's MKL product (16 x 512 x 1408: 65 vs 204 us), where the kept copy gained
    2.1x over F.linear on the Intel CPU it was measured on (104 vs 215 us). The copies themselves were
    never timed on that AMD CPU; smaller calls, where oneDNN's call overhead loses (16 x 128 x 128: 14
    vs 7 us), keep them.

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
    rows = x.numel() // x.shape[-1]
    if rows == 0:                    # an MoE expert no token chose: MKL's packing divides by the row count
        return None
    if _onednn and rows * x.shape[-1] * sum(w.shape[0] for w in weights) >= NO_GRAD_ONEDNN_MIN_MACS:
        return None                  # oneDNN's inner product, one linear at a time (see the docstring)
    key = [(w._version, w.data_ptr()) for w in weights]
    kept = state.get("_kept_weights")
    if kept is None or kept.key != key or (kept.packed and kept.rows != rows):
        kept = _new_copy(weights, key, rows)
        if kept is None:
            return None
        state["_kept_weights"] = kept
    if kept.packed:
        return _PACK_LINEAR(x.contiguous(), kept.weight, kept.shape, bias, rows)
    y = torch.matmul(x, kept.weight)
    return y if bias is None else y.add_(bias)


class _Kept(NamedTuple):
    key: list[tuple[int, int]]   # (version, data pointer) of each weight when the copy was made
    packed: bool                 # weight: MKL-packed for `rows` rows, else the (in, out) transpose
    rows: int | None
    weight: Tensor
    shape: Tensor | None         # packed only: the stacked weight's shape, for MKL's product
    sources: list[Tensor]        # aliases of the weights: while they hold the storage, no new weight
                                 # (`param.data = ...` in `.to()`, which keeps the version) can reuse its address


def _new_copy(weights: list[Tensor], key: list[tuple[int, int]], rows: int) -> _Kept | None:
    """The copy `kept_product` keeps for `weights` and calls of `rows` rows; None for a call too
    large to pack (the caller then runs on the parameters and nothing is kept)."""
    out_features, in_features = sum(w.shape[0] for w in weights), weights[0].shape[1]
    sources = [w.detach() for w in weights]
    with torch.inference_mode(False):        # normal tensors, usable later under no_grad too
        if not (_packing and out_features * in_features >= PACK_MIN_NUMEL):
            return _Kept(key, False, None, torch.cat([w.t() for w in sources], dim=1).contiguous(), None, sources)
        if rows > PACK_MAX_ROWS:
            return None
        return _Kept(key, True, rows, _packed_copy(sources, rows), _shape_of(out_features, in_features), sources)


def _packed_copy(weights: list[Tensor], rows: int) -> Tensor:
    """`weights` stacked and packed by MKL (cblas_sgemm_pack) for products with `rows` rows.

    F.linear repacks its weight operand inside every sgemm call; a product on a weight packed once
    skips that. On 2 threads of a Sapphire Rapids VM (AVX-512), with weights out of L2 as in a
    decode step, 16 rows: 512 x 2816 in 173 us against 207 us for x @ w_t and 283 us for F.linear,
    1408 x 512: 94 vs 106 us, 512 x 6400: 387 vs 457 us, 256 x 1024: 41 vs 55 us; 512 x 512 even
    (45 vs 46 us); and slower below that (128 x 704: 24 vs 27 us cold but 11.5 vs 9.3 us in cache,
    128 x 128: 14 vs 8 us), hence `PACK_MIN_NUMEL`. At 32-64 rows the lead is 10-30%. The small
    GQA model's whole decode (benchmarks/generate_throughput.py) took 620 instead of 717 ms per call.
    The values are F.linear's bit for bit in every case tried (both end in the same MKL kernel).
    The buffer MKL asks for is a few MB larger than the weight, but the untouched part is never
    resident: packing the small model's 104 MB of weights raised the resident set by 105 MB.
    """
    stacked = weights[0].detach() if len(weights) == 1 else torch.cat([w.detach() for w in weights], dim=0)
    return _PACK_WEIGHT(stacked.contiguous(), rows)


def _shape_of(out_features: int, in_features: int) -> Tensor:
    """A zero-stride (out, in) tensor that tells MKL's packed product the weight's shape (it reads
    only the shape: the values are in the packed copy), without a second copy of the weight."""
    return torch.zeros((), dtype=torch.float32).expand(out_features, in_features)


class Linear(nn.Linear):
    """nn.Linear computed by `linear` (oneDNN for fp32 on CPU) or, without autograd, by x @ w_t on a
    kept (in, out) copy of the weight; parameters and state dict unchanged."""

    def _apply(self, fn, recurse: bool = True):   # .to(), .half(), .cuda(): the copy is of the old weight
        self.__dict__.pop("_kept_weights", None)
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        y = kept_product(self, x, (self,), self.bias)
        return linear(x, self.weight, self.bias) if y is None else y
