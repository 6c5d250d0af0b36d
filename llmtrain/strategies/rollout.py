"""GRPO rollouts (SPECS 4.4.1): sample G completions per prompt, score them, keep them for reuse.

A "prompts" batch from the data holds 2B right-padded rows: row i is prompt i (the chat template
up to the assistant marker) and row B + i its reference answer; `labels` equal the ids on every
real token and IGNORE_INDEX on padding, which is how the lengths are read back. A rollout turns
it into the batch the GRPO loss consumes, with B·G rows (the G copies of a prompt contiguous):

    input_ids       (BG, P + N)  left-padded prompt, then the completion (pad after its EOS)
    attention_mask  (BG, P + N)  0 on the prompt's left padding, 1 elsewhere (as in generation)
    completion_mask (BG, N)      1 up to and including the first EOS
    truncated       (BG,)        True for a completion without EOS (cut at max_new_tokens)
    rewards         (BG, K)      the raw reward of each of the K reward functions
    old_logp        (BG, N)      the sampled tokens' log-probs at generation time (reused batches only)
    thinking_latents (BG, N, D)  HRPO only (a model with a `thinking` module): what each completion
                                 token's input was blended with during sampling (float32, no grad)
    thinking_mask   (BG, N)      HRPO only: True where it was blended (before the answer marker)

Sampling uses llmtrain.generate (KV cache, temperature only: no top-k/top-p, so the loss's
log softmax(logits / temperature) is the sampling distribution, SPECS 7.1) in eval mode without
gradients, from a generator seeded with (seed, step, micro-batch position, rank), so a resumed run
draws the same completions.

With `num_iterations` = mu > 1 a rollout serves mu optimizer steps: a step with step % mu != 0
reuses the rollout of the same micro-batch position from the last generating step and ignores its
incoming batch (only every mu-th batch of prompts is used). Checkpoints keep the buffer (every
rank's, `state_dict`), so resume is exact from any step; a resumed step that finds no buffered
rollout (a checkpoint from another number of ranks) samples a fresh one from its own batch. The stored old_logp come from the cached
decode, which matches the training forward to ~1e-5 in fp32 (tested); under bf16 autocast the two
round differently, which adds a little noise to the ratios of the reused passes.

HRPO (SPECS 5.4): with a model built with `thinking`, sampling blends latents into the thinking
tokens' inputs (llmtrain.thinking_decode) and the rollout keeps them; `completion_logps` replays
them through the current gates (gradients reach the gates, Lambda and a projection, not the stored
vectors), while the reference scores `plain_tokens(batch)`, the same tokens without the blend.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from llmtrain.data.chat import IGNORE_INDEX
from llmtrain.data.tokenizer import decode_sampled
from llmtrain.generate import generate
from llmtrain.strategies.rewards import RewardFn, reward_name, wants_completion_ids
from llmtrain.thinking_decode import thinking_decoder

THINKING_KEYS = ("thinking_latents", "thinking_mask")


def split_prompts(batch: dict[str, Tensor]) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, answer ids) of a "prompts" batch, one list of token ids per example."""
    lengths = (batch["labels"] != IGNORE_INDEX).sum(-1).tolist()
    rows = [row[:n] for row, n in zip(batch["input_ids"].tolist(), lengths)]
    return rows[:len(rows) // 2], rows[len(rows) // 2:]


def completion_mask(tokens_BN: Tensor, eos_id: int) -> Tensor:
    """1 up to and including each row's first EOS, 0 after it; all 1 for a row without EOS."""
    is_eos_BN = tokens_BN == eos_id
    first_B1 = torch.where(is_eos_BN.any(-1), is_eos_BN.int().argmax(-1), tokens_BN.shape[1])[:, None]
    return (torch.arange(tokens_BN.shape[1], device=tokens_BN.device) <= first_B1).long()


def completion_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """A completion's text for the rewards: <pad>/<bos>/<eos> dropped, other special tokens by name.

    Ids past the tokenizer (a model whose embedding has padding rows, as many Hugging Face
    checkpoints do) have no text and are dropped, as transformers' decode drops them; sampling one
    must not end the run."""
    framing = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}
    return decode_sampled(tokenizer, [i for i in ids if i not in framing], skip_special=False)


def completion_logps(model: nn.Module, batch: dict[str, Tensor], temperature: float, group_size: int = 1) -> Tensor:
    """log softmax(logits / temperature) of each completion token, (BG, N), float32; an HRPO
    rollout's latents are blended in as during sampling. With `group_size` G > 1 (rows in groups of
    G that share their prompt, as a rollout lays them out) each group is scored as one row
    (`shared_prompt_logits`): the same log-probs, the prompt computed once instead of G times."""
    ids_BT, N = batch["input_ids"], batch["completion_mask"].shape[1]
    if group_size > 1 and N > 1 and len(ids_BT) % group_size == 0:
        logits_BNV = shared_prompt_logits(model, batch, group_size)
    else:
        # Pads after a completion's EOS are padding too, for an MoE model's balance loss (SPECS 3.4).
        real_BT = torch.cat([batch["attention_mask"][:, :-N], batch["completion_mask"].to(batch["attention_mask"].dtype)], 1)
        logits_BNV = model(ids_BT[:, :-1], attention_mask_BT=batch["attention_mask"][:, :-1],
                           token_mask_BT=real_BT[:, :-1], **replayed_latents(batch))[:, -N:]
    logp_BNV = (logits_BNV.float() / temperature).log_softmax(-1)
    return logp_BNV.gather(-1, ids_BT[:, -N:, None]).squeeze(-1)


