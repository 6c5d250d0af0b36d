"""Generation throughput of `llmtrain.generate.generate` vs HF `model.generate` on CPU, fp32.

Both sample (temperature 1, no top-k, no top-p) 64 new tokens after 16 prompts of 32 tokens, with
the same weights (copied with `llmtrain.hf.to_hf_state_dict`): llmtrain with its preallocated KV
cache, transformers with its default DynamicCache and SDPA attention. Neither can stop early
(llmtrain gets an EOS id no token has; HF gets no EOS and min_new_tokens = max_new_tokens), so
both produce exactly batch * 64 tokens. One timed call = prefill + 64 decode steps; the two
implementations alternate call by call so that background load hits both alike; the median of
`--repeats` calls after one warm-up call is reported.

Model kinds: GQA vs `LlamaForCausalLM`, MLA (absorbed-weight decode on the latent cache) vs
`DeepseekV3ForCausalLM` (which caches the expanded per-head keys and values), built exactly as in
train_throughput.py. The last column is what llmtrain's cache stores per token, summed over
layers: 2 * n_kv_heads * head_dim * L for GQA, (kv_lora_rank + qk_rope_head_dim) * L for MLA.

    python benchmarks/generate_throughput.py                  # gqa and mla, tiny and small, 2 threads
    python benchmarks/generate_throughput.py --sizes tiny --repeats 3
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import transformers
from torch import Tensor, nn

from llmtrain.generate import generate
from llmtrain.models.linear import use_onednn
from llmtrain.models.transformer import Transformer
from train_throughput import SIZES, build_ours, build_twin, onednn_option   # same folder: the training models


KINDS = ("gqa", "mla")


def build(kind: str, size_name: str) -> tuple[Transformer, nn.Module]:
    """llmtrain's model of `kind` and its HF twin (Llama / DeepseekV3) with the same weights.

    The shapes and the twins are those of the training benchmark (train_throughput.py).
    """
    ours = build_ours(kind, size_name, SIZES[size_name])
    return ours.eval(), build_twin(kind, ours).eval()


def cache_numbers_per_token(model: Transformer) -> int:
    """Numbers the KV cache holds per token, summed over layers (read from a real cache)."""
    cache = model.new_cache(1, 1)
    return sum(t.numel() for layer in cache.layers for t in vars(layer).values() if isinstance(t, Tensor))


def llmtrain_call(model: nn.Module, prompts_BP: Tensor, new_tokens: int) -> Callable[[int], Tensor]:
    prompts = prompts_BP.tolist()

    def call(seed: int) -> Tensor:
        return generate(model, prompts, new_tokens, eos_id=-1, pad_id=0, temperature=1.0, top_k=0, top_p=1.0,
                        seed=seed).tokens_BN

    return call


def hf_call(model: nn.Module, prompts_BP: Tensor, new_tokens: int) -> Callable[[int], Tensor]:
    mask_BP = torch.ones_like(prompts_BP)
    config = transformers.GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           eos_token_id=None, pad_token_id=0)

    def call(seed: int) -> Tensor:
        torch.manual_seed(seed)
        with torch.inference_mode():
            out_BT = model.generate(input_ids=prompts_BP, attention_mask=mask_BP, generation_config=config)
        return out_BT[:, prompts_BP.shape[1]:]

    return call


def time_alternating(calls: dict[str, Callable[[int], Tensor]], expected_shape: tuple[int, int],
                     repeats: int) -> dict[str, float]:
    """Median seconds per call of each closure, run in turn; the first round is a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(repeats + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            tokens_BN = call(i)
            elapsed = time.perf_counter() - start
            assert tokens_BN.shape == expected_shape, (name, tokens_BN.shape)
            if i > 0:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def run(kind: str, size_name: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> list[str]:
    ours, theirs = build(kind, size_name)
    prompts_BP = torch.randint(3, SIZES[size_name].vocab_size, (batch, prompt_len),
                               generator=torch.Generator().manual_seed(0))
    calls = {"llmtrain": llmtrain_call(ours, prompts_BP, new_tokens),
             "transformers": hf_call(theirs, prompts_BP, new_tokens)}
    seconds = time_alternating(calls, (batch, new_tokens), repeats)
    tokens = batch * new_tokens
    cached = f"{cache_numbers_per_token(ours):,}"
    rows = [f"| {kind} {size_name} | {impl} | {s * 1e3:.0f} | {s * 1e3 / new_tokens:.2f} | {tokens / s:,.0f} | "
            f"{cached if impl == 'llmtrain' else ''} |" for impl, s in seconds.items()]
    ratio = seconds["transformers"] / seconds["llmtrain"]
    return rows + [f"| {kind} {size_name} | ratio llmtrain/transformers (tokens/s) | | | {ratio:.2f}x | |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per implementation")
    parser.add_argument("--threads", type=int, default=2)
    onednn_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    use_onednn(args.onednn_linear == "on")
    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads; "
          f"batch {args.batch}, {args.prompt_len} prompt tokens, {args.new_tokens} new tokens, sampling")
    print("| model | implementation | ms per call (median) | ms per new token | new tokens/s | "
          "KV cache numbers per token (all layers) |")
    print("|---|---|---|---|---|---|")
    for kind in args.kinds:
        for size in args.sizes:
            print("\n".join(run(kind, size, args.batch, args.prompt_len, args.new_tokens, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
