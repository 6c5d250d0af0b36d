"""DPO and IPO: the formulas on hand-made log-probs, the step-0 invariants, the frozen reference."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from llmtrain.data.builtin import BuiltinTask
from llmtrain.data.tokenizer import ByteTokenizer
from llmtrain.models.attention_gqa import GQAttention
from llmtrain.models.ffn import SwiGLU
from llmtrain.models.transformer import Transformer
from llmtrain.strategies.dpo import DPO, ResponseScores, preference_metrics, response_logps, token_means
from llmtrain.strategies.ipo import IPO


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(vocab_size=264, dim=32, n_layers=2, attention=functools.partial(GQAttention, n_heads=4,
                       n_kv_heads=2), ffn=functools.partial(SwiGLU))


def preference_data(batch_size: int = 4) -> BuiltinTask:
    data = BuiltinTask(ByteTokenizer(), n_train=64, n_eval=16, batch_size=batch_size, eval_batch_size=8,
                       accuracy_examples=0)
    data.setup("preference")
    return data


# hand-made summed log-probs of 2 pairs: chosen rows first, then rejected
POLICY = torch.tensor([-10.0, -20.0, -12.0, -18.0])
REFERENCE = torch.tensor([-11.0, -19.0, -11.5, -19.5])


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_loss_and_metrics_equal_the_formula_on_hand_made_logprobs(eps):
    beta = 0.5
    strategy = DPO(beta=beta, label_smoothing=eps)
    losses = strategy.pair_loss(POLICY, REFERENCE)
    for pair in range(2):
        h = (POLICY[pair] - REFERENCE[pair]) - (POLICY[pair + 2] - REFERENCE[pair + 2])   # 1.5, then -0.5
        sig = 1 / (1 + math.exp(-beta * float(h)))
        expected = -(1 - eps) * math.log(sig) - eps * math.log(1 - sig)
        assert float(losses[pair]) == pytest.approx(expected, abs=1e-6)
    policy = ResponseScores(POLICY, torch.tensor([2, 4, 5, 1]), torch.tensor([1.0, 2.0, -3.0, 4.0]))
    metrics = token_means({k: float(v) for k, v in preference_metrics(beta, policy, REFERENCE, num_items=2).items()})
    assert metrics["rewards/chosen"] == pytest.approx(beta * (1.0 + -1.0) / 2)
    assert metrics["rewards/rejected"] == pytest.approx(beta * (-0.5 + 1.5) / 2)
    assert metrics["rewards/margins"] == pytest.approx(beta * (1.5 + -2.5) / 2)
    assert metrics["rewards/accuracies"] == pytest.approx(0.5)       # pair 0 right, pair 1 wrong
    assert metrics["logps/chosen"] == pytest.approx(-15.0) and metrics["logps/rejected"] == pytest.approx(-15.0)
    assert metrics["logits/chosen"] == pytest.approx(3.0 / 6) and metrics["logits/rejected"] == pytest.approx(1.0 / 6)
    assert not any(k.startswith("tokens/") for k in metrics)          # the counts only serve the means


def test_ipo_loss_uses_length_averaged_logprobs():
    beta = 0.25
    lengths = torch.tensor([2, 4, 5, 1])
    losses = IPO(beta=beta).pair_loss(POLICY, REFERENCE, lengths)
    ratio = (POLICY - REFERENCE) / lengths
    for pair in range(2):
        expected = (float(ratio[pair] - ratio[pair + 2]) - 1 / (2 * beta)) ** 2
        assert float(losses[pair]) == pytest.approx(expected, abs=1e-6)


def test_response_logps_sum_exactly_the_labelled_tokens():
    model = tiny_model().eval()
    batch = next(preference_data().train_batches(0))
    with torch.no_grad():
        logps, lengths, logit_sums = response_logps(model, batch)
        logits = model(batch["input_ids"])
    for row in range(len(logps)):
        targets = [t for t in range(1, batch["labels"].shape[1]) if batch["labels"][row, t] != -100]
        expected = sum(float(F.log_softmax(logits[row, t - 1], -1)[batch["input_ids"][row, t]]) for t in targets)
        assert float(logps[row]) == pytest.approx(expected, abs=1e-4)
        assert int(lengths[row]) == len(targets) > 0
        assert float(logit_sums[row]) == pytest.approx(sum(float(logits[row, t - 1].mean()) for t in targets), abs=1e-4)


@pytest.mark.parametrize("strategy", [DPO(beta=0.1), DPO(beta=0.1, label_smoothing=0.1), IPO(beta=0.1)],
                         ids=["dpo", "cdpo", "ipo"])
def test_at_the_start_policy_equals_reference(strategy):
    """DPO: loss ln 2, zero rewards and margins, accuracy 0 (strict >). IPO: loss (1/2beta)^2."""
    model, data = tiny_model(), preference_data()
    strategy.setup(model, data)
    batch = next(data.train_batches(0))
    loss, metrics = strategy.loss(model, batch, strategy.num_items(batch))
    expected = (1 / (2 * 0.1)) ** 2 if isinstance(strategy, IPO) else math.log(2)
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(metrics[key]) == pytest.approx(0.0, abs=1e-6), key


def test_the_reference_is_frozen_and_gets_no_gradient():
    model, data = tiny_model(), preference_data()
    strategy = DPO()
    strategy.setup(model, data)
    reference = strategy.reference.model
    assert reference is not model and not reference.training
    with torch.no_grad():
        model.norm.weight.add_(0.01)                     # the policy moves; the reference must not follow
    batch = next(data.train_batches(0))
    loss, _ = strategy.loss(model, batch, strategy.num_items(batch))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in reference.parameters())
    assert any(p.grad is not None for p in model.parameters())
    assert not torch.equal(reference.norm.weight, model.norm.weight)


def test_the_reference_state_round_trips_and_a_mismatch_names_the_tensors():
    model, data = tiny_model(), preference_data()
    strategy = DPO()
    strategy.setup(model, data)
    assert strategy.frozen_models() == [strategy.reference.model]
    state = strategy.reference.state_dict()
    assert "lm_head.weight" not in state and "embed.weight" in state        # the tied matrix once
    other = DPO()
    other.setup(tiny_model(seed=1), data)
    other.reference.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.reference.model.parameters(),
                                                 strategy.reference.model.parameters()))
    with pytest.raises(ValueError, match=r"missing \['norm.weight'\], unexpected \['extra'\]"):
        other.reference.load_state_dict({**{k: v for k, v in state.items() if k != "norm.weight"},
                                         "extra": torch.zeros(1)})


def test_precomputed_reference_logprobs_give_the_same_loss_and_release_the_model():
    online, precomputed = DPO(), DPO(precompute_reference=True)
    model = tiny_model()
    data_online, data_pre = preference_data(), preference_data()
    online.setup(model, data_online)
    precomputed.setup(model, data_pre)
    assert precomputed.reference.model is None and precomputed.frozen_models() == []
    with torch.no_grad():
        model.norm.weight.add_(0.05)
    for batch_online, batch_pre in zip(data_online.train_batches(1, start=2), data_pre.train_batches(1, start=2)):
        assert "ref_logps" in batch_pre and "ref_logps" not in batch_online
        a, metrics_a = online.loss(model, batch_online, 4)
        b, metrics_b = precomputed.loss(model, batch_pre, 4)
        assert float(a.detach()) == pytest.approx(float(b.detach()), abs=1e-5)
        assert float(metrics_a["rewards/margins"]) == pytest.approx(float(metrics_b["rewards/margins"]), abs=1e-5)
    held_out = next(data_pre.eval_batches())
    assert held_out["ref_logps"].shape == (held_out["input_ids"].shape[0],)


def test_duplicating_a_response_token_changes_h_by_its_logprob():
    """DPO sums (not averages) response log-probs: one more target token adds exactly its log-prob."""
    model, data = tiny_model().requires_grad_(False), preference_data()
    batch = next(data.train_batches(0))
    logps = response_logps(model, batch).logps
    shorter = {k: v.clone() for k, v in batch.items()}
    row = 0
    last = int((shorter["labels"][row] != -100).nonzero().max())
    shorter["labels"][row, last] = -100                    # drop the last response token from the sum
    logps_short = response_logps(model, shorter).logps
    logits = model(batch["input_ids"])
    token_logp = float(F.log_softmax(logits[row, last - 1], -1)[batch["input_ids"][row, last]])
    assert float(logps[row] - logps_short[row]) == pytest.approx(token_logp, abs=1e-5)


@pytest.mark.parametrize("kwargs, message", [({"beta": 0.0}, "strategy.beta=0.0"),
                                             ({"label_smoothing": 0.5}, "strategy.label_smoothing=0.5")])
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPO(**kwargs)


def test_nll_weight_adds_the_chosen_answers_mean_token_nll():
    model, data = tiny_model(), preference_data()
    plain, rpo = DPO(), DPO(nll_weight=0.5)
    plain.setup(model, data)
    rpo.setup(model, data)
    batch = next(data.train_batches(0))
    with torch.no_grad():
        loss_plain, _ = plain.loss(model, batch, 4)
        loss_rpo, metrics = rpo.loss(model, batch, 4)
        logps, lengths, _ = response_logps(model, batch)
    nll = float((-logps[:4] / lengths[:4]).mean())
    assert float(metrics["nll/chosen"]) == pytest.approx(nll, abs=1e-5)
    assert float(loss_rpo - loss_plain) == pytest.approx(0.5 * nll, abs=1e-5)


def test_a_shared_prompt_row_gives_the_two_row_logprobs_and_gradients(tmp_path):
    """Pairs from files: message-list answers with several turns, user turns between the targets."""
    import json

    from llmtrain.data.files import RecordFiles
    from llmtrain.strategies.dpo import shared_prompt_logps

    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "five, I think"},
            {"prompt": [{"role": "system", "content": "short"}, {"role": "user", "content": "hi"}],
             "chosen": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"},
                        {"role": "assistant", "content": "hello again"}],
             "rejected": [{"role": "assistant", "content": "go"}]}] * 2
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = RecordFiles([str(path)], ByteTokenizer(), batch_size=3, eval_fraction=0.25)
    data.setup("preference")
    batch = next(data.train_batches(0))
    model = tiny_model()
    two_rows, lengths, two_row_logits = response_logps(model, batch)
    grads = torch.autograd.grad(two_rows.sum(), list(model.parameters()))
    one_row, shared_lengths, one_row_logits = shared_prompt_logps(model, batch)
    shared_grads = torch.autograd.grad(one_row.sum(), list(model.parameters()))
    torch.testing.assert_close(one_row, two_rows, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_row_logits, two_row_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(lengths, shared_lengths)
    for a, b in zip(shared_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_the_shared_prompt_layout_saves_one_prompt_per_pair():
    from llmtrain.strategies.dpo import shared_prompt_logps

    batch = next(preference_data().train_batches(0))
    seen = {}
    model = tiny_model()
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs, ids=args[0]), with_kwargs=True)
    shared_prompt_logps(model, batch)
    prompt_tokens = int((batch["labels"][:4] == -100).logical_and(batch["input_ids"][:4] != 0).sum())
    assert seen["ids"].shape[0] == 4 and seen["mask_BTT"].shape[1:] == (seen["ids"].shape[1],) * 2
    assert int((seen["ids"] != 0).sum()) == int((batch["input_ids"] != 0).sum()) - prompt_tokens


@pytest.mark.parametrize("rejected_first", [1, 2], ids=["shared-first-token", "different-first-tokens"])
def test_an_empty_prompt_gives_the_two_row_logprobs(rejected_first):
    """Targets from position 0 (no prompt): token 0 is predicted by nothing, in either layout."""
    from llmtrain.strategies.dpo import shared_prompt_logps

    rows = [[1, 5, 6, 7], [1, 8, 9], [rejected_first, 10, 11, 12, 13], [rejected_first, 14]]  # chosen, then rejected
    ids = torch.zeros(4, 6, dtype=torch.long)
    labels = torch.full((4, 6), -100)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = labels[i, :len(row)] = torch.tensor(row)
    batch = {"input_ids": ids, "labels": labels}
    model = tiny_model().eval()
    with torch.no_grad():
        two_rows, lengths, two_row_logits = response_logps(model, batch)
        one_row, shared_lengths, one_row_logits = shared_prompt_logps(model, batch)
    torch.testing.assert_close(one_row, two_rows, atol=1e-5, rtol=1e-5)
    assert lengths.tolist() == shared_lengths.tolist() == [len(row) - 1 for row in rows]


def test_a_precomputed_reference_under_bf16_autocast_starts_at_ln2(tmp_path):
    """The reference log-probs are computed once at setup in the precision the loss's policy
    forward runs in (bf16 autocast here), so step 0 still has policy == reference exactly."""
    from llmtrain.entry import train
    from tests.conftest import SMOKE, compose_cfg

    metrics, _ = train(compose_cfg(*SMOKE, "strategy=dpo", "strategy.precompute_reference=true",
                                   "hardware.precision=bf16", "trainer.max_steps=1", "data.n_train=64",
                                   "data.n_eval=16", "data.accuracy_examples=0", f"paths.output_dir={tmp_path}"))
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/accuracies"] == 0.0 and metrics["rewards/margins"] == 0.0


@pytest.mark.parametrize("layout", ["two_rows", "shared_prompt"])
def test_padding_does_not_move_an_moe_models_balance_loss(layout):
    """SPECS 3.4: padding takes no part in the aux loss: a batch's equals the mean over its pairs
    scored alone (one balance group per row), and a longer pad tail changes nothing."""
    from llmtrain.models.moe import MoE, collect_aux_loss
    from llmtrain.strategies.dpo import shared_prompt_logps
    from llmtrain.strategies.seq import real_tokens

    torch.manual_seed(0)
    model = Transformer(vocab_size=264, dim=32, n_layers=2, attention=functools.partial(GQAttention, n_heads=4,
                        n_kv_heads=2), ffn=functools.partial(MoE, n_routed_experts=4, n_experts_per_tok=2)).train()
    score = response_logps if layout == "two_rows" else shared_prompt_logps

    def aux_of(b):
        score(model, b)
        return collect_aux_loss(model)

    batch = next(preference_data().train_batches(0))          # chosen rows first, then rejected
    P = len(batch["input_ids"]) // 2
    alone = []
    for i in range(P):
        pair = {k: batch[k][[i, i + P]] for k in ("input_ids", "labels")}
        T = int(real_tokens(pair["labels"]).any(0).nonzero().max()) + 1     # without the batch's pad tail
        alone.append(aux_of({k: v[:, :T] for k, v in pair.items()}))
    torch.testing.assert_close(aux_of(batch), torch.stack(alone).mean(), rtol=1e-5, atol=1e-7)
    padded = {"input_ids": F.pad(batch["input_ids"], (0, 7), value=ByteTokenizer.pad_id),
              "labels": F.pad(batch["labels"], (0, 7), value=-100)}
    torch.testing.assert_close(aux_of(padded), aux_of(batch), rtol=1e-6, atol=1e-7)
