"""Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290), sigmoid form (SPECS 4.3).

A preference batch holds 2B rows: chosen responses in rows 0..B-1, rejected in B..2B-1, labels
IGNORE_INDEX outside the responses. Policy and reference each score all 2B rows in one forward.
With summed response log-probs π (policy) and ρ (reference),

    h = (π_c - ρ_c) - (π_r - ρ_r),   loss = -(1 - ε) log σ(βh) - ε log σ(-βh)   (mean over pairs)

where ε > 0 is conservative DPO (label smoothing). With `nll_weight` = α > 0 the loss adds
α · (-π_c / |c|) per pair, the chosen response's mean token NLL as RPO normalises it (Pang et al.
2024, arXiv:2404.19733), which keeps DPO from lowering the likelihood of the preferred answers. TRL's
`rpo_alpha` takes one token mean over all chosen tokens of the batch instead, which weights longer
answers more; the two agree when the chosen answers have the same length. At
the first step policy == reference, so h = 0 and the loss is ln 2 (plus the NLL term). Metrics
follow TRL: rewards/chosen = β(π_c - ρ_c), rewards/rejected, rewards/margins, rewards/accuracies
(strict >, so 0 at the first step), logps/chosen, logps/rejected, and logits/chosen, logits/rejected
(the policy's logits averaged over the vocabulary and then over the window's chosen, or rejected,
response tokens).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule

from llmtrain.checkpoint import tied_names, unique_tensors
from llmtrain.strategies.base import Strategy
from llmtrain.strategies.seq import IGNORE_INDEX, real_tokens, shift_labels

log = logging.getLogger(__name__)


class ResponseScores(NamedTuple):
    """Per row (shape (rows,)): summed log p of the target tokens, their number, and the sum over them of
    the logits' mean over the vocabulary (detached; for the logits/* metrics)."""

    logps: Tensor
    lengths: Tensor
    logit_sums: Tensor


def response_logps(model: nn.Module, batch: dict[str, Tensor]) -> ResponseScores:
    """The `ResponseScores` of each row of `batch`, one row per forward row."""
    logits_BTV = model(batch["input_ids"], token_mask_BT=real_tokens(batch["labels"]))   # MoE balance: no pads
    targets_BT = shift_labels(batch["labels"])
    nll_BT = F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").view_as(targets_BT)          # 0 where ignored
    is_target_BT = targets_BT != IGNORE_INDEX
    with torch.no_grad():
        logit_sums_B = (logits_BTV.mean(-1, dtype=torch.float32) * is_target_BT).sum(-1)   # no fp32 copy of bf16 logits
    return ResponseScores(-nll_BT.sum(-1), is_target_BT.sum(-1), logit_sums_B)


