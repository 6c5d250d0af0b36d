"""DPO training throughput (preference pairs/s) of llmtrain vs TRL's `DPOTrainer` on CPU, fp32.

Same tiny GQA model on both sides (the training benchmark's tiny preset: vocab 264 byte tokenizer,
dim 128, 4 layers, 4 heads, 2 kv heads), built once by `train_throughput.build_ours` and exported
with `llmtrain.hf.io.export` to a Hugging Face folder that `LlamaForCausalLM.from_pretrained` loads
(SDPA attention), so both start from identical weights. Same pairs: 8 per batch, each a 64-token
prompt (<bos>, then 63 bytes) and a 64-token chosen and rejected completion (rows of 128 tokens),
random printable ASCII bytes, so that every character is one token of the byte tokenizer: TRL 1.x only takes text
columns (`prompt`/`chosen`/`rejected`), which it tokenizes with the tokenizer files
`llmtrain.hf.tokenizer.write_tokenizer_files` writes (whose post-processor puts <bos> first, as
llmtrain trains); it appends <eos> to each completion and
`max_length=128` cuts it off again, so TRL trains on exactly our token ids (checked at start).
DPO sigmoid loss, beta 0.1, the same learning rate, no weight decay, gradient clipping at 1.0,
gradient accumulation 1, fp32, no evaluation, no logging or checkpointing during the timed steps.

llmtrain: the real loop, `Trainer.train_step` with `strategies.dpo.DPO(beta=0.1)`, llmtrain's
AdamW and the GradClip callback; batches are prebuilt tensors in the strategy's layout (chosen
rows first, then rejected rows; labels -100 on the prompt). TRL: `DPOTrainer.train()` (default
fused LM head, which also computes entropy / mean-logit / top-1 metrics, and TRL's default
optimizer; gradient checkpointing, which `DPOConfig` turns on by default, is turned off, as
llmtrain does not checkpoint). A TRL step is timed by a `TrainerCallback` from `on_step_begin` to
`on_step_end`: forward(s), loss, backward, clipping, optimizer and scheduler step, zero_grad and
TRL's metric bookkeeping, but not the tokenization and Trainer setup before training, nor the
collation of the batch, which the HF loop does before `on_step_begin` (llmtrain's batches are
prebuilt tensors too). The two alternate step by step: the same callback runs one llmtrain step
right after each TRL step (outside TRL's timed window), so background load hits both alike.
`--warmup` steps each are discarded, then the median of `--steps`.

Two modes, each llmtrain vs TRL: "online reference" (the frozen reference scores each batch in a
second no-grad forward every step) and "precomputed reference" (llmtrain
`DPO(precompute_reference=True)`, which scores every pair once in `strategy.setup` through the
data's `add_column`; TRL `precompute_ref_log_probs=True`, which does the same in `__init__`). The
one-off precompute pass is not in the step times; it has its own rows (seconds per batch of pairs).
Sanity checks printed under the table: the step-0 loss of every run (ln 2 = 0.6931, since policy ==
reference) and the largest difference between llmtrain's and TRL's precomputed reference log-probs.

    python benchmarks/dpo_throughput.py                       # 3 warm-up + 20 timed steps, 2 threads
    python benchmarks/dpo_throughput.py --steps 10 --threads 1
"""

import argparse
import dataclasses
import math
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
    raise SystemExit(f"benchmarks/dpo_throughput.py runs TRL's DPOTrainer beside llmtrain and needs it "
                     f"({error.name} is missing): pip install -e '.[bench]'") from None

from llmtrain.callbacks.grad_clip import GradClip
from llmtrain.data.tokenizer import BYTE_OFFSET, ByteTokenizer
from llmtrain.hardware import Hardware
from llmtrain.hf import io as hf_io
from llmtrain.models.transformer import Transformer
from llmtrain.optim import adamw
from llmtrain.schedulers import constant
from llmtrain.strategies.dpo import DPO
from llmtrain.strategies.seq import IGNORE_INDEX
from llmtrain.trainer import Trainer
from train_throughput import SIZES, ListData, build_ours, cpu_name, onednn_option   # same folder: tiny GQA model

LR = 1e-6           # TRL's default DPO learning rate; used on both sides
BETA = 0.1
# Printable ASCII: one UTF-8 byte, so one token, per character; "<" left out so that no special-token
# name ("<eos>", ...) can appear in the text that TRL tokenizes.
CHARS = torch.tensor([b for b in range(32, 127) if b != ord("<")])


