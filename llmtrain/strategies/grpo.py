"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300; SPECS 4.4).

For each prompt, G completions are sampled and scored (llmtrain.strategies.rollout); each
completion's advantage is its summed reward centred on its group's mean and scaled as
`scale_rewards` says (SPECS 4.4.1; unbiased stds, TRL's option of that name):

    A_i = (r_i - mean_g r) / (std_g r + 1e-4)      "group" (DeepSeekMath; the default)
    A_i = (r_i - mean_g r) / (std_W r + 1e-4)      "batch": the std of every completion sampled in the
                                                   window (the generation batch), over all ranks
    A_i =  r_i - mean_g r                          "none" (Dr. GRPO, llmtrain.strategies.dr_grpo)

The batch std needs the whole window, which one micro-batch's loss does not see: `prepare_window`
all-reduces the count, sum and sum of squares of the window's rewards once and hands each batch the
std as `batch_reward_std` (in new dicts: a buffered rollout, and so a checkpoint, never holds it;
it is recomputed from the same rewards when the rollout is reused). Per completion token, with
ratio = exp(logp - old_logp) and log-probs of softmax(logits / temperature):

    per_token = -min(ratio A, clip(ratio, 1 - clip_eps, 1 + clip_eps_high) A) + kl_coef k3
    k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1       (>= 0; KL(policy || reference) estimator)

GRPO averages the tokens of each completion, then the completions of the window (each micro-batch
divides its sum of per-completion means by the window's completion count). A fresh rollout's
old_logp is logp.detach() (ratio 1 in value); a reused one (num_iterations > 1) uses the
log-probs stored at generation time. Variants whose math differs subclass one piece: DAPO
(llmtrain.strategies.dapo) the aggregation, DrGRPO (llmtrain.strategies.dr_grpo) the aggregation
(with scale_rewards="none" by default). The reference is a frozen copy of the starting policy
(none when kl_coef = 0), moved to the policy's weights at every step that is a positive multiple
of `sync_interval`: θ_ref <- α θ + (1 - α) θ_ref with α = `sync_alpha` (1, a hard copy, by default,
as in DeepSeekMath's iterative GRPO; TRL's TR-DPO-style `ref_model_mixup_alpha` defaults to 0.6).
After its first sync it is no longer the starting policy, so checkpoints from then on also hold it
(strategy.safetensors, with the rollouts buffered for num_iterations > 1): resume is exact from any
step.

GSPO (Zheng et al. 2025, arXiv:2507.18071; `importance_sampling_level="sequence"`, TRL's option of
that name) clips one ratio per completion, the exponential of its mean token log-ratio,
s_i = exp(mean_t (logp - old_logp)), in place of the per-token ratios; every token of the completion
then carries s_i (the GSPO paper clips it far tighter: clip_eps 3e-4, clip_eps_high 4e-4). In value
the two levels agree while the ratio is 1 (a fresh rollout); they differ once a reused rollout
(num_iterations > 1) has moved the policy.

Dynamic sampling (DAPO, `filter_groups=True`): a group whose G rewards are all equal has zero
advantage everywhere, so it adds only the KL term and dilutes the mean. With the option on, each
training rollout keeps only the groups whose weighted reward varies before the loss (evaluation
keeps all); there is no refill, so the loss batch shrinks and the data's batch size is the
oversampling knob (a micro-batch in which no group varies keeps its first group, whose only
gradient is the KL's). The reward, length and truncation metrics still describe every sampled
completion (`kl` and `clip_ratio` the tokens the loss saw); `kept_groups` is the fraction of
groups the loss saw.

Overlong filtering (DAPO, `mask_truncated_completions=True`; TRL's option of that name): a
completion that reached `max_new_tokens` without EOS was cut, so its tokens carry no verdict on a
finished answer; with the option on, its whole mask is zeroed in the loss (and in DAPO's token
count), while the reward, length and truncation metrics still describe it (`kl` and `clip_ratio`
count the tokens the loss saw, as TRL's do). `truncated` logs the share of such completions.

Metrics: `reward` (mean weighted summed reward), `reward_std` (mean over groups of the within-
group std of that reward: 0 means no group carried a learning signal), `frac_reward_zero_std` (the
share of groups whose G rewards are all equal, hence zero advantage), `rewards/<name>` (mean raw
reward of each function), `kept_groups` (only with filter_groups), `kl` (token-weighted masked
mean of k3 over the loss's tokens, only when kl_coef > 0), `completion_length` (mean completion
tokens, EOS included), `clip_ratio` (fraction of the loss's tokens whose clipped term is active:
ratio < 1 - clip_eps with A < 0, or > 1 + clip_eps_high with A > 0), `truncated` (share of
completions without EOS).

`share_prompt` (on by default) computes each group's prompt once, into a KV cache that the G
completions then attend to, each also to itself only (llmtrain.strategies.rollout.
shared_prompt_logits): the policy's and the reference's log-probs are those of one row per
completion, with G - 1 prompts fewer in every matmul. An MoE model's balance loss (SPECS 3.2) then
counts each prompt token once, as it is computed: with seq_aux the prompt forward's rows and the
completions' rows are balance groups of their own, where share_prompt=false makes each completion's
row, prompt included, one group; so the aux loss (not the log-probs) differs between the two.

HRPO (SPECS 5) is this strategy with a model built with a thinking module (model/thinking=hrpo):
the rollout blends latents into the thinking tokens' inputs and keeps them, the policy's forward
replays them through the current gates, the reference scores plain tokens, and the metric
`thinking_fraction` is the share of completion tokens that were blended.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from llmtrain.strategies.base import Strategy
from llmtrain.strategies.dpo import FrozenReference
from llmtrain.strategies.rewards import RewardFn, reward_name
from llmtrain.strategies.rollout import Rollouts, completion_logps, plain_tokens


SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards_BG: Tensor, eps: float = 1e-4) -> Tensor:
    """(r - group mean) / (unbiased group std + eps), shape (B, G); 0 for a group of equal rewards."""
    return (rewards_BG - rewards_BG.mean(-1, keepdim=True)) / (rewards_BG.std(-1, keepdim=True) + eps)


def clipped_objective(logp_BN: Tensor, old_logp_BN: Tensor, advantages_B: Tensor, clip_low: float,
                      clip_high: float, sequence_mask_BN: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-token -min(ratio A, clip(ratio) A) and where the clipped term is the active one (SPECS 4.4.2).

    With `sequence_mask_BN` (GSPO) the ratio is one per row, exp of the masked mean of the token
    log-ratios, broadcast to the row's tokens; the two outputs are then (B, 1)."""
    log_ratio_BN, A_B1 = logp_BN - old_logp_BN, advantages_B[:, None]
    if sequence_mask_BN is not None:
        log_ratio_BN = ((log_ratio_BN * sequence_mask_BN).sum(-1, keepdim=True)
                        / sequence_mask_BN.sum(-1, keepdim=True).clamp(min=1))
    ratio_BN = torch.exp(log_ratio_BN)
    loss_BN = -torch.min(ratio_BN * A_B1, ratio_BN.clamp(1 - clip_low, 1 + clip_high) * A_B1)
    clipped_BN = ((ratio_BN < 1 - clip_low) & (A_B1 < 0)) | ((ratio_BN > 1 + clip_high) & (A_B1 > 0))
    return loss_BN, clipped_BN


def k3(logp_BN: Tensor, ref_logp_BN: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token: exp(d) - d - 1, d = ref - policy."""
    d_BN = ref_logp_BN - logp_BN
    return torch.exp(d_BN) - d_BN - 1


class GRPO(Strategy):
    """Group-relative clipped policy gradient on sampled completions; see the module docstring.

    Args:
        rewards: reward callables `fn(prompts, completions, answers[, completion_ids]) -> list[float]`
            (strategies/rewards.py).
        reward_weights: one weight per reward function (None: all 1); the reward is the weighted sum.
        scale_rewards: what divides the group-centred reward: "group" (its group's std), "batch" (the
            std of the window's rewards over all ranks) or "none" (Dr. GRPO); see the module docstring.
        group_size: G completions per prompt, >= 2 (the group std needs two).
        max_new_tokens, temperature: sampling settings (temperature also divides the loss's logits).
        clip_eps, clip_eps_high: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high] (None: clip_eps).
        kl_coef: weight of the k3 KL to the reference; 0 builds no reference.
        sync_interval: steps between syncs policy -> reference (None: never).
        sync_alpha: weight of the policy in each sync, in (0, 1]; 1 = a hard copy.
        num_iterations: optimizer steps per rollout (mu); see llmtrain.strategies.rollout.
        filter_groups: DAPO's dynamic sampling without refill: train only on groups whose reward varies.
        mask_truncated_completions: DAPO's overlong filtering: completions without EOS take no part in
            the loss.
        importance_sampling_level: "token" (GRPO) or "sequence" (GSPO: one clipped ratio per completion).
        share_prompt: compute each group's prompt once (rollout.shared_prompt_logits; the same
            log-probs, fewer tokens in every matmul).
        seed: base of the sampling seeds.
    """

    format = "prompts"

    def __init__(self, rewards: Sequence[RewardFn], *, reward_weights: Sequence[float] | None = None,
                 scale_rewards: str = "group", group_size: int = 4, max_new_tokens: int = 16,
                 temperature: float = 1.0, clip_eps: float = 0.2, clip_eps_high: float | None = None,
                 kl_coef: float = 0.01, sync_interval: int | None = 200, sync_alpha: float = 1.0,
                 num_iterations: int = 1, filter_groups: bool = False, mask_truncated_completions: bool = False,
                 importance_sampling_level: str = "token", share_prompt: bool = True, seed: int = 0) -> None:
        clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
        self.names = [reward_name(fn) for fn in rewards]
        weights = [1.0] * len(self.names) if reward_weights is None else [float(w) for w in reward_weights]
        _validate(self.names, weights, group_size, max_new_tokens, temperature, clip_eps, clip_eps_high, kl_coef,
                  sync_interval, sync_alpha, num_iterations)
        if importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"strategy.importance_sampling_level={importance_sampling_level!r} must be "
                             "'token' (GRPO) or 'sequence' (GSPO)")
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"strategy.scale_rewards={scale_rewards!r} must be 'group' (each group's std), "
                             "'batch' (the std of the whole generation batch) or 'none' (Dr. GRPO: no scaling)")
        self.sequence_level, self.scale_rewards = importance_sampling_level == "sequence", scale_rewards
        self.weights_K, self.group_size, self.max_new_tokens = torch.tensor(weights), group_size, max_new_tokens
        self.temperature, self.clip_low, self.clip_high = temperature, clip_eps, clip_eps_high
        self.kl_coef, self.sync_interval, self.filter_groups = kl_coef, sync_interval, filter_groups
        self.sync_alpha = sync_alpha
        self.mask_truncated = mask_truncated_completions
        self.scored_group = group_size if share_prompt else 1        # rows per forward row in completion_logps
        self.rollouts = Rollouts(rewards, group_size, max_new_tokens, temperature, num_iterations, seed)
        self.reference = FrozenReference(share_prompt=False) if kl_coef > 0 else None
        self.synced_at: int | None = None        # the step of the reference's last sync (None: the start)

    def setup(self, model: nn.Module, data: object) -> None:
        self.rollouts.tokenizer = data.tokenizer
        if self.reference is not None:
            self.reference.setup(model, data)

    def frozen_models(self) -> list[nn.Module]:
        return [] if self.reference is None else self.reference.models()

    def prepare(self, model: nn.Module, batch: dict[str, Tensor], step: int | None) -> dict[str, Tensor]:
        rollout = self.rollouts(model, batch, step)
        if self.reference is not None and self.rollouts.position == 0 and step and self.sync_interval \
                and step % self.sync_interval == 0:
            self.reference.sync(model, self.sync_alpha)   # before the window's first loss: after `step` updates
            self.synced_at = step
        if self.filter_groups and step is not None:
            rollout = self.keep_varied_groups(rollout)
        return rollout

    def keep_varied_groups(self, rollout: dict[str, Tensor]) -> dict[str, Tensor]:
        """The rollout's rows of the groups whose weighted reward is not constant (at least the first
        group), plus `sampled_rewards`, `sampled_lengths` and `sampled_truncated`: the rewards, token
        counts and truncation of every sampled completion, for the metrics."""
        rewards_BG = (rollout["rewards"] @ self.weights_K.to(rollout["rewards"].device)).view(-1, self.group_size)
        varied_B = (rewards_BG != rewards_BG[:, :1]).any(-1)
        if not varied_B.any():
            varied_B[0] = True
        rows = varied_B.repeat_interleave(self.group_size)
        sampled = {"sampled_rewards": rollout["rewards"], "sampled_lengths": rollout["completion_mask"].sum(-1)}
        if "truncated" in rollout:
            sampled["sampled_truncated"] = rollout["truncated"]
        return {**{k: v[rows] for k, v in rollout.items()}, **sampled}

    def prepare_window(self, batches: list[dict[str, Tensor]],
                       all_reduce_sum: Callable[[Tensor], Tensor]) -> list[dict[str, Tensor]]:
        """With scale_rewards="batch", each batch plus `batch_reward_std` (0-d): the unbiased std of the
        weighted rewards of every completion sampled in the window on every rank (filtered groups
        included: the std is the generation batch's), from one all-reduce of (n, sum r, sum r^2)."""
        if self.scale_rewards != "batch":
            return batches
        moments = torch.stack([self.sampled_moments(batch) for batch in batches]).sum(0)
        n, total, squares = all_reduce_sum(moments).unbind()
        std = ((squares - total * total / n) / (n - 1)).clamp(min=0).sqrt().float()
        return [{**batch, "batch_reward_std": std} for batch in batches]

    def sampled_moments(self, batch: dict[str, Tensor]) -> Tensor:
        """(count, sum, sum of squares) of the weighted rewards of the batch's sampled completions, in
        float64 against the cancellation in sum r^2 - (sum r)^2 / n (float32 on MPS, which has no float64)."""
        rewards_BK = batch.get("sampled_rewards", batch["rewards"])
        dtype = torch.float32 if rewards_BK.device.type == "mps" else torch.float64
        reward_B = rewards_BK.to(dtype) @ self.weights_K.to(rewards_BK.device, dtype)
        return torch.stack([reward_B.new_tensor(len(reward_B)), reward_B.sum(), reward_B.square().sum()])

    def state_dict(self) -> dict[str, Tensor]:
        """The reference once it was synced (the starting policy is rebuilt by `setup`), its sync step,
        and the buffered rollouts (llmtrain.strategies.rollout.Rollouts.state_dict)."""
        state = self.rollouts.state_dict()
        if self.reference is not None and self.synced_at is not None:
            state |= {f"reference/{k}": v for k, v in self.reference.state_dict().items()}
            state["reference_synced_at"] = torch.tensor(self.synced_at)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.rollouts.load_state_dict({k: v for k, v in state.items() if k.startswith("buffer/")})
        if "reference_synced_at" in state and self.reference is not None:
            self.reference.load_state_dict({k[len("reference/"):]: v for k, v in state.items()
                                            if k.startswith("reference/")})
            self.synced_at = int(state["reference_synced_at"])

    def samples(self, n: int) -> list[dict[str, object]]:
        """The first `n` completions of the last evaluation (one group: the same prompt G times, then the
        next), with their reward per function, for samples.jsonl."""
        return self.rollouts.eval_texts[:n]

    def num_items(self, batch: dict[str, Tensor]) -> int:
        return batch["completion_mask"].shape[0]                 # completions

    def loss_mask(self, batch: dict[str, Tensor]) -> Tensor:
        """(BG, N) float: the completion mask, zeroed on truncated completions with mask_truncated_completions."""
        mask_BN = batch["completion_mask"].float()
        if self.mask_truncated and "truncated" in batch:
            mask_BN = mask_BN * ~batch["truncated"][:, None]
        return mask_BN

    def loss(self, model: nn.Module, batch: dict[str, Tensor], num_items: int) -> tuple[Tensor, dict[str, Tensor]]:
        mask_BN = batch["completion_mask"].float()
        logp_BN = completion_logps(model, batch, self.temperature, self.scored_group)
        old_logp_BN = batch["old_logp"] if "old_logp" in batch else logp_BN.detach()
        weights_K = self.weights_K.to(mask_BN.device)
        reward_B = batch["rewards"] @ weights_K
        advantages_B = self.advantages(reward_B.view(-1, self.group_size), batch.get("batch_reward_std")).flatten()
        loss_mask_BN = self.loss_mask(batch)
        per_token_BN, clipped_BN = clipped_objective(logp_BN, old_logp_BN, advantages_B, self.clip_low,
                                                     self.clip_high, loss_mask_BN if self.sequence_level else None)
        sampled_BK = batch.get("sampled_rewards", batch["rewards"])      # all sampled groups, filtered or not
        sampled_BG = (sampled_BK @ weights_K).view(-1, self.group_size)
        metrics = {"reward": sampled_BG.sum(), "reward_std": sampled_BG.std(-1).sum(),
                   "frac_reward_zero_std": (sampled_BG == sampled_BG[:, :1]).all(-1).float().sum(),
                   **{f"rewards/{n}": r.sum() for n, r in zip(self.names, sampled_BK.unbind(-1))},
                   "clip_ratio": (clipped_BN * loss_mask_BN).sum(), "completions": mask_BN.new_tensor(len(mask_BN)),
                   "sampled": mask_BN.new_tensor(sampled_BG.numel()), "completion_tokens": mask_BN.sum(),
                   "loss_tokens": loss_mask_BN.sum(),
                   "sampled_tokens": batch.get("sampled_lengths", mask_BN.sum(-1)).float().sum()}
        if "truncated" in batch:
            metrics["truncated"] = batch.get("sampled_truncated", batch["truncated"]).float().sum()
        if "thinking_mask" in batch:
            metrics["thinking_fraction"] = (batch["thinking_mask"] * mask_BN).sum()
        if self.reference is not None:
            with torch.no_grad():
                # HRPO: the reference scores the tokens without latents (SPECS 5.4)
                ref_logp_BN = completion_logps(self.reference.model, plain_tokens(batch), self.temperature,
                                               self.scored_group)
            # after EOS the two models may disagree without bound: exp would overflow and inf * 0 is NaN
            ref_logp_BN = torch.where(mask_BN.bool(), ref_logp_BN, logp_BN.detach())
            kl_BN = k3(logp_BN, ref_logp_BN)
            per_token_BN = per_token_BN + self.kl_coef * kl_BN
            metrics["kl"] = (kl_BN.detach() * loss_mask_BN).sum()
        return self.aggregate(per_token_BN, loss_mask_BN, num_items), metrics

    def advantages(self, rewards_BG: Tensor, batch_std: Tensor | None = None) -> Tensor:
        """(B, G): r - group mean, divided by (the std that scale_rewards names + 1e-4); `batch_std` is
        `prepare_window`'s, needed with "batch" only."""
        if self.scale_rewards == "group":
            return group_advantages(rewards_BG)
        centred_BG = rewards_BG - rewards_BG.mean(-1, keepdim=True)
        if self.scale_rewards == "none":
            return centred_BG
        if batch_std is None:
            raise ValueError("strategy.scale_rewards='batch' needs the window's reward std: call "
                             "prepare_window on the prepared window before loss (the Trainer does)")
        return centred_BG / (batch_std + 1e-4)

    def aggregate(self, per_token_BN: Tensor, mask_BN: Tensor, num_items: int) -> Tensor:
        """Per-completion token mean, summed and divided by the window's completions."""
        return ((per_token_BN * mask_BN).sum(-1) / mask_BN.sum(-1).clamp(min=1)).sum() / num_items

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        """Window means from the window sums of `loss`'s metrics."""
        completions, tokens = totals.pop("completions"), totals.pop("completion_tokens")
        loss_tokens = totals.pop("loss_tokens")
        sampled, sampled_tokens = totals.pop("sampled"), totals.pop("sampled_tokens")
        per_sample = {k: v / sampled for k, v in totals.items() if k == "reward" or k.startswith("rewards/")}
        per_token = {k: totals[k] / max(loss_tokens, 1.0) for k in ("kl", "clip_ratio") if k in totals}
        if "thinking_fraction" in totals:                        # of every completion token, as sampled
            per_token["thinking_fraction"] = totals["thinking_fraction"] / max(tokens, 1.0)
        kept = {"kept_groups": completions / sampled} if self.filter_groups else {}
        if "truncated" in totals:
            totals["truncated"] /= sampled
        groups = sampled / self.group_size
        return {**totals, **per_sample, **per_token, **kept, "completion_length": sampled_tokens / sampled,
                "reward_std": totals["reward_std"] / groups,
                "frac_reward_zero_std": totals["frac_reward_zero_std"] / groups}


def _validate(names: list[str], weights: list[float], group_size: int, max_new_tokens: int, temperature: float,
              clip_eps: float, clip_eps_high: float, kl_coef: float, sync_interval: int | None,
              sync_alpha: float, num_iterations: int) -> None:
    if not names or len(set(names)) != len(names) or len(weights) != len(names):
        raise ValueError(f"strategy.rewards needs distinct reward functions (got names {names}) and as many "
                         f"strategy.reward_weights (got {weights})")
    if group_size < 2:
        raise ValueError(f"strategy.group_size={group_size} must be >= 2: the std of a group of one is undefined")
    if max_new_tokens < 1 or temperature <= 0 or num_iterations < 1:
        raise ValueError(f"need max_new_tokens >= 1, temperature > 0, num_iterations >= 1; got "
                         f"{max_new_tokens}, {temperature}, {num_iterations}")
    if not 0 < clip_eps < 1 or clip_eps_high <= 0 or kl_coef < 0:
        raise ValueError(f"need 0 < clip_eps < 1, clip_eps_high > 0, kl_coef >= 0; got clip_eps={clip_eps}, "
                         f"clip_eps_high={clip_eps_high}, kl_coef={kl_coef}")
    if sync_interval is not None and sync_interval < 1:
        raise ValueError(f"strategy.sync_interval={sync_interval} must be >= 1 or null (never)")
    if not 0 < sync_alpha <= 1:
        raise ValueError(f"strategy.sync_alpha={sync_alpha} must be in (0, 1] (1 = hard copy)")
