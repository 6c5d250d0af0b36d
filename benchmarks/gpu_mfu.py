"""Training throughput (tokens/s) and MFU of the 1B presets on one GPU, bf16, with and without compile.

Models: `model=gqa model/size=1b` (GQA, 16 heads / 4 KV heads) and `model=mla model/size=mla_1b`
(DeepSeek-V2-Lite attention), built exactly as `python run.py` builds them. Each configuration
runs the real loop's step (`Trainer.train_step`: autocast bf16, fp32 master weights, AdamW, the
NextToken loss) on random tokens of `--batch` x `--seq`; `--warmup` steps (compilation included)
are discarded, then the median of `--steps` timed steps.

MFU = achieved model FLOP/s / the GPU's dense bf16 peak. Model FLOPs per token are counted by
torch.utils.flop_counter.FlopCounterMode over one forward + backward at the benchmark's shape
(every matmul, the lm_head included, and the attention scores counted as full, not causal: the
PaLM convention, so the figure compares with published MFUs). The peak is looked up from the device
name (H100 SXM/H200 989 TFLOP/s, H100 PCIe 756, A100 312, L4 121, RTX 4090 165) or given with
--peak-tflops.

    python benchmarks/gpu_mfu.py                                   # 4 configurations, ~5-10 min on an H100
    python benchmarks/gpu_mfu.py --batch 8 --seq 2048 --activation-checkpointing
    python benchmarks/gpu_mfu.py --models gqa --no-compile-only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.model_presets import build_preset                      # noqa: E402
from llmtrain.hardware import Hardware                                 # noqa: E402
from llmtrain.optim import adamw                                       # noqa: E402
from llmtrain.schedulers import constant                               # noqa: E402
from llmtrain.strategies.seq import NextToken                          # noqa: E402
from llmtrain.trainer import Trainer                                   # noqa: E402

PRESETS = {"gqa": ("gqa", "1b"), "mla": ("mla", "mla_1b")}
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0),
                    ("4090", 165.0)]


class RandomTokens:
    """`n` batches of uniform random tokens, already on the GPU (data loading is not measured)."""

    def __init__(self, vocab_size: int, batch: int, seq: int, n: int) -> None:
        self.ids = torch.randint(0, vocab_size, (n, batch, seq), device="cuda")

    def num_batches(self) -> int:
        return len(self.ids)

    def train_batches(self, epoch: int, start: int = 0):
        for ids in self.ids[start:]:
            yield {"input_ids": ids, "labels": ids}


def peak_tflops(given: float | None) -> float:
    if given is not None:
        return given
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    sys.exit(f"unknown GPU {name!r}: give its dense bf16 peak with --peak-tflops")


def flops_per_token(model: torch.nn.Module, hardware: Hardware, batch: int, seq: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(0, model.vocab_size, (batch, seq), device="cuda")
    with FlopCounterMode(display=False) as counter, hardware.autocast():
        model(ids).float().logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / (batch * seq)


def run(kind: str, compile: bool, args: argparse.Namespace) -> dict[str, float]:
    hardware = Hardware(device="cuda", precision="bf16", compile=compile,
                        activation_checkpointing=args.activation_checkpointing)
    with hardware.init_device():
        model = build_preset(*PRESETS[kind])
    flops = flops_per_token(model, hardware, 1, args.seq)          # eager, before compile
    model = hardware.prepare(hardware.place(model))
    n = args.warmup + args.steps
    data = RandomTokens(model.vocab_size, args.batch, args.seq, n)
    trainer = Trainer(model=model, strategy=NextToken(), data=data, optimizer=adamw(model.named_parameters(),
                      lr=1e-4, fused=True), scheduler=constant, hardware=hardware, max_steps=n)
    times = []
    for batch in data.train_batches(0):
        torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_step([batch])                                 # ends with a device sync (.tolist())
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[args.warmup:])
    tokens_per_s = args.batch * args.seq / step_s
    result = {"params_B": sum(p.numel() for p in model.parameters()) / 1e9, "step_s": step_s,
              "tokens_per_s": tokens_per_s, "model_TFLOP_per_s": flops * tokens_per_s / 1e12,
              "MFU": flops * tokens_per_s / (peak_tflops(args.peak_tflops) * 1e12),
              "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30}
    del trainer, model, data
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["gqa", "mla"], choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--no-compile-only", action="store_true", help="skip the compiled runs")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU (default: from its name)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_mfu.py needs a CUDA GPU, and torch.cuda.is_available() is False here "
                 f"(torch {torch.__version__}); run it on a GPU machine")
    print(f"{torch.cuda.get_device_name()}, peak {peak_tflops(args.peak_tflops):.0f} bf16 TFLOP/s; "
          f"batch {args.batch} x {args.seq} tokens, bf16 autocast, fused AdamW"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}; "
          f"median of {args.steps} steps after {args.warmup}")
    print("| model | compile | params (B) | step (s) | tokens/s | model TFLOP/s | MFU | peak memory (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in args.models:
        for compile in (False,) if args.no_compile_only else (False, True):
            r = run(kind, compile, args)
            print(f"| {' '.join(PRESETS[kind])} | {compile} | {r['params_B']:.2f} | {r['step_s']:.3f} | "
                  f"{r['tokens_per_s']:,.0f} | {r['model_TFLOP_per_s']:.0f} | {r['MFU']:.1%} | "
                  f"{r['peak_mem_GiB']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
