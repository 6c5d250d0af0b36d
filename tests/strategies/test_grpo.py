"""GRPO, DAPO, Dr. GRPO (SPECS 4.4.4): advantages, clipping, KL, masks, rollouts, reuse, sync, accumulation."""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import pytest
import torch

from llmtrain.data.builtin import BuiltinTask
from llmtrain.data.tokenizer import ByteTokenizer
from llmtrain.models.attention_gqa import GQAttention
from llmtrain.models.ffn import SwiGLU
from llmtrain.models.thinking import ProjectedThinkingResidual, ThinkingResidual
from llmtrain.models.transformer import Transformer
from llmtrain.strategies.bnpo import BNPO
from llmtrain.strategies.dapo import DAPO
from llmtrain.strategies.dr_grpo import DrGRPO
from llmtrain.strategies.grpo import GRPO, clipped_objective, group_advantages, k3
from llmtrain.strategies import rollout as rollout_module
from llmtrain.strategies.rewards import Accuracy, Format, reward_name
from llmtrain.strategies.rollout import (completion_logps, completion_mask, completion_text, plain_tokens,
                                         split_prompts)

TOKENIZER = ByteTokenizer()
EOS, PAD = TOKENIZER.eos_id, TOKENIZER.pad_id


def tiny_model(seed: int = 0, thinking=None) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(vocab_size=264, dim=32, n_layers=2, attention=functools.partial(GQAttention, n_heads=4,
                       n_kv_heads=2), ffn=functools.partial(SwiGLU), thinking=thinking)


def hrpo_model(cls=ThinkingResidual) -> Transformer:
    """A tiny model with a strong blend (a ~ 0.3-0.7); its answer marker is set by `marked_rollout`."""
    return tiny_model(thinking=functools.partial(cls, answer_marker="unset", r_min=0.3, r_max=0.5))


def marked_rollout(strategy: GRPO, model: Transformer) -> dict[str, torch.Tensor]:
    """The step-0 rollout of the first prompts batch, with the model's answer marker set to an ASCII
    character that a first sample of it contains, so that some rows stop thinking."""
    batch = next(prompts_data().train_batches(0))
    tokens = copy.deepcopy(strategy).prepare(model, batch, step=0)["input_ids"][:, -strategy.max_new_tokens + 1:]
    model.thinking.answer_marker = TOKENIZER.decode([next(t for t in tokens.flatten().tolist() if 40 <= t < 120)])
    return strategy.prepare(model, batch, step=0)


@functools.cache
def prompts_data(batch_size: int = 2) -> BuiltinTask:
    data = BuiltinTask(TOKENIZER, n_train=64, n_eval=16, batch_size=batch_size, eval_batch_size=4,
                       accuracy_examples=4, cache=False)
    data.setup("prompts")
    return data


