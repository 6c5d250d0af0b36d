"""Training throughput of llmtrain's Transformer vs its `transformers` twin on CPU, fp32.

Three model kinds, each against the HF class it exports to: GQA vs `LlamaForCausalLM`, MLA vs
`DeepseekV3ForCausalLM`, MoE vs `Qwen2MoeForCausalLM` (with its router aux loss on, as ours is).
One training step = forward + cross-entropy + backward + gradient clipping + AdamW step, on the
same weights (copied with the llmtrain.hf converters) and the same batches. llmtrain's step is
the real one: `Trainer.train_step` with the SEQ strategy, llmtrain's AdamW parameter groups and the
GradClip callback, so the loop's own overhead is measured too. The transformers step is the usual
hand-written loop around `LlamaForCausalLM`. The two alternate step by step so that background load
hits both alike; the median step time is reported.

MFU uses the PaLM estimate (Chowdhery et al. 2022, appendix B; nanoGPT's `estimate_mfu`):
    FLOPs per token = 6 * N + 6 * L * H * (d_qk + d_v) * T        (= 6N + 12 L D T for GQA)
with N the parameters that take part in matmuls for a token (every parameter except an untied
input embedding and the routed experts a token does not use, i.e. including lm_head) and the
second term the attention scores and values (counted over the full T x T square, as PaLM does,
although half is masked). The peak is
measured, not nominal: the FLOP/s of a large fp32 matmul on the same threads.

    python benchmarks/train_throughput.py                 # all kinds, both sizes, 2 threads
    python benchmarks/train_throughput.py --kinds gqa --sizes tiny --steps 20
"""

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from llmtrain.callbacks.grad_clip import GradClip
from llmtrain.data.tokenizer import ByteTokenizer
from llmtrain.hardware import Hardware
from llmtrain.hf import deepseek, llama_config, to_hf_state_dict
from llmtrain.hf import io as hf_io
from llmtrain.models.attention_gqa import GQAttention
from llmtrain.models.attention_mla import MLAttention
from llmtrain.models.ffn import SwiGLU
from llmtrain.models.moe import MoE
from llmtrain.models.transformer import Transformer
from llmtrain.optim import adamw
from llmtrain.schedulers import constant
from llmtrain.strategies.seq import NextToken, shift_labels
from llmtrain.trainer import Trainer


@dataclass(frozen=True)
class Size:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int | None  # None: SwiGLU's default rule, as conf/ uses
    seq_len: int
    batch_size: int


SIZES = {
    "tiny": Size(264, 128, 4, 4, 2, None, 128, 16),
    "small": Size(6400, 512, 8, 8, 2, 1408, 512, 4),
}


# The MLA widths of conf/model/size/mla_tiny.yaml and mla_small.yaml (per-head nope, rope, v; kv latent).
MLA_WIDTHS = {"tiny": dict(qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, kv_lora_rank=64),
              "small": dict(qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, kv_lora_rank=256)}


def build_ours(kind: str, size_name: str, size: Size) -> Transformer:
    """The llmtrain model of `kind` at `size`, with the defaults of conf/model/<kind>.yaml."""
    torch.manual_seed(0)
    if kind == "mla":
        attention = functools.partial(MLAttention, n_heads=size.n_heads, **MLA_WIDTHS[size_name])
    else:
        attention = functools.partial(GQAttention, n_heads=size.n_heads, n_kv_heads=size.n_kv_heads)
    ffn = functools.partial(MoE) if kind == "moe" else functools.partial(SwiGLU, hidden_dim=size.hidden_dim)
    return Transformer(vocab_size=size.vocab_size, dim=size.dim, n_layers=size.n_layers, attention=attention,
                       ffn=ffn, max_seq_len=size.seq_len)