@dataclasses.dataclass
class Pairs:
    """Preference pairs as byte values: prompt (N, P), chosen (N, C), rejected (N, C)."""

    prompt: Tensor
    chosen: Tensor
    rejected: Tensor

    @classmethod
    def random(cls, n: int, prompt_len: int, completion_len: int, seed: int = 0) -> "Pairs":
        generator = torch.Generator().manual_seed(seed)

        def draw(length: int) -> Tensor:
            return CHARS[torch.randint(len(CHARS), (n, length), generator=generator)]

        return cls(draw(prompt_len - 1), draw(completion_len), draw(completion_len))   # prompts: after <bos>

    def llmtrain_batches(self, batch: int) -> list[dict[str, Tensor]]:
        """DPO's layout: input_ids (2B, P+C), chosen rows then rejected rows; labels -100 on the prompt."""
        out = []
        for start in range(0, len(self.prompt), batch):
            rows = slice(start, start + batch)
            prompt = self.prompt[rows]
            bos = torch.full_like(prompt[:, :1], ByteTokenizer.bos_id - BYTE_OFFSET)     # <bos> first, as TRL's tokenizer
            ids = BYTE_OFFSET + torch.cat([torch.cat([bos, prompt, self.chosen[rows]], 1),
                                           torch.cat([bos, prompt, self.rejected[rows]], 1)])
            labels = ids.clone()
            labels[:, :1 + prompt.shape[1]] = IGNORE_INDEX
            out.append({"input_ids": ids, "labels": labels})
        return out

    def trl_dataset(self) -> datasets.Dataset:
        def text(rows: Tensor) -> list[str]:
            return [bytes(row.tolist()).decode("ascii") for row in rows]

        return datasets.Dataset.from_dict({"prompt": text(self.prompt), "chosen": text(self.chosen),
                                           "rejected": text(self.rejected)})


class PreferenceBatches(ListData):
    """The data interface Trainer and FrozenReference need, over prebuilt batches (cf. tests' RowData)."""

    def __init__(self, batches: list[dict[str, Tensor]]) -> None:
        super().__init__([dict(batch) for batch in batches])    # own dicts: add_column must not leak across runs

    def add_column(self, name: str, fn: Callable[[dict[str, Tensor]], Tensor]) -> None:
        """What DPO(precompute_reference=True) calls in setup: one (2B,) tensor per batch."""
        for batch in self.batches:
            batch[name] = fn(batch)


@dataclasses.dataclass
class Ours:
    step: Callable[[int], dict[str, float]]     # batch index -> train_step metrics
    precompute_s: float                         # strategy.setup (the reference pass when precomputing)
    data: PreferenceBatches


def llmtrain_run(model: Transformer, batches: list[dict[str, Tensor]], precompute: bool,
                 onednn_linear: bool) -> Ours:
    """llmtrain's real DPO step: Trainer.train_step with DPO(beta=0.1), llmtrain's AdamW, GradClip."""
    strategy = DPO(beta=BETA, precompute_reference=precompute)
    data = PreferenceBatches(batches)
    start = time.perf_counter()
    strategy.setup(model, data)                 # freezes a copy of the policy (and scores every pair)
    precompute_s = time.perf_counter() - start
    trainer = Trainer(model=model, strategy=strategy, data=data,
                      optimizer=adamw(model.named_parameters(), lr=LR, weight_decay=0.0), scheduler=constant,
                      hardware=Hardware(device="cpu", precision="fp32", onednn_linear=onednn_linear),
                      callbacks=[GradClip(max_norm=1.0)],
                      max_steps=10**9)
    model.train()

    def step(i: int) -> dict[str, float]:
        return trainer.train_step([data.batches[i]])

    return Ours(step, precompute_s, data)


class TimedDPOTrainer(trl.DPOTrainer):
    """DPOTrainer that records how long its reference precompute pass takes (run inside __init__)."""

    precompute_s = 0.0

    def _precompute_ref_logps(self, *args, **kwargs):
        start = time.perf_counter()
        out = super()._precompute_ref_logps(*args, **kwargs)
        self.precompute_s += time.perf_counter() - start
        return out


class Alternate(transformers.TrainerCallback):
    """Times each TRL step (on_step_begin -> on_step_end), then runs one llmtrain step after it."""

    def __init__(self, ours: Ours) -> None:
        self.ours = ours
        self.trainer: trl.DPOTrainer | None = None
        self.trl_s: list[float] = []
        self.ours_s: list[float] = []
        self.trl_first_loss = self.ours_first_loss = math.nan

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.trl_s.append(time.perf_counter() - self.start)
        if state.global_step == 1:      # logging is off: the step's loss is still the whole running sum
            self.trl_first_loss = float(getattr(self.trainer, "_tr_loss", math.nan))
        start = time.perf_counter()
        metrics = self.ours.step(state.global_step - 1)
        self.ours_s.append(time.perf_counter() - start)
        if state.global_step == 1:
            self.ours_first_loss = metrics["loss"]


