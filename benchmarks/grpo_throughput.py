"""GRPO step time of llmtrain vs TRL's `GRPOTrainer` on CPU, fp32, split into generation and training.

Same tiny GQA model on both sides (the training benchmark's tiny preset: vocab 264 byte tokenizer,
dim 128, 4 layers, 4 heads, 2 kv heads, tied embeddings), built once by `train_throughput.build_ours`
and exported with `llmtrain.hf.io.export` to a Hugging Face folder that `LlamaForCausalLM.from_pretrained`
loads (SDPA attention), so both start from identical weights; TRL builds its reference model from the
same folder. Same prompts, in the same order: 8 per step, each 32 tokens: <bos>, then 31 random printable ASCII
bytes (one token each; TRL tokenizes the text column with the tokenizer files `llmtrain.hf.tokenizer` writes,
checked at start to give our ids), 4 completions per prompt (one step = 8 x 4 = 32 completions, one
optimizer step, no gradient accumulation), 32 new tokens sampled at temperature 1 (no top-k, no
top-p). Neither side can stop early: both get an EOS id past the vocabulary, which no sampled token
has (llmtrain's rollout through its tokenizer, TRL's `generate` and completion mask through its
generation config and `eos_token_ids`), so every completion is exactly 32 tokens on both sides
(checked every step). The same rule-based reward on both sides, `digit_count` (how many ASCII digits
a completion holds). The same GRPO math: group-standardised advantages, clipped ratio (eps 0.2), k3
KL to a frozen reference with coefficient 0.01 (so both run a reference forward every step),
per-completion token mean then mean over completions (TRL `loss_type="grpo"`; its default "dapo"
normalises by tokens), one optimizer step per rollout (`num_iterations` 1, so the old log-probs are
the detached current ones on both sides and no extra forward runs), no reference sync. AdamW, lr 1e-6,
betas (0.9, 0.95), no weight decay, constant schedule, gradient clipping at 1.0; each side keeps its
own AdamW setup (TRL: `adamw_torch_fused`; llmtrain: `llmtrain.optim.adamw`, which also takes torch's
fused kernel on CPU). fp32 (TRL's bf16 default and gradient checkpointing default are turned off), no
vLLM, no logging, no checkpoints.

llmtrain: the real loop, `Trainer.train_step` with `strategies.grpo.GRPO` (its `Rollouts` sample with
`llmtrain.generate`'s preallocated KV cache), llmtrain's AdamW and the GradClip callback; batches are
prebuilt tensors in the "prompts" layout; the policy and reference forwards compute each group's prompt
once, into a KV cache the group's 4 completions attend to (`strategy.share_prompt`, on by default;
`--share-prompt off` gives TRL's one row per completion). Generation = `Rollouts.sample`: sampling, decoding the
texts, the rewards and the rollout tensors. Training = the rest of the step: reference and policy
forward, loss, backward, clipping, optimizer step. TRL: `GRPOTrainer.train()`, a step timed by a
`TrainerCallback` from `on_step_begin` to `on_step_end`; generation = `_generate` (tokenizing the
prompt texts, `model.generate` with HF's cache, decoding the texts, its length metrics) plus
`_calculate_rewards`; training = the rest of the step: padding, the reference forward (TRL runs it
inside `_generate_and_score_completions`; it is in the training column on both sides), advantages,
the policy forward (TRL's fused LM head, which also computes the entropy it logs), backward,
clipping, optimizer step and TRL's metric bookkeeping. Below the table, the model-only decode time
(`llmtrain.generate.generate` vs `LlamaForCausalLM.generate`) is given apart. The two alternate step
by step: the same callback runs one llmtrain step right after each TRL step (outside TRL's timed
window), so background load hits both alike. `--warmup` steps each are discarded, then the median
of `--steps` per column (so generation + training need not add up to the total exactly).

Sanity checks printed under the table: the largest difference between llmtrain's and TRL's per-token
log-probs of the same 32 completions (same weights, same temperature), and the mean reward and the
tokens per completion on each side.

    python benchmarks/grpo_throughput.py                     # 3 warm-up + 20 timed steps, 2 threads
    python benchmarks/grpo_throughput.py --steps 5 --threads 1
    python benchmarks/grpo_throughput.py --quick             # 1 + 1 steps, 2 prompts x 4, 8 tokens: a smoke run
"""

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from torch import Tensor