def build_twin(kind: str, ours: Transformer) -> nn.Module:
    """The HF model our `kind` exports to, holding the same weights."""
    if kind == "moe":       # transformers 5 fuses experts on load: go through a saved folder
        with tempfile.TemporaryDirectory() as folder:
            hf_io.export(ours, ByteTokenizer(), f"{folder}/hf")
            theirs = transformers.Qwen2MoeForCausalLM.from_pretrained(
                f"{folder}/hf", dtype=torch.float32, attn_implementation="sdpa", output_router_logits=True)
        return theirs
    family, config_cls, model_cls = {
        "gqa": (None, transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mla": (deepseek, transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
    }[kind]
    hf_cfg = llama_config(ours) if family is None else family.hf_config(ours)
    config = config_cls(**{k: v for k, v in hf_cfg.items() if k not in ("model_type", "architectures")})
    config._attn_implementation = "sdpa"
    theirs = model_cls(config)
    state = to_hf_state_dict(ours) if family is None else family.to_hf_state_dict(ours)
    theirs.load_state_dict(state, strict=False)  # strict=False: tied lm_head is absent
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    return theirs


class OneBatch:
    """The data interface the Trainer needs; the benchmark hands batches to train_step itself."""

    def num_batches(self) -> int:
        return 1


def llmtrain_step(model: Transformer, onednn_linear: bool) -> Callable[[Tensor], float]:
    """llmtrain's real training step: Trainer.train_step with the SEQ strategy and GradClip."""
    trainer = Trainer(model=model, strategy=NextToken(), data=OneBatch(),
                      optimizer=adamw(model.named_parameters(), lr=1e-4, weight_decay=0.0),
                      scheduler=constant,
                      hardware=Hardware(device="cpu", precision="fp32", onednn_linear=onednn_linear),
                      callbacks=[GradClip(max_norm=1.0)], max_steps=10**9)

    def step(ids_BT: Tensor) -> float:
        return trainer.train_step([{"input_ids": ids_BT, "labels": ids_BT}])["loss"]

    return step


def hf_step(model: nn.Module) -> Callable[[Tensor], float]:
    """The usual hand-written loop around an HF causal LM, with the same loss and clipping."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)

    def step(ids_BT: Tensor) -> float:
        out = model(input_ids=ids_BT)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), shift_labels(ids_BT).flatten(), ignore_index=-100)
        if getattr(out, "aux_loss", None) is not None:         # MoE router balance, as llmtrain adds its own
            loss = loss + model.config.router_aux_loss_coef * out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def time_alternating(
    steps: dict[str, Callable[[Tensor], float]], batches: list[Tensor], warmup: int
) -> dict[str, float]:
    """Median seconds per step of each closure, run in turn on the same batches."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i, ids_BT in enumerate(batches):
        for name, step in steps.items():
            start = time.perf_counter()
            step(ids_BT)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class ListData:
    """The data interface Trainer needs, over a list of prebuilt batches (the DPO and GRPO benchmarks)."""

    def __init__(self, batches: list[dict[str, Tensor]]) -> None:
        self.batches = batches

    def num_batches(self) -> int:
        return len(self.batches)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, Tensor]]:
        yield from self.batches[start:]

    def eval_batches(self) -> Iterator[dict[str, Tensor]]:
        yield from self.batches

    def task_metrics(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        return {}


def onednn_option(parser: argparse.ArgumentParser) -> None:
    """--onednn-linear on|off: llmtrain's fp32 CPU linears on oneDNN (hardware.onednn_linear) or, like the
    peer's, on aten's default path; running a benchmark both ways attributes that part of the gain."""
    parser.add_argument("--onednn-linear", choices=["on", "off"], default="on",
                        help="llmtrain's fp32 CPU linears on oneDNN (hardware.onednn_linear); off: aten's default")


def cpu_name() -> str:
    """The CPU model, for the table's caption (Linux; elsewhere "unknown CPU")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
    """Achievable fp32 FLOP/s: the median of `repeats` (n x n) @ (n x n) products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def flops_per_token(model: Transformer, seq_len: int) -> float:
    """PaLM estimate 6N + 6 L H (d_qk + d_v) T; N counts lm_head and the experts a token uses."""
    n_matmul = model.num_params() - (0 if model.tie_embeddings else model.embed.weight.numel())
    attention = 0
    for layer in model.layers:
        attn, ffn = layer.attn, layer.ffn
        if isinstance(attn, MLAttention):
            attention += attn.n_heads * (attn.qk_nope_head_dim + attn.qk_rope_head_dim + attn.v_head_dim)
        else:
            attention += attn.n_heads * 2 * attn.head_dim
        if isinstance(ffn, MoE):
            idle = ffn.n_routed_experts - ffn.n_experts_per_tok
            n_matmul -= idle * 3 * model.dim * ffn.expert_hidden_dim
    return 6 * n_matmul + 6 * attention * seq_len


def run_size(kind: str, name: str, size: Size, steps: int, warmup: int, peak: float,
             onednn_linear: bool) -> list[str]:
    ours = build_ours(kind, name, size)
    theirs = build_twin(kind, ours)
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, size.vocab_size, (size.batch_size, size.seq_len), generator=generator)
        for _ in range(warmup + steps)
    ]
    steps = {"llmtrain": llmtrain_step(ours.train(), onednn_linear), "transformers": hf_step(theirs.train())}
    seconds = time_alternating(steps, batches, warmup)
    tokens = size.batch_size * size.seq_len
    flops = flops_per_token(ours, size.seq_len)
    label = f"{name} {kind}"
    rows = [
        f"| {label} | {impl} | {s * 1e3:.1f} | {tokens / s:,.0f} | {100 * flops * tokens / s / peak:.1f}% |"
        for impl, s in seconds.items()
    ]
    ratio = seconds["transformers"] / seconds["llmtrain"]
    return rows + [f"| {label} | ratio llmtrain/transformers (tokens/s) | | {ratio:.2f}x | |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["gqa", "mla", "moe"], choices=["gqa", "mla", "moe"])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    onednn_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    peak = matmul_peak_flops()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print("| size | implementation | step ms (median) | tokens/s | MFU |")
    print("|---|---|---|---|---|")
    for name in args.sizes:
        for kind in args.kinds:
            rows = run_size(kind, name, SIZES[name], args.steps, args.warmup, peak, args.onednn_linear == "on")
            print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