def trl_trainer(folder: Path, dataset: datasets.Dataset, batch: int, max_length: int, steps: int, precompute: bool,
                callback: Alternate, output_dir: Path) -> TimedDPOTrainer:
    config = trl.DPOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=batch, max_length=max_length, beta=BETA,
        loss_type=["sigmoid"], learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant",
        gradient_accumulation_steps=1, max_steps=steps, eval_strategy="no", report_to=[], logging_steps=10**6,
        save_strategy="no", use_cpu=True, dataloader_num_workers=0, bf16=False, fp16=False,
        gradient_checkpointing=False, precompute_ref_log_probs=precompute, disable_tqdm=True, seed=0)
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    trainer = TimedDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[callback])
    trainer.remove_callback(transformers.PrinterCallback)   # the end-of-training metrics line
    callback.trainer = trainer
    return trainer


def check_same_tokens(trainer: trl.DPOTrainer, batches: list[dict[str, Tensor]], batch: int, max_length: int) -> None:
    """TRL's tokenized rows, cut to max_length as its collator does, equal llmtrain's input_ids."""
    dataset = trainer.train_dataset
    for i in (0, len(dataset) - 1):
        example = dataset[i]
        ids_2T = batches[i // batch]["input_ids"]
        row = i % batch
        for ids, completion in ((ids_2T[row], example["chosen_ids"]), (ids_2T[batch + row], example["rejected_ids"])):
            theirs = (example["prompt_ids"] + completion)[:max_length]
            assert theirs == ids.tolist(), f"TRL tokenized pair {i} differently from llmtrain's rows"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per implementation and mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    onednn_option(parser)
    parser.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    os.environ["TQDM_DISABLE"] = "1"                       # TRL's precompute progress bar
    warnings.filterwarnings("ignore", category=FutureWarning)

    total = args.warmup + args.steps
    max_length = args.prompt_len + args.completion_len
    size = dataclasses.replace(SIZES["tiny"], seq_len=max_length, batch_size=args.batch)
    pairs = Pairs.random(total * args.batch, args.prompt_len, args.completion_len)
    batches = pairs.llmtrain_batches(args.batch)
    dataset = pairs.trl_dataset()

    rows, checks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = hf_io.export(build_ours("gqa", "tiny", size), ByteTokenizer(), Path(tmp) / "hf")
        for mode, precompute in (("online reference", False), ("precomputed reference", True)):
            ours = llmtrain_run(build_ours("gqa", "tiny", size), batches, precompute,   # seed 0: same weights
                                args.onednn_linear == "on")
            callback = Alternate(ours)
            trainer = trl_trainer(folder, dataset, args.batch, max_length, total, precompute, callback,
                                  Path(tmp) / f"trl-{precompute}")
            check_same_tokens(trainer, batches, args.batch, max_length)
            trainer.train()
            ours_s, trl_s = (statistics.median(t[args.warmup:]) for t in (callback.ours_s, callback.trl_s))
            rows += [f"| llmtrain | {mode} | {ours_s:.4f} | {args.batch / ours_s:,.1f} | {trl_s / ours_s:.2f}x |",
                     f"| TRL DPOTrainer | {mode} | {trl_s:.4f} | {args.batch / trl_s:,.1f} | 1.00x |"]
            checks.append(f"{mode}: step-0 loss llmtrain {callback.ours_first_loss:.4f}, "
                          f"TRL {callback.trl_first_loss:.4f} (ln 2 = {math.log(2):.4f})")
            if precompute:
                n = len(batches)
                ours_b, trl_b = ours.precompute_s / n, trainer.precompute_s / n
                label = f"one-off reference precompute pass over {n * args.batch} pairs (not in the step rows)"
                rows += [f"| llmtrain | {label} | {ours_b:.4f} | {args.batch / ours_b:,.1f} | {trl_b / ours_b:.2f}x |",
                         f"| TRL DPOTrainer | {label} | {trl_b:.4f} | {args.batch / trl_b:,.1f} | 1.00x |"]
                ours_ref = torch.cat([b["ref_logps"].view(2, -1) for b in ours.data.batches], 1)
                trl_ref = torch.tensor([trainer.train_dataset["ref_chosen_logps"],
                                        trainer.train_dataset["ref_rejected_logps"]])
                checks.append(f"precomputed reference log-probs (sums over {args.completion_len} tokens, "
                              f"{ours_ref.numel()} rows, mean {ours_ref.mean():.2f}): largest |llmtrain - TRL| "
                              f"{(ours_ref - trl_ref).abs().max():.2e}")

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"{args.threads} threads, {cpu_name()}; tiny GQA, fp32; {args.batch} pairs x ({args.prompt_len} prompt + "
          f"{args.completion_len} completion tokens) per step; median of {args.steps} steps after {args.warmup} "
          f"warm-up, llmtrain and TRL alternating step by step")
    print("| implementation | mode | median s/step | pairs/s | ratio vs TRL |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("\n".join(f"- {line}" for line in checks))


if __name__ == "__main__":
    main()