try:
    import datasets
    import trl
except ImportError as error:    # the peer is an optional extra, not a dependency of llmtrain
    raise SystemExit(f"benchmarks/grpo_throughput.py runs TRL's GRPOTrainer beside llmtrain and needs it "
                     f"({error.name} is missing): pip install -e '.[bench]'") from None

from llmtrain.callbacks.grad_clip import GradClip
from llmtrain.data.chat import IGNORE_INDEX
from llmtrain.data.tokenizer import BYTE_OFFSET, ByteTokenizer
from llmtrain.hardware import Hardware
from llmtrain.hf import io as hf_io
from llmtrain.models.linear import onednn_enabled
from llmtrain.models.transformer import Transformer
from llmtrain.optim import adamw
from llmtrain.schedulers import constant
from llmtrain.strategies import rollout as rollout_module
from llmtrain.strategies.grpo import GRPO
from llmtrain.strategies.rollout import completion_logps
from llmtrain.trainer import Trainer
from train_throughput import SIZES, ListData, build_ours, cpu_name, onednn_option   # same folder: tiny GQA model

LR = 1e-6            # TRL's default GRPO learning rate; used on both sides
BETAS = (0.9, 0.95)  # llmtrain's AdamW default; TRL gets adam_beta2=0.95
KL_COEF = 0.01       # llmtrain's default kl_coef; TRL beta
CLIP_EPS = 0.2       # both defaults
TEMPERATURE = 1.0
NO_TOKEN = BYTE_OFFSET + 256   # an EOS id past the vocabulary, which no sampled token has: no row ever ends
# Printable ASCII: one UTF-8 byte, so one token, per character; "<" left out so that no special-token
# name ("<eos>", ...) can appear in the text that TRL tokenizes.
CHARS = torch.tensor([b for b in range(32, 127) if b != ord("<")])


def digit_count(completions: list[str]) -> list[float]:
    """The rule-based reward of both sides: how many ASCII digits a completion holds.

    A count rather than a share, so that the two decoders agree on the same ids: llmtrain writes special
    tokens by name and TRL drops them, but neither writes a digit for anything but a digit byte.
    """
    return [float(sum("0" <= ch <= "9" for ch in text)) for text in completions]


def digits(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    """llmtrain's reward signature (strategies/rewards.py)."""
    return digit_count(completions)


def trl_digits(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """TRL's reward signature (keyword arguments, dataset columns among them)."""
    return digit_count(completions)


trl_digits.__name__ = "digits"


class NoStopTokenizer(ByteTokenizer):
    """The byte tokenizer with an EOS id past the vocabulary: llmtrain's rollout samples every row to the end."""

    eos_id = NO_TOKEN


@dataclasses.dataclass
class Prompts:
    """Prompts as byte values (N, P) and one-digit answers (N,) (the layout needs them; the reward ignores them)."""

    prompt: Tensor
    answer: Tensor

    @classmethod
    def random(cls, n: int, prompt_len: int, seed: int = 0) -> "Prompts":
        generator = torch.Generator().manual_seed(seed)
        prompt = CHARS[torch.randint(len(CHARS), (n, prompt_len - 1), generator=generator)]   # after <bos>
        return cls(prompt, ord("0") + torch.randint(10, (n,), generator=generator))

    def llmtrain_batches(self, batch: int) -> list[dict[str, Tensor]]:
        """The "prompts" layout (strategies/rollout.py): B prompt rows, then B answer rows, right-padded."""
        out = []
        for start in range(0, len(self.prompt), batch):
            chars = BYTE_OFFSET + self.prompt[start:start + batch]
            prompt = torch.cat([torch.full_like(chars[:, :1], ByteTokenizer.bos_id), chars], 1)   # as TRL's tokenizer
            answer = torch.full_like(prompt, ByteTokenizer.pad_id)
            answer[:, 0] = BYTE_OFFSET + self.answer[start:start + batch]
            ids = torch.cat([prompt, answer])
            labels = ids.clone()
            labels[len(prompt):, 1:] = IGNORE_INDEX
            out.append({"input_ids": ids, "labels": labels})
        return out

    def trl_dataset(self) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"prompt": [bytes(row.tolist()).decode("ascii") for row in self.prompt],
                                           "answer": [chr(a) for a in self.answer.tolist()]})