def shared_prompt_logps(model: nn.Module, batch: dict[str, Tensor]) -> ResponseScores:
    """`response_logps` of a preference batch with each pair's prompt computed once.

    Pair i becomes one row, prompt + chosen + rejected, in which the rejected tokens attend to the
    prompt and to themselves but not to the chosen ones, and take the positions they would have
    after the prompt alone. Causal attention makes every log-prob equal to the two-row layout's
    (tested), with one prompt fewer per pair in every matmul: 25% fewer tokens for equal prompt and
    answer lengths, more for long prompts. Falls back to `response_logps` when a pair's rows do not
    share the tokens before their first target.
    """
    device = batch["input_ids"].device
    ids_NT, is_target_NT = batch["input_ids"].cpu(), batch["labels"].cpu() != IGNORE_INDEX   # layout built on CPU
    is_target_NT[:, 0] = False      # no position predicts token 0 (shift_labels drops it too): P >= 1 below
    B = ids_NT.shape[0] // 2
    if not bool(is_target_NT.any(-1).all()):
        return response_logps(model, batch)
    first = is_target_NT.int().argmax(-1).tolist()                                  # prompt length P
    end = (ids_NT.shape[1] - is_target_NT.flip(-1).int().argmax(-1)).tolist()     # one past the last target
    rows, positions, segments, sources, targets, owners = [], [], [], [], [], []
    for c, r in zip(range(B), range(B, 2 * B)):
        P = first[c]
        if first[r] != P or not torch.equal(ids_NT[c, :P], ids_NT[r, :P]):
            return response_logps(model, batch)
        n_c, n_r = end[c] - P, end[r] - P
        rows.append(torch.cat([ids_NT[c, :end[c]], ids_NT[r, P:end[r]]]))
        positions.append(torch.cat([torch.arange(end[c]), torch.arange(P, end[r])]))
        segments.append(torch.cat([torch.zeros(P), torch.ones(n_c), torch.full((n_r,), 2.0)]))
        # token t is predicted at its predecessor's index; the last prompt token predicts both answers' first
        rejected_at = torch.arange(end[c], end[c] + n_r)
        source = torch.cat([torch.arange(P - 1, end[c] - 1), torch.tensor([P - 1]), rejected_at[:-1]])
        keep = torch.cat([is_target_NT[c, P:end[c]], is_target_NT[r, P:end[r]]])
        sources.append(source[keep])
        targets.append(torch.cat([ids_NT[c, P:end[c]], ids_NT[r, P:end[r]]])[keep])
        owners.append(torch.where(torch.arange(n_c + n_r) < n_c, c, r)[keep])
    T = max(len(row) for row in rows)
    ids_BT = torch.zeros(B, T, dtype=ids_NT.dtype)
    positions_BT = torch.zeros(B, T, dtype=torch.long)
    segment_BT = torch.full((B, T), 3.0)                                     # padding: its own segment
    for i, (row, pos, seg) in enumerate(zip(rows, positions, segments)):
        ids_BT[i, :len(row)], positions_BT[i, :len(row)], segment_BT[i, :len(row)] = row, pos, seg
    causal_TT = torch.ones(T, T, dtype=torch.bool).tril()
    same_BTT = (segment_BT[:, None, :] == 0) | (segment_BT[:, None, :] == segment_BT[:, :, None])
    logits_BTV = model(ids_BT.to(device), positions=positions_BT.to(device), mask_BTT=(causal_TT & same_BTT).to(device),
                       token_mask_BT=(segment_BT != 3).to(device))       # MoE balance: padding left out
    batch_index = torch.cat([torch.full((len(s),), i) for i, s in enumerate(sources)]).to(device)
    source, target, owner = (torch.cat(x).to(device) for x in (sources, targets, owners))
    logits_KV = logits_BTV[batch_index, source].float()
    logp_K = -F.cross_entropy(logits_KV, target, reduction="none")
    logps_N = torch.zeros(2 * B, device=device, dtype=logp_K.dtype).index_add(0, owner, logp_K)
    with torch.no_grad():
        logit_sums_N = torch.zeros_like(logps_N).index_add(0, owner, logits_KV.mean(-1))
    return ResponseScores(logps_N, is_target_NT.sum(-1).to(device), logit_sums_N)


def pair_logps(model: nn.Module, batch: dict[str, Tensor], share_prompt: bool) -> ResponseScores:
    return shared_prompt_logps(model, batch) if share_prompt else response_logps(model, batch)