def distinct_chars(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    """A reward that varies between the random model's completions, so advantages are not all 0."""
    return [float(len(set(c))) for c in completions]


def grpo(cls=GRPO, **options) -> GRPO:
    """A strategy scoring `distinct_chars`, set up on a tiny model (the reference's source when kl_coef > 0)."""
    strategy = cls(rewards=[distinct_chars], **{"max_new_tokens": 6, **options})
    strategy.setup(tiny_model(), SimpleNamespace(tokenizer=TOKENIZER))
    return strategy


def test_group_advantages_on_the_specs_fixture():
    rewards_BG = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(group_advantages(rewards_BG), torch.tensor(
        [[1.4997, -0.4999, -0.4999, -0.4999], [0, 0, 0, 0]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(DrGRPO(rewards=[Accuracy()]).advantages(rewards_BG),
                               torch.tensor([[0.75, -0.25, -0.25, -0.25], [0, 0, 0, 0]]))


@pytest.mark.parametrize("options, match", [({"group_size": 1}, "group_size=1"), ({"temperature": 0}, "temperature"),
                                            ({"reward_weights": [1, 2]}, "reward_weights"),
                                            ({"sync_interval": 0}, "sync_interval"),
                                            ({"importance_sampling_level": "seq"}, "importance_sampling_level")])
def test_bad_values_are_refused_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        GRPO(rewards=[Accuracy()], **options)


def test_clipping_engages_only_outside_the_range_in_the_direction_of_the_advantage():
    ratio = torch.tensor([[0.5, 0.9, 1.1, 1.5], [0.5, 0.9, 1.1, 1.5]])
    old_logp = torch.full((2, 4), -2.0)
    advantages = torch.tensor([1.0, -2.0])
    loss, clipped = clipped_objective(old_logp + ratio.log(), old_logp, advantages, 0.2, 0.3)
    want = torch.tensor([[-0.5, -0.9, -1.1, -1.3], [1.6, 1.8, 2.2, 3.0]])   # -min(r A, clip(r) A)
    torch.testing.assert_close(loss, want)
    assert clipped.tolist() == [[False, False, False, True], [True, False, False, False]]


class FixedLogits(torch.nn.Module):
    def __init__(self, logits_BTV: torch.Tensor) -> None:
        super().__init__()
        self.logits_BTV = torch.nn.Parameter(logits_BTV)

    def forward(self, ids_BT, attention_mask_BT=None, token_mask_BT=None):   # one row per completion: share_prompt=False
        return self.logits_BTV[:, :ids_BT.shape[1]]


def test_loss_and_clip_ratio_equal_the_formula_on_hand_made_logprobs():
    torch.manual_seed(0)
    B, P, N, V, tau = 4, 2, 3, 5, 0.7
    model = FixedLogits(torch.randn(B, P + N - 1, V))
    ids = torch.randint(0, V, (B, P + N))
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, P + N, dtype=torch.long),
             "completion_mask": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]),
             "rewards": torch.tensor([[1.0], [0.0], [0.0], [3.0]]), "old_logp": -torch.rand(B, N) * 3}
    strategy = GRPO(rewards=[Accuracy()], group_size=2, temperature=tau, kl_coef=0.0, share_prompt=False)
    loss, parts = strategy.loss(model, batch, num_items=B)
    metrics = strategy.summarize({"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}})
    advantages = [1 / (2 ** 0.5 + 1e-4), -1 / (2 ** 0.5 + 1e-4), -1.5 / (4.5 ** 0.5 + 1e-4), 1.5 / (4.5 ** 0.5 + 1e-4)]
    total, clipped, tokens = 0.0, 0, 0
    for b in range(B):
        terms = []
        for t in range(int(batch["completion_mask"][b].sum())):
            logp = float((model.logits_BTV.detach()[b, P - 1 + t] / tau).log_softmax(-1)[ids[b, P + t]])
            ratio, A = torch.tensor(logp - float(batch["old_logp"][b, t])).exp().item(), advantages[b]
            terms.append(-min(ratio * A, min(max(ratio, 0.8), 1.2) * A))
            clipped += (ratio < 0.8 and A < 0) or (ratio > 1.2 and A > 0)
        total, tokens = total + sum(terms) / len(terms), tokens + len(terms)
    assert metrics["loss"] == pytest.approx(total / B, abs=1e-5)
    assert metrics["clip_ratio"] == pytest.approx(clipped / tokens) and 0 < clipped < tokens
    assert metrics["completion_length"] == pytest.approx(tokens / B)
    assert metrics["reward"] == pytest.approx(1.0) and metrics["rewards/accuracy"] == pytest.approx(1.0)
    assert metrics["reward_std"] == pytest.approx((2 ** 0.5 / 2 + 4.5 ** 0.5) / 2)    # mean of the 2 group stds


def test_sequence_level_importance_sampling_clips_one_ratio_per_completion():
    torch.manual_seed(0)
    B, P, N, V = 4, 2, 3, 5
    model = FixedLogits(torch.randn(B, P + N - 1, V))
    ids = torch.randint(0, V, (B, P + N))
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, P + N, dtype=torch.long),
             "completion_mask": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]),
             "rewards": torch.tensor([[1.0], [0.0], [0.0], [3.0]])}
    batch["old_logp"] = (model.logits_BTV.detach()[:, P - 1:].log_softmax(-1).gather(-1, ids[:, P:, None])[..., 0]
                         + torch.tensor([[0.3, -0.2, 0.1], [0.05, 0.0, 9.0], [0.5, 9.0, 9.0], [0.0, 0.01, -0.02]]))
    gspo = GRPO(rewards=[Accuracy()], group_size=2, kl_coef=0.0, share_prompt=False, importance_sampling_level="sequence")
    loss, parts = gspo.loss(model, batch, num_items=B)
    advantages = [1 / (2 ** 0.5 + 1e-4), -1 / (2 ** 0.5 + 1e-4), -1.5 / (4.5 ** 0.5 + 1e-4), 1.5 / (4.5 ** 0.5 + 1e-4)]
    total, clipped = 0.0, 0
    for b in range(B):
        n = int(batch["completion_mask"][b].sum())
        logps = model.logits_BTV.detach()[b, P - 1:P - 1 + n].log_softmax(-1).gather(-1, ids[b, P:P + n, None])[:, 0]
        ratio, A = float((logps - batch["old_logp"][b, :n]).mean().exp()), advantages[b]   # one per completion
        total += -min(ratio * A, min(max(ratio, 0.8), 1.2) * A)
        clipped += n * ((ratio < 0.8 and A < 0) or (ratio > 1.2 and A > 0))
    assert float(loss.detach()) == pytest.approx(total / B, abs=1e-6)
    assert float(parts["clip_ratio"]) == clipped > 0                     # row 2: ratio exp(-0.5) < 0.8 with A < 0
    token = GRPO(rewards=[Accuracy()], group_size=2, kl_coef=0.0, share_prompt=False)
    assert float(token.loss(model, batch, num_items=B)[0].detach()) != pytest.approx(total / B, abs=1e-3)