class PromptBatches(ListData):
    """The data interface Trainer and GRPO need, over prebuilt batches (cf. dpo_throughput's PreferenceBatches)."""

    tokenizer = NoStopTokenizer()


class Stopwatch:
    """Wraps a callable and adds the seconds of each call to `seconds` (reset by the caller)."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


@dataclasses.dataclass
class Ours:
    strategy: GRPO
    # batch index -> (total, generation, decode) seconds and the train_step metrics
    step: Callable[[int], tuple[float, float, float, dict[str, float]]]


def llmtrain_run(model: Transformer, data: PromptBatches, group: int, new_tokens: int,
                 onednn_linear: bool, share_prompt: bool) -> Ours:
    """llmtrain's real GRPO step: Trainer.train_step with GRPO (kl 0.01, no sync), llmtrain's AdamW, GradClip."""
    strategy = GRPO([digits], group_size=group, max_new_tokens=new_tokens, temperature=TEMPERATURE,
                    clip_eps=CLIP_EPS, kl_coef=KL_COEF, sync_interval=None, num_iterations=1,
                    share_prompt=share_prompt, seed=0)
    strategy.setup(model, data)                 # the tokenizer for the rollouts; a frozen copy as the reference
    trainer = Trainer(model=model, strategy=strategy, data=data,
                      optimizer=adamw(model.named_parameters(), lr=LR, betas=BETAS, weight_decay=0.0),
                      scheduler=constant,
                      hardware=Hardware(device="cpu", precision="fp32", onednn_linear=onednn_linear),
                      callbacks=[GradClip(max_norm=1.0)], max_steps=10**9)
    model.train()
    sample = strategy.rollouts.sample = Stopwatch(strategy.rollouts.sample)   # generation: the whole rollout
    decode = rollout_module.generate = Stopwatch(rollout_module.generate)     # of which llmtrain.generate

    def step(i: int) -> tuple[float, float, float, dict[str, float]]:
        start = time.perf_counter()
        metrics = trainer.train_step([data.batches[i]])
        return time.perf_counter() - start, sample.take(), decode.take(), metrics

    return Ours(strategy, step)


class TimedGRPOTrainer(trl.GRPOTrainer):
    """GRPOTrainer that adds the time of its generation (`_generate`) and rewards to `generation_s`."""

    generation_s = 0.0
    completion_lengths: list[int] = []

    def _generate(self, prompts):
        start = time.perf_counter()
        out = super()._generate(prompts)
        self.generation_s += time.perf_counter() - start
        self.completion_lengths = [len(ids) for ids in out[1]]
        return out

    def _calculate_rewards(self, *args, **kwargs):
        start = time.perf_counter()
        out = super()._calculate_rewards(*args, **kwargs)
        self.generation_s += time.perf_counter() - start
        return out


class Alternate(transformers.TrainerCallback):
    """Times each TRL step (on_step_begin -> on_step_end), then runs one llmtrain step after it."""

    def __init__(self, ours: Ours, new_tokens: int) -> None:
        self.ours, self.new_tokens = ours, new_tokens
        self.trainer: TimedGRPOTrainer | None = None
        self.decode: Stopwatch | None = None
        self.trl: list[tuple[float, float, float]] = []     # (total, generation, decode) seconds per step
        self.llmtrain: list[tuple[float, float, float]] = []
        self.rewards: dict[str, list[float]] = {"llmtrain": [], "TRL": []}

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self.trainer.generation_s = 0.0
        self.decode.take()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.trl.append((time.perf_counter() - self.start, self.trainer.generation_s, self.decode.take()))
        lengths = self.trainer.completion_lengths
        assert set(lengths) == {self.new_tokens}, f"TRL completions of {sorted(set(lengths))} tokens"
        self.rewards["TRL"].append(self.trainer._metrics["train"]["reward"][-1])
        total, generation, decode, metrics = self.ours.step(state.global_step - 1)
        self.llmtrain.append((total, generation, decode))
        assert metrics["completion_length"] == self.new_tokens, metrics["completion_length"]
        self.rewards["llmtrain"].append(metrics["reward"])


def trl_trainer(folder: Path, dataset: datasets.Dataset, prompts: int, group: int, new_tokens: int, steps: int,
                callback: Alternate, output_dir: Path) -> TimedGRPOTrainer:
    config = trl.GRPOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=prompts * group,   # counts completions
        gradient_accumulation_steps=1, num_generations=group, max_completion_length=new_tokens,
        temperature=TEMPERATURE, top_p=1.0, top_k=0, beta=KL_COEF, epsilon=CLIP_EPS, loss_type="grpo",
        scale_rewards="group", num_iterations=1, use_vllm=False, learning_rate=LR, adam_beta2=BETAS[1],
        weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant", max_steps=steps, eval_strategy="no",
        report_to=[], logging_steps=10**6, save_strategy="no", use_cpu=True, dataloader_num_workers=0, bf16=False,
        fp16=False, gradient_checkpointing=False, shuffle_dataset=False, log_completions=False, disable_tqdm=True,
        seed=0)
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[trl_digits], args=config, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[callback])
    trainer.remove_callback(transformers.PrinterCallback)   # the end-of-training metrics line
    # EOS = an id past the vocabulary, as llmtrain's NoStopTokenizer: `generate` samples every row to
    # max_new_tokens (it would stop a row at a sampled <eos> and pad it) and TRL's completion mask cuts nowhere.
    for generation_config in (trainer.generation_config, trainer.model.generation_config):
        generation_config.eos_token_id = NO_TOKEN
    trainer.generation_kwargs["eos_token_id"] = NO_TOKEN
    trainer.eos_token_ids = [NO_TOKEN]
    callback.trainer = trainer
    callback.decode = trainer.model.generate = Stopwatch(trainer.model.generate)   # the model-only decode
    return trainer


def check_same_prompts(tokenizer, dataset: datasets.Dataset, batches: list[dict[str, Tensor]], prompts: int) -> None:
    """TRL's tokenization of the prompt column (`processing_class(text=...)`) gives llmtrain's prompt ids."""
    theirs = tokenizer(text=list(dataset["prompt"]))["input_ids"]
    ours = torch.cat([batch["input_ids"][:prompts] for batch in batches]).tolist()
    assert theirs == ours, "TRL tokenized the prompts differently from llmtrain's rows"


def logp_difference(ours: Ours, model: Transformer, trainer: TimedGRPOTrainer, batch: dict[str, Tensor]) -> float:
    """Largest |llmtrain - TRL| per-token log-prob of one rollout's completions (same weights, temperature)."""
    rollout = ours.strategy.rollouts.sample(model, batch, seed=12345)
    with torch.no_grad():
        ours_BN = completion_logps(model, rollout, TEMPERATURE)
        trainer.model.eval()
        theirs_BN, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, rollout["input_ids"], rollout["attention_mask"], rollout["completion_mask"].shape[1])
        trainer.model.train()
    return float((ours_BN - theirs_BN).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    onednn_option(parser)
    parser.add_argument("--share-prompt", choices=("on", "off"), default="on",
                        help="llmtrain computes each group's prompt once (strategy.share_prompt)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--completions", type=int, default=4, help="completions per prompt (the group)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up + 1 step, 2 prompts, 8 tokens")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.prompts, args.new_tokens = 1, 1, 2, 8
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    os.environ["TQDM_DISABLE"] = "1"
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    total = args.warmup + args.steps
    size = dataclasses.replace(SIZES["tiny"], seq_len=args.prompt_len + args.new_tokens, batch_size=args.prompts)
    prompts = Prompts.random(total * args.prompts, args.prompt_len)
    batches = prompts.llmtrain_batches(args.prompts)
    dataset = prompts.trl_dataset()

    with tempfile.TemporaryDirectory() as tmp:
        folder = hf_io.export(build_ours("gqa", "tiny", size), ByteTokenizer(), Path(tmp) / "hf")
        model = build_ours("gqa", "tiny", size)                # seed 0: the same weights
        n_params = sum(p.numel() for p in model.parameters())
        ours = llmtrain_run(model, PromptBatches(batches), args.completions, args.new_tokens,
                            args.onednn_linear == "on", args.share_prompt == "on")
        callback = Alternate(ours, args.new_tokens)
        trainer = trl_trainer(folder, dataset, args.prompts, args.completions, args.new_tokens, total, callback,
                              Path(tmp) / "trl")
        check_same_prompts(trainer.processing_class, dataset, batches, args.prompts)
        logp_diff = logp_difference(ours, model, trainer, batches[0])
        ours.strategy.rollouts.sample.take()
        rollout_module.generate.take()
        trainer.train()

    def medians(steps: list[tuple[float, float, float]]) -> tuple[float, float, float, float]:
        kept = steps[args.warmup:]
        return (statistics.median(g for _, g, _ in kept), statistics.median(t - g for t, g, _ in kept),
                statistics.median(t for t, _, _ in kept), statistics.median(d for _, _, d in kept))

    o_gen, o_train, o_total, o_dec = medians(callback.llmtrain)
    t_gen, t_train, t_total, t_dec = medians(callback.trl)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"{args.threads} threads, {cpu_name()}; tiny GQA ({n_params / 1e6:.2f}M parameters, vocab 264, dim 128, "
          f"4 layers), fp32; {args.prompts} prompts x {args.completions} completions x {args.new_tokens} new tokens "
          f"per step ({args.prompt_len}-token prompts), kl coef {KL_COEF}, llmtrain linears {args.onednn_linear} "
          f"(oneDNN training {'on' if onednn_enabled() else 'off'} on this CPU), shared-prompt scoring "
          f"{args.share_prompt}; median of {args.steps} steps after {args.warmup} warm-up, llmtrain and TRL "
          f"alternating step by step")
    print("| implementation | generation s/step | training s/step | total s/step | speedup vs TRL (total) |")
    print("|---|---|---|---|---|")
    print(f"| llmtrain | {o_gen:.4f} | {o_train:.4f} | {o_total:.4f} | {t_total / o_total:.2f}x |")
    print(f"| TRL GRPOTrainer | {t_gen:.4f} | {t_train:.4f} | {t_total:.4f} | 1.00x |")
    print(f"| ratio TRL / llmtrain | {t_gen / o_gen:.2f}x | {t_train / o_train:.2f}x | "
          f"{t_total / o_total:.2f}x | |")
    print()
    print(f"- of the generation, the model's decode alone (llmtrain.generate.generate vs LlamaForCausalLM.generate): "
          f"llmtrain {o_dec:.4f} s, TRL {t_dec:.4f} s ({t_dec / o_dec:.2f}x)")
    print(f"- per-token log-probs of the same {args.prompts * args.completions} completions, largest "
          f"|llmtrain - TRL|: {logp_diff:.2e}")
    ours_reward, trl_reward = (statistics.fmean(callback.rewards[side]) for side in ("llmtrain", "TRL"))
    print(f"- every completion {args.new_tokens} tokens on both sides; mean reward (digits per completion) over all "
          f"steps: llmtrain {ours_reward:.4f}, TRL {trl_reward:.4f}")


if __name__ == "__main__":
    main()
