"""Device, precision and seeding, applied to the model from outside (STYLE 1).

`device=auto` picks CUDA > MPS > CPU. `precision=auto` means bf16 autocast on CUDA and fp32
elsewhere; weights stay fp32 (the master copy) and autocast runs matmuls in the low precision.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import torch
from torch import nn

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class Hardware:
    """Where and in which precision the run computes.

    Args:
        device: auto, cpu, cuda (or cuda:N) or mps.
        precision: auto, fp32 or bf16 (autocast dtype; parameters stay fp32).
        seed: seeds Python and torch (all devices) before anything random is built.
    """

    def __init__(self, device: str = "auto", precision: str = "auto", seed: int = 0) -> None:
        if device.split(":")[0] not in DEVICES:
            raise ValueError(f"hardware.device={device!r}: expected one of {DEVICES} (or cuda:N)")
        if precision != "auto" and precision not in PRECISIONS:
            raise ValueError(f"hardware.precision={precision!r}: expected auto or one of {sorted(PRECISIONS)}")
        name = best_device() if device == "auto" else device
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"hardware.device={device!r} but CUDA is not available; use hardware=cpu or auto")
        self.device = torch.device(name)
        self.precision = ("bf16" if name.startswith("cuda") else "fp32") if precision == "auto" else precision
        self.seed = seed
        seed_everything(seed)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True   # fp32 leftovers (norms, loss) on tensor cores
            torch.backends.cudnn.allow_tf32 = True

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    def __repr__(self) -> str:
        return f"Hardware(device={self.device}, precision={self.precision})"

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move the model to the device; parameters stay fp32 under autocast."""
        return model.to(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @contextlib.contextmanager
    def init_device(self) -> Iterator[None]:
        """Context to build the model in (on the target device directly when it is a GPU)."""
        with torch.device(self.device if self.device.type == "cuda" else "cpu"):
            yield


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
