"""Device, precision, compile, activation checkpointing and seeding, applied from outside (STYLE 1).

`Hardware` is one process on one device; llmtrain.distributed subclasses it for DDP and FSDP2.
The trainer and the checkpoint code call only the methods below, so they never branch on the
engine: for one process the collectives are identities and the state dicts are the module's own.

`device=auto` picks CUDA > MPS > CPU. `precision=auto` means bf16 autocast on a CUDA device that
has bf16, fp16 autocast with a gradient scaler on one that does not, and fp32 elsewhere; weights
stay fp32 (the master copy) and autocast runs matmuls in the low precision. bf16 on CPU is a choice.
"""

from __future__ import annotations

import contextlib
import random
import types
from collections.abc import Iterator
from typing import Any

import torch
from safetensors.torch import load_model
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from llmtrain.models.linear import use_onednn

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def auto_precision(device: torch.device) -> str:
    if device.type != "cuda":
        return "fp32"
    # Native bf16 only: torch's default also counts emulation, so a V100 or T4 would answer True and
    # run bf16 emulated (slowly) instead of fp16 (which needs the scaler).
    with torch.cuda.device(device):
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


class Hardware:
    """Where and in which precision one process computes.

    Args:
        device: auto, cpu, cuda (or cuda:N) or mps.
        precision: auto, fp32, bf16 or fp16 (autocast dtype; parameters stay fp32). fp16 scales the
            loss with a torch.amp.GradScaler (its range is too small for raw gradients).
        seed: seeds Python and torch (all devices) before anything random is built.
        compile: torch.compile each transformer block (`model.layers[i]`), in place, so parameter
            names and checkpoints stay those of the eager model.
        activation_checkpointing: recompute each block's activations in the backward pass instead of
            keeping them (less memory, about one more forward of compute).
        onednn_linear: run the model's fp32 CPU linear layers on oneDNN instead of MKL when training, on AMD
            CPUs where torch runs AVX-512 kernels, and on kept transposed (fused q/k/v, gate/up) or MKL-packed
            weight copies without autograd on x86 CPUs (on those AMD ones, no-grad calls of 2M+ multiply-adds
            take oneDNN instead; llmtrain.models.linear: about 2x faster matmuls on this project's AVX-512 AMD
            EPYC VM, 1.5-2.4x faster decode matmuls on its Intel draws, while oneDNN was slower on an AVX2-only
            AMD draw and on the Intel ones; the same fp32 math summed in another order); False keeps PyTorch's
            F.linear. No effect on GPUs or under autocast. The attribute says whether oneDNN is in use.
    """

    rank, world_size, is_rank0 = 0, 1, True

    def __init__(self, device: str = "auto", precision: str = "auto", seed: int = 0, compile: bool = False,
                 activation_checkpointing: bool = False, onednn_linear: bool = True) -> None:
        if device.split(":")[0] not in DEVICES:
            raise ValueError(f"hardware.device={device!r}: expected one of {DEVICES} (or cuda:N)")
        if precision != "auto" and precision not in PRECISIONS:
            raise ValueError(f"hardware.precision={precision!r}: expected auto or one of {sorted(PRECISIONS)}")
        name = best_device() if device == "auto" else device
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"hardware.device={device!r} but CUDA is not available; use hardware=cpu or auto")
        self.device = torch.device(name)
        self.precision = auto_precision(self.device) if precision == "auto" else precision
        self.seed, self.compile, self.activation_checkpointing = seed, compile, activation_checkpointing
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.onednn_linear = use_onednn(onednn_linear)
        seed_everything(seed)
        if self.device.type == "cuda" and self.precision != "fp32":
            # The fp32 leftovers of a bf16/fp16 run (norms, loss) on tensor cores; an fp32 run asked
            # for fp32 matmuls, so it keeps torch's default (TF32 off: a 10-bit mantissa).
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    def __repr__(self) -> str:
        extras = "".join(f", {k}" for k in ("compile", "activation_checkpointing", "onednn_linear") if getattr(self, k))
        return f"{type(self).__name__}(device={self.device}, precision={self.precision}{extras})"

    # --- the model ------------------------------------------------------------------------------

    def place(self, model: nn.Module) -> nn.Module:
        """Move the model to the device (fp32 master weights); before `strategy.setup` copies it."""
        return model.to(self.device)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Activation checkpointing, then compile, of each block (in place: the names stay)."""
        for block in getattr(model, "layers", ()):
            if self.activation_checkpointing:
                block.forward = types.MethodType(checkpointed_forward, block)
            if self.compile:
                block.compile()
        return model

    def prepare_frozen(self, model: nn.Module) -> nn.Module:
        """A model that is never trained, beside the policy (a DPO/GRPO reference: Strategy.frozen_models),
        placed as this engine places the policy; in place. Kept as it is here (and under DDP)."""
        return model

    def shard(self, data: Any) -> Any:
        """The part of the data this process trains on (all of it here)."""
        return data

    @contextlib.contextmanager
    def init_device(self) -> Iterator[None]:
        """Context to build the model in (on the target device directly when it is a GPU)."""
        with torch.device(self.device if self.device.type == "cuda" else "cpu"):
            yield

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # --- one optimizer step ---------------------------------------------------------------------

    def all_reduce_sum(self, value: Any) -> Any:
        """The sum of `value` (an int or a tensor) over all processes: itself here."""
        return value

    def require_gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        """Whether the next backward synchronises gradients across processes (only the last
        micro-batch of a window needs to); nothing to do for one process."""

    def backward(self, loss: Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def grad_norm(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> Tensor:
        """The global L2 norm of the gradients (unscaled first under fp16); a plain tensor."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])

    def optimizer_step(self, optimizer: torch.optim.Optimizer, skip: bool = False) -> None:
        """`optimizer.step()` unless `skip`; under fp16 the scaler also adapts its scale (every step)."""
        if self.scaler is None:
            if not skip:
                optimizer.step()
            return
        if not skip:
            self.scaler.step(optimizer)
        self.scaler.update()

    # --- checkpoints: full, unsharded state on rank 0 -------------------------------------------

    def model_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        return model.state_dict()

    def load_model_weights(self, model: nn.Module, path: str) -> tuple[list[str], list[str]]:
        """Load a safetensors file saved by `model_state_dict`; returns (missing, unexpected) names."""
        return load_model(model, path, strict=False, device=str(next(model.parameters()).device))

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)


def checkpointed_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A block's forward whose activations are recomputed in backward (non-reentrant checkpoint).

    Bound to the instance with types.MethodType, so `copy.deepcopy(model)` rebinds it to the copy.
    """
    return checkpoint(type(block).forward, block, *args, use_reentrant=False, **kwargs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)   # seeds CUDA and MPS generators too


def rng_state() -> dict:
    """Every generator the run draws from, for exact resume."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