class FrozenReference:
    """The reference policy: a frozen copy of the starting policy, or a separate model.

    Args:
        path: None (copy the policy as it is when training starts: after `model.init_from`, before a
            resumed checkpoint is loaded, so a resumed run has the same reference), or a run
            directory / checkpoint / Hugging Face folder to load the reference from.
        precompute: score every training and held-out pair once before training and drop the
            model (saves a forward per step and the reference's memory). The scores take the
            precision of the autocast `setup` runs under, which must be the loss's: bf16 policy
            log-probs against fp32 reference ones would make h != 0 at the first step.
        share_prompt: score each pair as one row (shared_prompt_logps).
    """

    def __init__(self, path: str | os.PathLike | None = None, precompute: bool = False,
                 share_prompt: bool = True) -> None:
        self.path, self.precompute, self.share_prompt = path, precompute, share_prompt
        self.model: nn.Module | None = None
        self.tied: set[str] = set()            # the model's tied names, read while it is a plain module

    def models(self) -> list[nn.Module]:
        """The reference model, for the hardware to place (Strategy.frozen_models); none once its
        precomputed scores replaced it."""
        return [] if self.model is None else [self.model]

    def setup(self, policy: nn.Module, data: object) -> None:
        policy = getattr(policy, "module", policy)          # a DDP / compile wrapper holds the model
        device = next(policy.parameters()).device
        if self.path is None:
            reference = copy.deepcopy(policy)
        else:
            from llmtrain.pretrained import build, check_source_ids, load_weights, source_model_node
            if (tokenizer := getattr(data, "tokenizer", None)) is not None:
                check_source_ids(self.path, tokenizer, type(tokenizer).__name__, "strategy.reference")
            reference = build(source_model_node(self.path))
            load_weights(reference, self.path, "strategy.reference")
            if reference.vocab_size != policy.vocab_size:
                raise ValueError(f"strategy.reference={self.path} has vocab_size {reference.vocab_size}, the policy "
                                 f"{policy.vocab_size}: they must share the tokenizer")
        self.model = reference.to(device).eval().requires_grad_(False)
        self.tied = tied_names(self.model)
        if self.precompute:
            def score(batch: dict[str, Tensor]) -> Tensor:
                with torch.no_grad():
                    return pair_logps(self.model, {k: v.to(device) for k, v in batch.items()}, self.share_prompt)[0]
            data.add_column("ref_logps", score)
            log.info("reference log-probs precomputed for every pair; the reference model is released")
            self.model = None

    def sync(self, policy: nn.Module, alpha: float = 1.0) -> None:
        """θ_ref <- α θ + (1 - α) θ_ref from the policy's current weights θ (TR-DPO; α = 1: a hard copy).

        Under FSDP2 both are sharded alike (Hardware.prepare_frozen), so each rank updates its own
        shards, with no collective. A plain reference takes the policy's full state dict (gathered,
        a collective, if the policy alone is sharded; its own state dict otherwise).
        """
        if self.model is None:
            raise RuntimeError("the reference is not set up (or was released after precomputing)")
        policy = getattr(policy, "module", policy)
        sharded = isinstance(self.model, FSDPModule)
        state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=not sharded))
        if alpha != 1.0:
            own = self.model.state_dict()
            state = {name: own[name].lerp(tensor.to(own[name].dtype), alpha) for name, tensor in state.items()}
        if sharded:
            set_model_state_dict(self.model, state)
        else:
            self.model.load_state_dict(state)

    def state_dict(self) -> dict[str, Tensor]:
        """The reference's weights, a tied matrix once (as in model.safetensors); every rank calls it.
        A sharded reference is gathered onto rank 0 (the other ranks get {}: rank 0 alone writes)."""
        if not isinstance(self.model, FSDPModule):
            return unique_tensors(self.model)
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {name: tensor.contiguous() for name, tensor in state.items() if name not in self.tied}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Full (unsharded) weights, as `state_dict` saved them; a sharded reference keeps its shards."""
        expected, given = set(self.model.state_dict()) - self.tied, set(state)
        if given != expected:
            raise ValueError(f"the checkpoint's reference weights do not fit the reference model: missing "
                             f"{sorted(expected - given)}, unexpected {sorted(given - expected)}")
        if isinstance(self.model, FSDPModule):
            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            self.model.load_state_dict(state, strict=False)

    def logps(self, batch: dict[str, Tensor]) -> Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        if self.model is None:
            raise RuntimeError("the reference is not set up: call strategy.setup(model, data) before training")
        with torch.no_grad():
            return pair_logps(self.model, batch, self.share_prompt)[0]


def preference_metrics(beta: float, policy: ResponseScores, reference_2B: Tensor, num_items: int) -> dict[str, Tensor]:
    """TRL's reward metrics, each a sum over the micro-batch's pairs divided by the window's pairs, and
    the sums and token counts behind logits/chosen and logits/rejected (`token_means` divides them)."""
    with torch.no_grad():
        policy_c, policy_r = policy.logps.detach().chunk(2)
        reward_c, reward_r = (beta * (policy.logps.detach() - reference_2B)).chunk(2)
        (logits_c, logits_r), (tokens_c, tokens_r) = policy.logit_sums.chunk(2), policy.lengths.float().chunk(2)
        return {"rewards/chosen": reward_c.sum() / num_items, "rewards/rejected": reward_r.sum() / num_items,
                "rewards/accuracies": (reward_c > reward_r).float().sum() / num_items,
                "rewards/margins": (reward_c - reward_r).sum() / num_items,
                "logps/chosen": policy_c.sum() / num_items, "logps/rejected": policy_r.sum() / num_items,
                "logits/chosen": logits_c.sum(), "logits/rejected": logits_r.sum(),
                "tokens/chosen": tokens_c.sum(), "tokens/rejected": tokens_r.sum()}


def token_means(totals: dict[str, float]) -> dict[str, float]:
    """Window totals of `preference_metrics` with logits/* as means over the window's response tokens."""
    totals = dict(totals)
    for side in ("chosen", "rejected"):
        tokens = totals.pop(f"tokens/{side}", None)
        if tokens is not None:
            totals[f"logits/{side}"] /= max(tokens, 1.0)
    return totals


class DPO(Strategy):
    """Sigmoid DPO loss against a frozen reference.

    Args:
        beta: inverse temperature of the implicit reward (TRL's default 0.1).
        label_smoothing: ε of conservative DPO, in [0, 0.5); 0 is plain DPO.
        reference: where the reference comes from (see FrozenReference; null = copy of the policy).
        precompute_reference: score the reference once per dataset instead of every step.
        nll_weight: α of the added chosen-response NLL (0: plain DPO).
        share_prompt: compute each pair's prompt once (shared_prompt_logps; same numbers, fewer FLOPs).
    """

    format = "preference"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, reference: str | None = None,
                 precompute_reference: bool = False, nll_weight: float = 0.0, share_prompt: bool = True) -> None:
        if beta <= 0:
            raise ValueError(f"strategy.beta={beta} must be > 0")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"strategy.label_smoothing={label_smoothing} must be in [0, 0.5)")
        if nll_weight < 0:
            raise ValueError(f"strategy.nll_weight={nll_weight} must be >= 0")
        self.beta, self.label_smoothing, self.nll_weight = beta, label_smoothing, nll_weight
        self.share_prompt = share_prompt
        self.reference = FrozenReference(reference, precompute_reference, share_prompt)

    def setup(self, model: nn.Module, data: object) -> None:
        self.reference.setup(model, data)

    def frozen_models(self) -> list[nn.Module]:
        return self.reference.models()

    def num_items(self, batch: dict[str, Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2                 # pairs

    def loss(self, model: nn.Module, batch: dict[str, Tensor], num_items: int) -> tuple[Tensor, dict[str, Tensor]]:
        policy = pair_logps(model, batch, self.share_prompt)
        policy_2B, lengths_2B = policy.logps, policy.lengths
        reference_2B = self.reference.logps(batch)
        loss_B = self.pair_loss(policy_2B, reference_2B)
        metrics = preference_metrics(self.beta, policy, reference_2B, num_items)
        if self.nll_weight > 0:
            policy_c, lengths_c = policy_2B.chunk(2)[0], lengths_2B.chunk(2)[0]
            nll_B = -policy_c / lengths_c.clamp(min=1)
            loss_B = loss_B + self.nll_weight * nll_B
            metrics["nll/chosen"] = nll_B.detach().sum() / num_items
        return loss_B.sum() / num_items, metrics

    def pair_loss(self, policy_2B: Tensor, reference_2B: Tensor) -> Tensor:
        """Per-pair loss from summed log-probs laid out chosen rows first, then rejected."""
        log_ratio_c, log_ratio_r = (policy_2B - reference_2B).chunk(2)
        h_B = self.beta * (log_ratio_c - log_ratio_r)
        eps = self.label_smoothing
        return -(1 - eps) * F.logsigmoid(h_B) - eps * F.logsigmoid(-h_B)

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        return token_means(totals)