@pytest.mark.parametrize("cls", [GRPO, DAPO, DrGRPO, BNPO])
def test_on_a_fresh_rollout_sequence_and_token_level_ratios_give_the_same_step(cls):
    model, batch = tiny_model(), {k: v for k, v in hand_made_batch().items() if k != "old_logp"}   # ratio 1
    want = gradients(grpo(cls, kl_coef=0.1), model, [batch])
    got = gradients(grpo(cls, kl_coef=0.1, importance_sampling_level="sequence"), model, [batch])
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)


def test_tokens_after_eos_cannot_make_the_loss_or_its_gradient_nan():
    logits = torch.zeros(2, 4, 5)
    policy, reference = FixedLogits(logits.clone()), FixedLogits(logits.clone())
    policy.logits_BTV.data[:, 3, 1] = -200.0            # the pad after EOS: exp(ref - policy) overflows
    batch = {"input_ids": torch.tensor([[3, 0, 2, 1, 1]] * 2), "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "completion_mask": torch.tensor([[1, 1, 0], [1, 1, 0]]), "rewards": torch.tensor([[1.0], [0.0]])}
    strategy = GRPO(rewards=[Accuracy()], group_size=2, kl_coef=0.1, share_prompt=False)
    strategy.reference = SimpleNamespace(model=reference)
    loss, parts = strategy.loss(policy, batch, num_items=2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(parts["kl"]) and torch.isfinite(policy.logits_BTV.grad).all()


def test_k3_is_nonnegative_zero_at_equality_and_estimates_the_kl():
    torch.manual_seed(0)
    logp, ref = torch.randn(4, 5).log_softmax(-1), torch.randn(4, 5).log_softmax(-1)
    assert (k3(logp, ref) >= 0).all() and torch.equal(k3(logp, logp), torch.zeros(4, 5))
    samples = torch.multinomial(logp[0].exp(), 200_000, replacement=True)
    kl = (logp[0].exp() * (logp[0] - ref[0])).sum()
    assert float(k3(logp[0][samples], ref[0][samples]).mean()) == pytest.approx(float(kl), abs=0.01)


def test_kl_is_zero_while_the_policy_equals_the_reference():
    strategy = GRPO(rewards=[Accuracy()], max_new_tokens=4, kl_coef=0.1)
    model = tiny_model()
    strategy.setup(model, prompts_data())
    batch = strategy.prepare(model, next(prompts_data().train_batches(0)), step=0)
    _, parts = strategy.loss(model, batch, strategy.num_items(batch))
    assert float(parts["kl"]) == 0.0


@pytest.mark.parametrize("tokens, mask", [([5, 6, EOS, PAD, PAD], [1, 1, 1, 0, 0]), ([5, 6, 7], [1, 1, 1]),
                                          ([EOS, PAD, PAD], [1, 0, 0]), ([5, EOS, EOS, EOS], [1, 1, 0, 0])])
def test_the_completion_mask_ends_at_the_first_eos(tokens, mask):
    assert completion_mask(torch.tensor([tokens]), EOS).tolist() == [mask]


def test_rewards_see_text_without_padding_but_with_other_special_tokens():
    think, end_think = TOKENIZER.special_tokens["<think>"], TOKENIZER.special_tokens["</think>"]
    rows = [TOKENIZER.encode("42") + [EOS, PAD, PAD],
            [think] + TOKENIZER.encode("6*7") + [end_think] + TOKENIZER.encode(" <answer>42</answer>") + [EOS, PAD],
            [TOKENIZER.special_tokens["<|user|>"]] + TOKENIZER.encode("42") + [EOS]]
    tokens = torch.tensor([r + [PAD] * (30 - len(r)) for r in rows])
    texts = [completion_text(TOKENIZER, r[:n]) for r, n in zip(tokens.tolist(), completion_mask(tokens, EOS).sum(-1))]
    assert texts == ["42", "<think>6*7</think> <answer>42</answer>", "<|user|>42"]
    assert Accuracy()([""] * 3, texts, ["42"] * 3) == [1.0, 1.0, 0.0]
    assert Format()([""] * 3, texts, ["42"] * 3) == [0.0, 1.0, 0.0]
    assert [reward_name(f) for f in (Accuracy(), distinct_chars, functools.partial(distinct_chars))] == \
        ["accuracy", "distinct_chars", "distinct_chars"]


def test_prompts_batches_carry_the_chat_prompt_and_the_answer():
    data = prompts_data()
    prompts, answers = split_prompts(next(data.eval_batches()))
    examples = data.eval_examples[:len(prompts)]
    assert prompts == [data.template.encode_prompt([{"role": "user", "content": e.prompt}]) for e in examples]
    assert [TOKENIZER.decode(a) for a in answers] == [e.answer for e in examples]
    assert {"accuracy", "accuracy/en"} <= set(data.task_metrics(tiny_model(), "cpu"))


def test_prompt_files_carry_the_prompt_and_the_answer_and_other_shapes_are_refused(tmp_path):
    import json

    from llmtrain.data.files import RecordFiles

    rows = [{"prompt": "3*3", "answer": "9"}, {"prompt": [{"role": "system", "content": "be brief"},
                                                          {"role": "user", "content": "1+1"}], "answer": "2"},
            {"prompt": "x" * 40, "answer": "too long"}, {"prompt": "2*2", "answer": "4", "system": "math"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = RecordFiles([str(tmp_path / "p.jsonl")], TOKENIZER, seq_len=32, batch_size=1, eval_fraction=0.4)
    data.setup("prompts")
    pairs = [pair for b in (*data.train_batches(0), *data.eval_batches()) for pair in zip(*split_prompts(b))]
    assert sorted(TOKENIZER.decode(answer) for _, answer in pairs) == ["2", "4", "9"]     # the long prompt dropped
    assert data.template.encode_prompt([{"role": "user", "content": "3*3"}]) in [prompt for prompt, _ in pairs]
    assert data.template.encode_prompt([{"role": "system", "content": "math"}, {"role": "user", "content": "2*2"}]) \
        in [prompt for prompt, _ in pairs]
    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    with pytest.raises(ValueError, match=r"consumes 'prompts' rows \(\{'prompt', 'answer'\}\).*a chat shape"):
        RecordFiles([str(tmp_path / "c.jsonl")], TOKENIZER, batch_size=1).setup("prompts")


def test_rollout_logprobs_equal_the_training_forward_and_the_first_pass_ratio_is_one():
    """tau = 0.7, mu = 2: old_logp stored at generation matches the loss's log-probs (SPECS 4.4.4)."""
    strategy, model = grpo(num_iterations=2, temperature=0.7, kl_coef=0.0, group_size=3), tiny_model()
    fresh = strategy.prepare(model, next(prompts_data().train_batches(0)), step=0)
    stored = strategy.rollouts.buffer[0]
    assert "old_logp" not in fresh and stored["input_ids"] is fresh["input_ids"]
    with torch.no_grad():
        logp = completion_logps(model, fresh, 0.7) * fresh["completion_mask"]
    torch.testing.assert_close(stored["old_logp"], logp, atol=1e-4, rtol=0)
    loss, parts = strategy.loss(model, fresh, strategy.num_items(fresh))
    advantages = group_advantages((fresh["rewards"][:, 0]).view(-1, 3)).flatten()
    assert float(parts["clip_ratio"]) == 0.0 and float(advantages.abs().max()) > 0.5
    assert float(loss.detach()) == pytest.approx(float(-advantages.mean()), abs=1e-7)    # every ratio exactly 1
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 3.0 * p.grad
    reused = strategy.prepare(model, next(prompts_data().train_batches(0, start=1)), step=1)
    assert reused is stored
    _, parts = strategy.loss(model, reused, strategy.num_items(reused))
    assert float(parts["clip_ratio"]) > 0


@pytest.mark.parametrize("cls", [ThinkingResidual, ProjectedThinkingResidual])
def test_hrpo_rollout_logprobs_equal_the_training_forward_that_replays_its_latents(cls):
    """SPECS 5.7: log-probs seen while sampling == the loss's forward with the stored latents (fp32, 1e-4)."""
    strategy, model = grpo(num_iterations=2, temperature=0.7, kl_coef=0.0, group_size=3), hrpo_model(cls)
    fresh = marked_rollout(strategy, model)
    stored, mask = strategy.rollouts.buffer[0], fresh["completion_mask"]
    thinking = fresh["thinking_mask"]
    assert thinking.any() and not thinking.all() and not (thinking & ~mask.bool()).any()
    assert fresh["thinking_latents"].shape == (*mask.shape, 32) and not fresh["thinking_latents"].requires_grad
    with torch.no_grad():
        logp, plain = (completion_logps(model, b, 0.7) * mask for b in (fresh, plain_tokens(fresh)))
    torch.testing.assert_close(stored["old_logp"], logp, atol=1e-4, rtol=0)
    assert float((plain - logp).abs().max()) > 1e-2                       # the latents do change the log-probs
    loss, _ = strategy.loss(model, fresh, strategy.num_items(fresh))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.thinking.parameters())


def test_the_hrpo_reference_scores_plain_tokens():
    """The KL pulls the hybrid policy toward the plain-token model: at step 0 (same weights) it is > 0."""
    strategy, model = GRPO(rewards=[distinct_chars], max_new_tokens=6, kl_coef=0.1), hrpo_model()
    strategy.setup(model, SimpleNamespace(tokenizer=TOKENIZER))           # the reference: a copy of it
    batch = marked_rollout(strategy, model)
    _, parts = strategy.loss(model, batch, strategy.num_items(batch))
    with torch.no_grad():
        mask = batch["completion_mask"].bool()
        logp, ref = completion_logps(model, batch, 1.0), completion_logps(model, plain_tokens(batch), 1.0)
    assert float(parts["kl"]) > 0
    assert float(parts["kl"]) == pytest.approx(float(k3(logp, ref)[mask].sum()), rel=1e-5)


def test_with_two_iterations_every_second_batch_of_prompts_is_used():
    strategy, model = grpo(num_iterations=2, kl_coef=0.0), tiny_model()
    batches = list(prompts_data().train_batches(0))
    step0 = [strategy.prepare(model, batches[i], step=0) for i in (0, 1)]
    step1 = [strategy.prepare(model, batches[i], step=1) for i in (2, 3)]
    step2 = strategy.prepare(model, batches[4], step=2)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(step0, step1))
    assert all("old_logp" in b for b in step1) and "old_logp" not in step2
    P = step2["input_ids"].shape[1] - step2["completion_mask"].shape[1]
    assert step2["input_ids"][0, :P][step2["attention_mask"][0, :P].bool()].tolist() == split_prompts(batches[4])[0][0]


def test_the_reference_is_synced_at_multiples_of_sync_interval():
    strategy, model, data = GRPO(rewards=[Accuracy()], max_new_tokens=2, sync_interval=2), tiny_model(), prompts_data()
    strategy.setup(model, data)
    assert GRPO(rewards=[Accuracy()], kl_coef=0.0).reference is None
    batch = next(data.train_batches(0))
    with torch.no_grad():
        model.norm.weight.add_(0.5)
    for step in (None, 1):
        strategy.prepare(model, batch, step)
        assert not torch.equal(strategy.reference.model.norm.weight, model.norm.weight)
    strategy.prepare(model, batch, 2)
    assert torch.equal(strategy.reference.model.norm.weight, model.norm.weight)
    assert not strategy.reference.model.training and not strategy.reference.model.norm.weight.requires_grad


def test_a_soft_sync_moves_the_reference_part_of_the_way():
    """sync_alpha = α: θ_ref <- α θ + (1 - α) θ_ref (TR-DPO), every tensor, the tied matrix once."""
    strategy, model, data = GRPO(rewards=[Accuracy()], max_new_tokens=2, sync_interval=1, sync_alpha=0.25), \
        tiny_model(), prompts_data()
    strategy.setup(model, data)
    before = {k: v.clone() for k, v in strategy.reference.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    strategy.prepare(model, next(data.train_batches(0)), 1)
    after, policy = strategy.reference.model.state_dict(), model.state_dict()
    for name, old in before.items():
        torch.testing.assert_close(after[name], 0.25 * policy[name] + 0.75 * old, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="sync_alpha=0"):
        GRPO(rewards=[Accuracy()], sync_alpha=0)


def hand_made_batch(G: int = 4) -> dict[str, torch.Tensor]:
    """Two groups of G completions with uneven lengths, left-padded prompts and stale old log-probs."""
    torch.manual_seed(1)
    B, P, N = 2 * G, 3, 6
    attention = torch.ones(B, P + N, dtype=torch.long)
    attention[::3, 0] = 0
    lengths = torch.tensor([6, 1, 3, 5, 2, 6, 4, 1])
    return {"input_ids": torch.randint(8, 264, (B, P + N)), "attention_mask": attention,
            "completion_mask": (torch.arange(N) < lengths[:, None]).long(),
            "rewards": torch.tensor([[1.0], [0.0], [0.5], [0.0], [2.0], [1.0], [0.0], [1.0]]),
            "old_logp": -5.5 + 0.5 * torch.randn(B, N)}


def gradients(strategy, model, micro_batches) -> dict[str, torch.Tensor]:
    model.zero_grad()
    num_items = sum(strategy.num_items(b) for b in micro_batches)
    for batch in micro_batches:
        strategy.loss(model, batch, num_items)[0].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("cls", [GRPO, DAPO, DrGRPO])
def test_a_window_of_two_micro_batches_has_the_gradient_of_one_big_batch(cls):
    model, strategy = tiny_model(), grpo(cls, kl_coef=0.1)
    with torch.no_grad():
        strategy.reference.model.norm.weight.mul_(1.5)          # KL > 0 contributes to the gradient
    big = hand_made_batch()
    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
    want, got = gradients(strategy, model, [big]), gradients(strategy, model, halves)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)


def test_a_bnpo_window_averages_the_token_means_of_its_micro_batches():
    model, strategy = tiny_model(), grpo(BNPO, kl_coef=0.1)
    big = hand_made_batch()
    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
    alone = [gradients(strategy, model, [half]) for half in halves]
    got = gradients(strategy, model, halves)
    for name in got:
        torch.testing.assert_close(got[name], (alone[0][name] + alone[1][name]) / 2, atol=1e-6, rtol=1e-5)
    dapo = gradients(grpo(DAPO, kl_coef=0.1, clip_eps_high=0.2), model, halves)   # the window's token mean
    assert any(not torch.allclose(got[n], dapo[n], atol=1e-6) for n in got)       # uneven halves: 15 vs 13 tokens


def test_filter_groups_trains_only_on_varied_groups_and_reports_every_sampled_one():
    model, strategy = tiny_model(), grpo(kl_coef=0.1, filter_groups=True)
    big = hand_made_batch()
    big["rewards"][4:] = 1.0                                   # the second group carries no signal
    kept = strategy.keep_varied_groups(big)
    assert torch.equal(kept["input_ids"], big["input_ids"][:4]) and torch.equal(kept["sampled_rewards"], big["rewards"])
    first_only = {k: v[:4] for k, v in big.items()}
    want, got = gradients(strategy, model, [first_only]), gradients(strategy, model, [kept])
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)
    loss, parts = strategy.loss(model, kept, num_items=4)
    metrics = strategy.summarize({"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}})
    assert metrics["kept_groups"] == 0.5 and metrics["reward"] == pytest.approx(float(big["rewards"].mean()))
    assert metrics["reward_std"] == pytest.approx(float(big["rewards"].view(2, 4).std(-1).mean()))
    assert metrics["completion_length"] == pytest.approx(float(big["completion_mask"].sum()) / 8)   # all sampled
    assert big["completion_mask"][:4].sum() != big["completion_mask"][4:].sum()     # so the kept half alone differs
    big["rewards"][:] = 0.5                                    # no group varies: the first is kept (KL only)
    assert torch.equal(strategy.keep_varied_groups(big)["input_ids"], big["input_ids"][:4])


@pytest.mark.parametrize("cls", [GRPO, DAPO, DrGRPO, BNPO])
def test_mask_truncated_completions_leaves_them_out_of_the_loss_but_not_out_of_the_metrics(cls):
    model, batch = tiny_model(), hand_made_batch()
    batch["truncated"] = batch["completion_mask"].all(-1)      # rows 0 and 5 ran to max_new_tokens
    cut = {k: v for k, v in batch.items() if k != "truncated"}
    cut["completion_mask"] = batch["completion_mask"] * ~batch["truncated"][:, None]

    def strategy(**options):
        made = grpo(cls, kl_coef=0.1, **options)
        with torch.no_grad():
            made.reference.model.norm.weight.mul_(1.5)         # KL > 0 contributes to the gradient
        return made

    masking, plain = strategy(mask_truncated_completions=True), strategy()
    want, got = gradients(plain, model, [cut]), gradients(masking, model, [batch])
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)
    unmasked = gradients(plain, model, [batch])
    assert any(not torch.allclose(unmasked[n], want[n], atol=1e-6) for n in want)   # the option changes the step
    assert masking.num_items(batch) == plain.num_items(cut)
    loss, parts = masking.loss(model, batch, masking.num_items(batch))
    metrics = masking.summarize({"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}})
    assert metrics["truncated"] == 0.25
    assert metrics["completion_length"] == pytest.approx(float(batch["completion_mask"].sum()) / 8)
    _, cut_parts = plain.loss(model, cut, plain.num_items(cut))           # kl and clip_ratio: the loss's tokens
    cut_metrics = plain.summarize({k: float(v) for k, v in cut_parts.items()})
    assert metrics["kl"] == pytest.approx(cut_metrics["kl"]) and metrics["clip_ratio"] == cut_metrics["clip_ratio"]
    assert metrics["kl"] != pytest.approx(plain.summarize({k: float(v) for k, v in plain.loss(
        model, batch, plain.num_items(batch))[1].items()})["kl"])        # the truncated rows' KL differs


def test_a_window_of_truncated_completions_only_gives_a_zero_dapo_loss():
    model, batch = tiny_model(), hand_made_batch()
    batch["truncated"] = torch.ones(len(batch["completion_mask"]), dtype=torch.bool)
    strategy = grpo(DAPO, mask_truncated_completions=True)
    assert strategy.num_items(batch) == 0
    loss, _ = strategy.loss(model, batch, strategy.num_items(batch))
    assert float(loss.detach()) == 0.0


def test_rollouts_mark_the_completions_that_end_without_eos():
    strategy, model = grpo(max_new_tokens=4), tiny_model()
    batch = next(prompts_data(batch_size=4).train_batches(0))
    first = copy.deepcopy(strategy).prepare(model, batch, step=0)["input_ids"][0, -4]   # row 0's first token
    strategy.rollouts.tokenizer = SimpleNamespace(**{k: getattr(TOKENIZER, k) for k in (
        "pad_id", "bos_id", "vocab_size", "decode")}, eos_id=int(first))     # as EOS: row 0 ends at once
    rollout = strategy.prepare(model, batch, step=0)                        # the same draws
    completions = rollout["input_ids"][:, -rollout["completion_mask"].shape[1]:]
    assert torch.equal(rollout["truncated"], ~(completions == first).any(-1)) and not rollout["truncated"][0]
    assert rollout["truncated"].any() and not rollout["truncated"].all()
    assert bool(rollout["completion_mask"][rollout["truncated"]].all())          # they ran to max_new_tokens


def test_filter_groups_leaves_evaluation_rollouts_whole():
    strategy, model = grpo(filter_groups=True, kl_coef=0.0), tiny_model()
    batch = next(prompts_data(batch_size=4).train_batches(0))
    evaluated, trained = strategy.prepare(model, batch, None), strategy.prepare(model, batch, 0)
    assert len(evaluated["input_ids"]) == 4 * strategy.group_size and "sampled_rewards" not in evaluated
    assert len(trained["sampled_rewards"]) == 4 * strategy.group_size
    assert len(trained["input_ids"]) % strategy.group_size == 0 and len(trained["input_ids"]) >= strategy.group_size


def test_each_variant_aggregates_by_its_formula():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    options = {"rewards": [Accuracy()], "max_new_tokens": 3}
    assert float(GRPO(**options).aggregate(per_token, mask, 2)) == pytest.approx((1.5 + 5.0) / 2)
    assert float(DAPO(**options).aggregate(per_token, mask, 5)) == pytest.approx(18.0 / 5)
    assert float(DrGRPO(**options).aggregate(per_token, mask, 2)) == pytest.approx(18.0 / (2 * 3))
    assert float(BNPO(**options).aggregate(per_token, mask, 2)) == pytest.approx(18.0 / 5 / 2)   # 2 micro-batches
    batch = {"completion_mask": mask}
    assert [cls(**options).num_items(batch) for cls in (GRPO, DAPO, BNPO)] == [2, 5, 1]
    assert DAPO(**options).clip_high == 0.28 and GRPO(**options).clip_high == 0.2


def digit_share(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


@pytest.mark.parametrize("cls", [GRPO, DAPO, DrGRPO, BNPO])
def test_training_raises_a_reward_the_policy_can_reach(cls):
    from llmtrain.callbacks.history import History
    from llmtrain.hardware import Hardware
    from llmtrain.optim import adamw
    from llmtrain.schedulers import constant
    from llmtrain.trainer import Trainer

    model, data, history = tiny_model(), prompts_data(batch_size=8), History()
    strategy = cls(rewards=[digit_share], max_new_tokens=8)
    strategy.setup(model, data)
    Trainer(model=model, strategy=strategy, data=data, optimizer=adamw(model.named_parameters(), lr=1e-2),
            scheduler=constant, hardware=Hardware(device="cpu", precision="fp32"), callbacks=[history],
            max_steps=30).fit()
    first, last = (sum(row["reward"] for row in rows) / 5 for rows in (history.rows[:5], history.rows[-5:]))
    assert last > max(5 * first, 0.5), (first, last)          # from ~0.03 at the start


@pytest.mark.parametrize("model_kind", ["plain", "hrpo"])
def test_shared_prompt_scoring_gives_the_per_completion_logprobs_and_gradients(model_kind, monkeypatch):
    """One row per group (prompt once, completions side by side) == one row per completion, with
    left-padded prompts of different lengths and, for HRPO, replayed latents."""
    strategy = grpo(temperature=0.7, kl_coef=0.0, group_size=3)
    model = tiny_model() if model_kind == "plain" else hrpo_model()
    batch = strategy.prepare(model, next(prompts_data(batch_size=3).train_batches(0)), step=0) \
        if model_kind == "plain" else marked_rollout(strategy, model)
    assert (batch["attention_mask"] == 0).any()                          # some prompts are left-padded
    mask, rows = batch["completion_mask"], []
    real = rollout_module.shared_prompt_logits
    monkeypatch.setattr(rollout_module, "shared_prompt_logits",
                        lambda m, b, g: rows.append(real(m, b, g).shape) or real(m, b, g))
    grads = []
    for group_size in (1, 3):
        model.zero_grad()
        logp = completion_logps(model, batch, 0.7, group_size=group_size)
        (logp * mask).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if group_size == 1:
            want = logp.detach()
    assert rows == [(*mask.shape, 264)]                                 # only group_size 3 took it
    torch.testing.assert_close(logp.detach() * mask, want * mask, atol=1e-5, rtol=0)
    for got, ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_share_prompt_leaves_the_grpo_loss_and_metrics_unchanged():
    model = tiny_model()
    losses = []
    for share in (True, False):
        strategy = grpo(temperature=0.7, group_size=3, share_prompt=share)
        strategy.setup(model, SimpleNamespace(tokenizer=TOKENIZER))      # a reference, so the KL path runs too
        batch = strategy.prepare(model, next(prompts_data(batch_size=3).train_batches(0)), step=0)
        loss, parts = strategy.loss(model, batch, strategy.num_items(batch))
        losses.append((float(loss.detach()), {k: float(v) for k, v in parts.items()}))
    assert losses[0][0] == pytest.approx(losses[1][0], abs=1e-6)
    assert losses[0][1] == pytest.approx(losses[1][1], abs=1e-5)


def test_the_dapo_preset_has_no_kl_and_builds_no_reference(tmp_path):
    """DAPO drops the KL term (Yu et al. 2025; TRL's beta = 0 since v0.19, SPECS 0 and 4.4.2)."""
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    strategy = instantiate(compose_cfg("strategy=dapo", f"paths.output_dir={tmp_path}").strategy)
    assert isinstance(strategy, DAPO) and strategy.kl_coef == 0 and strategy.reference is None
    model, data = tiny_model(), prompts_data()
    strategy.setup(model, data)
    batch = strategy.prepare(model, next(data.train_batches(0)), step=strategy.sync_interval)   # a sync step
    _, metrics = strategy.loss(model, batch, strategy.num_items(batch))
    assert strategy.reference is None and "kl" not in metrics


@pytest.mark.parametrize("group_size", [1, 2])
def test_pads_after_eos_and_before_the_prompt_take_no_part_in_the_moe_balance_loss(group_size):
    """SPECS 3.4: whatever stands in a completion's padding after its EOS, the aux loss is the same."""
    from llmtrain.models.moe import MoE, collect_aux_loss

    torch.manual_seed(0)
    model = Transformer(vocab_size=264, dim=32, n_layers=2, attention=functools.partial(GQAttention, n_heads=4,
                        n_kv_heads=2), ffn=functools.partial(MoE, n_routed_experts=4, n_experts_per_tok=2)).train()
    P, N = 5, 6
    ids_BT = torch.randint(8, 264, (4, P + N))
    attention_BT = torch.ones(4, P + N, dtype=torch.long)
    attention_BT[:2, :2] = 0                                        # group 0's prompt is left-padded
    completion_BN = torch.ones(4, N, dtype=torch.long)
    completion_BN[0, 3:] = completion_BN[3, 1:] = 0                 # EOS at 2 and at 0, pads after
    batch = {"input_ids": ids_BT, "attention_mask": attention_BT, "completion_mask": completion_BN}
    other = {**batch, "input_ids": ids_BT.clone()}
    pads_BT = torch.cat([attention_BT[:, :P] == 0, completion_BN == 0], 1)
    other["input_ids"][pads_BT] = torch.randint(8, 264, (int(pads_BT.sum()),))
    auxes = []
    for b in (batch, other):
        completion_logps(model, b, 1.0, group_size=group_size)
        auxes.append(collect_aux_loss(model))
    torch.testing.assert_close(auxes[0], auxes[1], rtol=1e-6, atol=1e-7)


def test_a_completion_id_past_the_tokenizer_is_dropped_from_the_reward_text():
    """A model with padding rows past its tokenizer (many HF checkpoints) may sample one."""
    tok = ByteTokenizer()
    ids = [*tok.encode("4"), tok.vocab_size + 3, *tok.encode("2"), tok.eos_id]
    assert completion_text(tok, ids) == "42"
@pytest.mark.parametrize("preset, cls, kl_coef", [("bnpo", BNPO, 0.01), ("r1v", GRPO, 0.04), ("dr_grpo", DrGRPO, 0.01)])
def test_each_preset_builds_its_class_with_its_kl(preset, cls, kl_coef, tmp_path):
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    strategy = instantiate(compose_cfg(f"strategy={preset}", f"paths.output_dir={tmp_path}").strategy)
    assert type(strategy) is cls and strategy.kl_coef == kl_coef and strategy.reference is not None
    assert strategy.clip_low == strategy.clip_high == 0.2 and not strategy.sequence_level
    assert strategy.sync_interval == (None if preset == "r1v" else 200)       # TRL v0.14 never re-syncs
