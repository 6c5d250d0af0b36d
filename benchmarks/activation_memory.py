"""Memory saved by activation checkpointing (hardware.activation_checkpointing=true), and its cost.

Each mode runs in a fresh process (peak RSS cannot be reset): build the model, one warm-up
training step, then `--steps` timed steps (forward, backward, AdamW) of `--batch` x `--seq` tokens.
Reported per mode:
- saved activations: bytes of the tensors autograd keeps for backward during one forward
  (torch.autograd.graph.saved_tensors_hooks; exact and independent of the allocator);
- peak RSS growth: the process's peak resident memory (ru_maxrss) after the steps minus before
  the timed steps, i.e. after the warm-up step (CPU; includes allocator caching, so it is noisier);
- CUDA peak: torch.cuda.max_memory_allocated over the steps, on a GPU (--device cuda);
- step time: the median of the timed steps (recomputation costs about one more forward).

    python benchmarks/activation_memory.py                          # model=gqa model/size=small, CPU
    python benchmarks/activation_memory.py --size tiny --batch 16 --seq 128 --steps 3
    python benchmarks/activation_memory.py --device cuda --size 1b --batch 8 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def saved_bytes(model, ids) -> int:
    import torch

    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(ids).float().logsumexp(-1).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def measure(args: argparse.Namespace, checkpointing: bool) -> dict:
    """One mode, in this process."""
    import torch

    from benchmarks.model_presets import build_preset
    from llmtrain.hardware import Hardware

    torch.set_num_threads(args.threads)
    hardware = Hardware(device=args.device, precision=args.precision, activation_checkpointing=checkpointing)
    with hardware.init_device():
        model = build_preset(args.model, args.size)
    model = hardware.prepare(hardware.place(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.vocab_size, (args.batch, args.seq), device=hardware.device)
    with hardware.autocast():
        saved = saved_bytes(model, ids)

    def step() -> float:
        start = time.perf_counter()
        with hardware.autocast():
            loss = model(ids).float().logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hardware.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step()                                  # optimizer state allocated, kernels warm
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if hardware.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(args.steps)]
    result = {"saved_MiB": saved / 2**20, "step_s": statistics.median(times),
              "peak_rss_growth_MiB": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024}
    if hardware.device.type == "cuda":
        result["cuda_peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gqa")
    parser.add_argument("--size", default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--mode", choices=["eager", "checkpointed"], help=argparse.SUPPRESS)   # the child
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args, args.mode == "checkpointed")))
        return
    results = {}
    for mode in ("eager", "checkpointed"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], capture_output=True,
                             text=True, check=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    print(f"model={args.model} model/size={args.size}, batch {args.batch} x {args.seq} tokens, {args.device} "
          f"{args.precision}, {args.threads} thread(s)")
    keys = [k for k in results["eager"] if k in results["checkpointed"]]
    print(f"| {'':20} | " + " | ".join(f"{k:>20}" for k in keys) + " |")
    for mode, row in results.items():
        print(f"| {mode:20} | " + " | ".join(f"{row[k]:20.3f}" for k in keys) + " |")
    e, c = results["eager"], results["checkpointed"]
    print(f"saved activations: {c['saved_MiB'] / e['saved_MiB']:.1%} of eager; "
          f"step time x{c['step_s'] / e['step_s']:.2f}")


if __name__ == "__main__":
    main()
