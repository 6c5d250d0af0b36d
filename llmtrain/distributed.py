"""Data-parallel engines: DDP and FSDP2 behind the Hardware interface (DESIGN 7).

Each process is one rank; `torchrun` or `hardware.nprocs` (llmtrain.launch) start them, and the
process group is gloo on CPU, nccl on CUDA. What makes W ranks with batch B train exactly like one
process with batch B*W (same data, same loss curve):

- data: rank r trains on its slice of each global batch (llmtrain.data.sharded.RankShard);
- loss: every micro-batch is divided by the GLOBAL number of loss items (`all_reduce_sum`), so the
  per-rank losses sum to the single-process loss; both engines average gradients over the ranks,
  so `backward` multiplies by W and the averaged gradient is the single-process gradient;
- metrics: the trainer sums each window's loss terms over the ranks before rank 0 logs them;
- clipping: the gradient norm is the global one (FSDP2's sharded norms are gathered).

Both engines modify the model in place (torch.distributed's composable `replicate` is DDP without
the wrapper module; `fully_shard` is FSDP2), so parameter names, `model.new_cache` for generation
and the loop stay those of the single-process model. Checkpoints hold the full, unsharded state in
the single-process format (gathered on rank 0, which alone writes), so a run saved under FSDP2
loads into one process, into DDP or into FSDP2 with another number of ranks.
"""

from __future__ import annotations

import atexit
import datetime as dt
import os
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from llmtrain.checkpoint import tied_names
from llmtrain.data.sharded import RankShard
from llmtrain.hardware import Hardware, best_device
from llmtrain.models.linear import disable_weight_copies

FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def rank_device(device: str) -> str:
    """cuda -> cuda:LOCAL_RANK (one GPU per rank); other devices as given."""
    name = best_device() if device == "auto" else device
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if name == "cuda" else name


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """Join the ranks that torchrun / llmtrain.launch started (their env names the rendezvous)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        raise ValueError("hardware=ddp/fsdp runs one process per rank: add hardware.nprocs=<N> to start N here, "
                         "or start the ranks with torchrun --nproc_per_node=<N> run.py hardware=...")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    atexit.register(dist.destroy_process_group)


class Distributed(Hardware):
    """What DDP and FSDP2 share: the process group, the collectives and the data slice.

    Args:
        nprocs: ranks that `python run.py` starts on this machine (llmtrain.launch); under torchrun
            leave it at 1, torchrun starts them.
        timeout_s: how long a collective waits for a missing rank before the run fails.
        (the rest as Hardware)
    """

    def __init__(self, device: str = "auto", precision: str = "auto", seed: int = 0, compile: bool = False,
                 activation_checkpointing: bool = False, onednn_linear: bool = True, nprocs: int = 1,
                 timeout_s: float = 600.0) -> None:
        if nprocs < 1:
            raise ValueError(f"hardware.nprocs={nprocs} must be >= 1")
        super().__init__(rank_device(device), precision, seed, compile, activation_checkpointing, onednn_linear)
        init_process_group(self.device, timeout_s)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_rank0 = self.rank == 0

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, rank={self.rank}, world_size={self.world_size})"

    def shard(self, data: Any) -> Any:
        return RankShard(data, self.rank, self.world_size)

    def all_reduce_sum(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            dist.all_reduce(value)
            return value
        total = torch.tensor(value, device=self.device)
        dist.all_reduce(total)
        return total.item()

    def require_gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        model.set_requires_gradient_sync(enabled)

    def backward(self, loss: Tensor) -> None:
        super().backward(loss * self.world_size)     # the engines average over ranks; we want the sum

    def grad_norm(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> Tensor:
        norm = super().grad_norm(optimizer, params)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm     # FSDP2: from the shards' norms


class DDP(Distributed):
    """Every rank holds the whole model; gradients are all-reduced during backward.

    Args:
        find_unused_parameters: needed when some parameters get no gradient in a step (MoE experts
            that no token was routed to).
    """

    def __init__(self, *args: Any, find_unused_parameters: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.find_unused_parameters = find_unused_parameters

    def prepare(self, model: nn.Module) -> nn.Module:
        from torch.distributed._composable import replicate

        model = super().prepare(model)
        device_ids = [self.device] if self.device.type == "cuda" else None
        # no buffer broadcast per forward: the only buffers are the RoPE tables, equal on every rank
        model = replicate(model, device_ids=device_ids, forward_sync_buffers=False,
                          find_unused_parameters=self.find_unused_parameters)
        # replicate builds DDP (its gradient buckets) at the first forward; GRPO's first forward is a
        # rollout under inference mode, whose inference-tensor buckets backward then cannot write
        # ("Inplace update to inference tensor outside InferenceMode"): build it now.
        replicate.state(model).lazy_init()
        return model


def reshard(model: nn.Module) -> None:
    """Free every FSDP2 unit's gathered parameters and register its shards again. With
    reshard_after_forward=False the no-grad warm-up forward (FSDP2's first, where it initialises
    lazily) left them gathered, and no gradient ever reached the shards: grad_norm 0 at every step
    of SEQ and GRPO runs alike, measured before this call was added."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class FSDP(Distributed):
    """FSDP2: each block's parameters, gradients and optimizer state are sharded over the ranks, and so
    is a DPO/GRPO reference (`prepare_frozen`).

    Args:
        reshard_after_forward: free the gathered parameters after each block's forward (ZeRO-3;
            less memory, one more all-gather in backward) or keep them until backward (ZeRO-2).
    """

    def __init__(self, *args: Any, reshard_after_forward: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reshard_after_forward = reshard_after_forward
        self.mesh = None

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        # Read off now: between a forward and its backward (or after an eval forward) FSDP2 registers
        # the root's gathered parameters, which are neither the optimizer's nor tied to each other.
        self.tied = tied_names(model)
        self._fully_shard(model, self.reshard_after_forward)
        self.names = {id(p): name for name, p in model.named_parameters()}
        return model

    def prepare_frozen(self, model: nn.Module) -> nn.Module:
        """Sharded like the policy, so that each rank holds 1/W of the reference too; its forwards (no
        backward follows) always free each block's gathered weights after use."""
        return self._fully_shard(model, reshard_after_forward=True)

    def _fully_shard(self, model: nn.Module, reshard_after_forward: bool) -> nn.Module:
        """Each block, then the root (embedding, final norm, head), as one FSDP2 unit each."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        disable_weight_copies(model)   # the gathered weights change behind their version counters
        if self.mesh is None:          # one mesh for the policy and the reference: their shards match
            self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=self.mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=self.mesh, reshard_after_forward=reshard_after_forward)
        # FSDP2 allocates the buffers it all-gathers into at the first forward; GRPO's first forward is
        # a rollout under inference mode, whose inference-tensor buffers a training forward then cannot
        # fill ("Inplace update to inference tensor outside InferenceMode"): allocate them now.
        with torch.no_grad():
            model(torch.zeros(1, 1, dtype=torch.long, device=self.device))
        reshard(model)
        return model

    def model_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        state = get_model_state_dict(model, options=FULL_ON_RANK0)         # {} on the other ranks
        return {name: tensor for name, tensor in state.items() if name not in self.tied}

    def load_model_weights(self, model: nn.Module, path: str) -> tuple[list[str], list[str]]:
        state = load_file(path)                                            # every rank reads the full file
        expected, given = set(model.state_dict()) - self.tied, set(state)     # before: the call adds keys
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return sorted(expected - given), sorted(given - expected)

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """torch's own format (states keyed by parameter index), so one process can load it."""
        full = get_optimizer_state_dict(model, optimizer, options=FULL_ON_RANK0)
        if not full:
            return {}
        index = {name: i for i, name in enumerate(self.param_names(optimizer))}
        return {"state": {index[name]: value for name, value in full["state"].items()},
                "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                                 for group in full["param_groups"]]}

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        names = self.param_names(optimizer)
        full = {"state": {names[i]: value for i, value in state["state"].items()},
                "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                 for group in state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))

    def param_names(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """The name of each optimizer parameter, in the order torch numbers them in a state dict."""
        return [self.names[id(p)] for group in optimizer.param_groups for p in group["params"]]