def shared_prompt_logits(model: nn.Module, batch: dict[str, Tensor], group_size: int) -> Tensor:
    """The logits that predict each completion token, (BG, N, V), each group's prompt computed once.

    The rows of a group must hold the same prompt (the rollout repeats it; group filtering keeps or
    drops whole groups). Each group's prompt runs once into a KV cache, under autograd like any
    forward; the cache's rows are then copied G times (`repeat_rows_`, differentiable) and the G
    completions' inputs (c[:-1]: the last token predicts nothing) run after it. A completion token
    thus attends to its prompt's real tokens and causally to its own completion, at the position it
    has in its own row, so every logit is the one-row-per-completion layout's (tested, with left
    padding and HRPO latents). Token 0 of every completion is predicted by the last prompt token,
    whose logits the G completions share.

    Against one row per completion this computes G - 1 prompts fewer in every matmul, and against one
    row holding the prompt and all G completions behind a block mask (this function's first form) it
    computes P^2 + G (N - 1) (P + N - 1) attention scores per group instead of (P + G (N - 1))^2, and
    needs no mask beyond the causal offset. The tiny model's GRPO training step (2 CPU threads, 8
    prompts of 32 tokens, alternating A/B): 113 against 114 ms with 4 completions of 32 tokens (the
    benchmark's; two forwards' overhead eats the saving), 580 against 952 ms with 8 of 96.
    """
    ids_BT, mask_BT, N = batch["input_ids"], batch["attention_mask"], batch["completion_mask"].shape[1]
    G, device, P = group_size, ids_BT.device, ids_BT.shape[1] - N
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    cache = model.new_cache(len(ids_BT) // G, P + N - 1, dtype=dtype, device=device)
    last_GV = model(ids_BT[::G, :P], attention_mask_BT=mask_BT[::G, :P], cache=cache)[:, -1]
    cache.repeat_rows_(G)
    latents = {}
    if "thinking_latents" in batch:
        latents = {"latents_BTD": batch["thinking_latents"][:, :-1], "thinking_BT": batch["thinking_mask"][:, :-1]}
    logits_BCV = model(ids_BT[:, P:-1], cache=cache, token_mask_BT=batch["completion_mask"][:, :-1], **latents)
    return torch.cat([last_GV.repeat_interleave(G, 0)[:, None], logits_BCV], 1)


def replayed_latents(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The forward's `latents_BTD`/`thinking_BT` for the inputs `input_ids[:, :-1]` of an HRPO rollout
    (prompt positions zero and not blended; the last completion token is no input), else {}."""
    if "thinking_latents" not in batch:
        return {}
    latents_BND, thinking_BN = batch["thinking_latents"], batch["thinking_mask"]
    P = batch["input_ids"].shape[1] - latents_BND.shape[1]
    return {"latents_BTD": torch.cat([latents_BND.new_zeros(len(latents_BND), P, latents_BND.shape[2]),
                                      latents_BND[:, :-1]], 1),
            "thinking_BT": torch.cat([thinking_BN.new_zeros(len(thinking_BN), P), thinking_BN[:, :-1]], 1)}


def plain_tokens(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch without HRPO's latents: its tokens scored as plain embeddings (the reference's view)."""
    return {k: v for k, v in batch.items() if k not in THINKING_KEYS}


def stream_seed(seed: int, step: int | None, position: int) -> int:
    """A sampling seed for (run seed, step or None for evaluation, micro-batch position, rank)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return zlib.crc32(f"{seed}/{'eval' if step is None else step}/{position}/{rank}".encode())


class Rollouts:
    """Samples, scores and (for num_iterations > 1) buffers the completions of each micro-batch.

    Args:
        rewards: reward functions (llmtrain.strategies.rewards), in the column order of `rewards`.
        group_size: G completions per prompt.
        max_new_tokens, temperature: sampling settings.
        num_iterations: optimizer steps served by one rollout (mu).
        seed: base of the per-(step, position) sampling seeds.
    """

    def __init__(self, rewards: Sequence[RewardFn], group_size: int, max_new_tokens: int, temperature: float,
                 num_iterations: int, seed: int) -> None:
        self.rewards, self.group_size = list(rewards), group_size
        self.wants_ids = [wants_completion_ids(fn) for fn in self.rewards]   # read once, not per call
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.num_iterations, self.seed = num_iterations, seed
        self.tokenizer: Any = None
        self.buffer: dict[int, dict[str, Tensor]] = {}
        self.key: object = object()          # the step of the last call; a new step restarts the positions
        self.position = 0
        self.last_texts: list[dict[str, object]] = []   # the last rollout's texts and rewards, one row per completion
        self.eval_texts: list[dict[str, object]] = []   # those of the last evaluation's rollouts

    def state_dict(self) -> dict[str, Tensor]:
        """The buffered rollouts as buffer/<rank>/<position>/<key>, every rank's (gathered: every rank calls this)."""
        buffers = [{p: {k: v.cpu() for k, v in r.items()} for p, r in self.buffer.items()}]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            local, buffers = buffers[0], [None] * dist.get_world_size()
            dist.all_gather_object(buffers, local)
        return {f"buffer/{rank}/{position}/{key}": value.contiguous()
                for rank, buffer in enumerate(buffers) for position, rollout in buffer.items()
                for key, value in rollout.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """This rank's buffered rollouts from `state_dict`'s tensors (the others' are left alone)."""
        rank = str(dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)
        self.buffer = {}
        for name, value in state.items():
            _, owner, position, key = name.split("/", 3)
            if owner == rank:
                self.buffer.setdefault(int(position), {})[key] = value

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], step: int | None) -> dict[str, Tensor]:
        """The rollout for this micro-batch: fresh, or the buffered one on a reuse step."""
        self.position = self.position + 1 if step == self.key else 0
        self.key = step
        if step is not None and step % self.num_iterations != 0 and self.position in self.buffer:
            rollout, device = self.buffer[self.position], batch["input_ids"].device
            if any(v.device != device for v in rollout.values()):   # restored from a checkpoint: on the CPU
                rollout = self.buffer[self.position] = {k: v.to(device) for k, v in rollout.items()}
            return rollout
        fresh = self.sample(model, batch, stream_seed(self.seed, step, self.position))
        if step is None:                     # evaluation: keep its texts for samples.jsonl
            if self.position == 0:
                self.eval_texts.clear()
            self.eval_texts.extend(self.last_texts)
        if step is not None and self.num_iterations > 1:
            if self.position == 0:
                self.buffer.clear()
            self.buffer[self.position] = fresh
        # a fresh rollout is scored by the weights that sampled it: its ratio is 1 (old_logp = logp.detach())
        return {k: v for k, v in fresh.items() if k != "old_logp"}

    def sample(self, model: nn.Module, batch: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
        """G completions per prompt of `batch`, with their masks, sampling log-probs and rewards."""
        prompts, answers = split_prompts(batch)
        model = getattr(model, "module", model)        # a DDP wrapper has no KV cache; sampling needs no sync
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = generate(model, prompts, self.max_new_tokens, self.tokenizer.eos_id, self.tokenizer.pad_id,
                               temperature=self.temperature, seed=seed, return_logprobs=True,
                               thinking=thinking_decoder(model, self.tokenizer),
                               num_samples=self.group_size)                # groups contiguous
        finally:
            model.train(was_training)
        mask_BN = completion_mask(out.tokens_BN, self.tokenizer.eos_id)
        completion_ids = [row[:n] for row, n in zip(out.tokens_BN.tolist(), mask_BN.sum(-1).tolist())]  # EOS kept
        completions = [completion_text(self.tokenizer, ids) for ids in completion_ids]
        rollout = {"input_ids": torch.cat([out.prompt_ids_BP, out.tokens_BN], 1),
                   "attention_mask": torch.cat([out.prompt_mask_BP, torch.ones_like(out.tokens_BN)], 1),
                   "completion_mask": mask_BN, "truncated": ~(out.tokens_BN == self.tokenizer.eos_id).any(-1),
                   "old_logp": out.logprobs_BN * mask_BN,
                   "rewards": self.score(prompts, answers, completions, completion_ids).to(mask_BN.device)}
        if out.latents_BND is not None:
            rollout |= {"thinking_latents": out.latents_BND, "thinking_mask": out.thinking_BN & mask_BN.bool()}
        return rollout

    def score(self, prompts: list[list[int]], answers: list[list[int]], completions: list[str],
              completion_ids: list[list[int]]) -> Tensor:
        """(BG, K) raw rewards: each function called once on every completion of the rollout, with the
        completions' token ids too if it takes them (llmtrain.strategies.rewards)."""
        G = self.group_size
        prompt_texts = [self.tokenizer.decode(p) for p in prompts for _ in range(G)]
        answer_texts = [self.tokenizer.decode(a) for a in answers for _ in range(G)]
        columns = []
        for fn, wants_ids in zip(self.rewards, self.wants_ids):
            ids = {"completion_ids": completion_ids} if wants_ids else {}
            values = [float(v) for v in fn(prompt_texts, completions, answer_texts, **ids)]
            if len(values) != len(completions):
                raise ValueError(f"reward function {fn!r} returned {len(values)} values for {len(completions)} "
                                 "completions")
            columns.append(torch.tensor(values, dtype=torch.float32))
        rewards_BK = torch.stack(columns, -1)
        names = [reward_name(fn) for fn in self.rewards]
        self.last_texts = [{"prompt": p, "completion": c, "answer": a, "rewards": dict(zip(names, r))}
                           for p, c, a, r in zip(prompt_texts, completions, answer_texts, rewards_BK.tolist())]
        return rewards_BK
