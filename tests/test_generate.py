"""Batched generation: sampling pipeline (SPECS 7.1, 7.6), stopping (7.5), left padding (7.4), greedy eval."""

from __future__ import annotations

import functools

import pytest
import torch

from llmtrain.generate import (apply_repetition_penalty, generate, greedy_decode, left_pad, sample_token,
                               top_k_filter, top_p_filter)
from llmtrain.models.attention_gqa import GQAttention
from llmtrain.models.attention_mla import MLAttention
from llmtrain.models.ffn import SwiGLU
from llmtrain.models.transformer import Transformer

EOS, PAD, V = 0, 11, 12


class CountUp(torch.nn.Module):
    """Always predicts last token + 1, and EOS after token 9; counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> object:
        return object()

    def forward(self, ids_BT, positions=None, attention_mask_BT=None, cache=None,
                logits_to_keep=0) -> torch.Tensor:
        self.calls += 1
        nxt_B = ids_BT[:, -1] + 1
        nxt_B = torch.where(nxt_B > 9, torch.full_like(nxt_B, EOS), nxt_B)
        logits_BTV = torch.zeros(*ids_BT.shape, V)
        logits_BTV[torch.arange(len(ids_BT)), -1, nxt_B] = 1.0
        return logits_BTV[:, -logits_to_keep:]


def tiny(max_seq_len: int = 128) -> Transformer:
    torch.manual_seed(0)
    attention = functools.partial(GQAttention, n_heads=4, n_kv_heads=2)
    ffn = functools.partial(SwiGLU, hidden_dim=48)
    return Transformer(vocab_size=64, dim=32, n_layers=2, attention=attention, ffn=ffn, rope_theta=1e4,
                       max_seq_len=max_seq_len).eval()


def mixed_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 64, (n,), generator=g).tolist() for n in (3, 5, 8, 13)]


# --- greedy_decode (eval accuracy) ---------------------------------------------------------------


def test_each_prompt_gets_its_continuation_cut_at_eos():
    out = greedy_decode(CountUp(), [[5], [1, 2], [7], [3, 8]], max_new_tokens=4, eos_id=EOS)
    assert out == [[6, 7, 8, 9], [3, 4, 5, 6], [8, 9], [9]]


def test_decoding_stops_once_every_row_has_ended():
    model = CountUp()
    assert greedy_decode(model, [[7], [8]], max_new_tokens=10, eos_id=EOS) == [[8, 9], [9]]
    assert model.calls == 3                        # prefill, then 2 cached steps: all rows done


def test_max_new_tokens_bounds_the_output():
    assert greedy_decode(CountUp(), [[1]], max_new_tokens=2, eos_id=EOS) == [[2, 3]]
    assert greedy_decode(CountUp(), [[1]], max_new_tokens=0, eos_id=EOS) == [[]]


def test_an_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        greedy_decode(CountUp(), [[1], []], max_new_tokens=2, eos_id=EOS)


# --- stopping and the completion mask (SPECS 7.5) ------------------------------------------------


@pytest.mark.parametrize("pad_id", [PAD, EOS])
def test_tokens_after_eos_are_pad_and_the_mask_includes_eos(pad_id):
    result = generate(CountUp(), [[7], [3]], max_new_tokens=5, eos_id=EOS, pad_id=pad_id,
                      temperature=0.0, device="cpu")
    assert result.tokens_BN.tolist() == [[8, 9, EOS, pad_id, pad_id], [4, 5, 6, 7, 8]]
    assert result.mask_BN.sum(-1).tolist() == [3, 5]
    assert result.completions() == [[8, 9, EOS], [4, 5, 6, 7, 8]]


def test_the_prompts_come_back_left_padded():
    result = generate(CountUp(), [[7], [1, 2, 3]], max_new_tokens=1, eos_id=EOS, pad_id=PAD, device="cpu")
    assert result.prompt_ids_BP.tolist() == [[PAD, PAD, 7], [1, 2, 3]]
    assert result.prompt_mask_BP.tolist() == [[0, 0, 1], [1, 1, 1]]


# --- the per-step pipeline (SPECS 7.1, 7.6) ------------------------------------------------------


@pytest.mark.parametrize("p, kept", [(0.6, 2), (0.85, 3), (0.4, 1), (1.0, 4)])
def test_top_p_keeps_the_smallest_prefix_reaching_p(p, kept):
    z_BV = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    out_BV = top_p_filter(z_BV, p)
    assert torch.isfinite(out_BV).sum().item() == kept
    assert torch.isfinite(out_BV[0, :kept]).all()


def test_top_k_1_equals_greedy():
    z_BV = torch.randn(64, 100)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(sample_token(z_BV, 1.0, 1, 1.0, g), z_BV.argmax(-1))


def test_top_k_2_leaves_exactly_two_finite_logits():
    z_BV = torch.randn(8, 100)
    out_BV = top_k_filter(z_BV, 2)
    assert (torch.isfinite(out_BV).sum(-1) == 2).all()
    assert torch.equal(torch.isfinite(out_BV), z_BV >= z_BV.topk(2).values[:, -1:])


def test_temperature_zero_is_argmax_without_nan():
    z_BV = torch.randn(16, 50)
    next_B = sample_token(z_BV, 0.0, 0, 1.0, torch.Generator())
    assert torch.equal(next_B, z_BV.argmax(-1))
    result = generate(tiny(), mixed_prompts(), 4, eos_id=-1, pad_id=0, temperature=0.0, return_logprobs=True)
    assert torch.isfinite(result.logprobs_BN).all()


def test_top_k_2_draws_follow_the_renormalised_top_two():
    z_V = torch.tensor([2.0, 1.0, 1.5, -1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    draws_N = sample_token(z_V.expand(20_000, 5), 1.0, 2, 1.0, g)
    assert set(draws_N.tolist()) == {0, 2}                     # filtered tokens are never drawn
    frequency_V = torch.bincount(draws_N, minlength=5).float() / 20_000
    expected_V = torch.zeros(5)
    expected_V[[0, 2]] = torch.tensor([2.0, 1.5]).softmax(-1)
    torch.testing.assert_close(frequency_V, expected_V, atol=0.01, rtol=0)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    z_BV = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen_BV = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(z_BV, seen_BV, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]


# --- batched generation with the GQA transformer -------------------------------------------------


def test_batched_left_padded_greedy_equals_each_prompt_alone():
    model, prompts = tiny(), mixed_prompts()
    batched = generate(model, prompts, 64, eos_id=-1, pad_id=0, temperature=0.0)  # -1: never stops early
    assert batched.tokens_BN.shape == (4, 64)
    for row, prompt in zip(batched.tokens_BN.tolist(), prompts):
        assert row == generate(model, [prompt], 64, eos_id=-1, pad_id=0, temperature=0.0).tokens_BN[0].tolist()


def test_sampling_is_reproducible_from_the_seed():
    model, prompts = tiny(), mixed_prompts()
    first = generate(model, prompts, 16, eos_id=-1, pad_id=0, seed=3).tokens_BN
    assert torch.equal(first, generate(model, prompts, 16, eos_id=-1, pad_id=0, seed=3).tokens_BN)
    assert not torch.equal(first, generate(model, prompts, 16, eos_id=-1, pad_id=0, seed=4).tokens_BN)


def test_logprobs_are_those_of_a_full_forward_at_the_temperature():
    model, prompts = tiny(), mixed_prompts()
    result = generate(model, prompts, 8, eos_id=-1, pad_id=0, temperature=0.7, top_k=5, return_logprobs=True)
    ids_BT = torch.cat([result.prompt_ids_BP, result.tokens_BN], 1)
    mask_BT = torch.cat([result.prompt_mask_BP, result.mask_BN], 1)
    logits_BTV = model(ids_BT, attention_mask_BT=mask_BT)[:, -9:-1]  # with grad: outputs are not inference tensors
    expected_BN = (logits_BTV / 0.7).log_softmax(-1).gather(-1, result.tokens_BN[..., None]).squeeze(-1)
    torch.testing.assert_close(result.logprobs_BN, expected_BN.detach(), atol=1e-5, rtol=1e-5)
    expected_BN.sum().backward()


def test_generating_past_max_seq_len_raises_a_clear_error():
    with pytest.raises(ValueError, match="max_seq_len=16"):
        generate(tiny(max_seq_len=16), [[1] * 10], 7, eos_id=-1, pad_id=0)
    assert generate(tiny(max_seq_len=16), [[1] * 10], 6, eos_id=-1, pad_id=0).tokens_BN.shape == (1, 6)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=-1)])
def test_bad_sampling_arguments_name_the_values(kwargs):
    args = dict(max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        generate(tiny(), [[1, 2]], eos_id=-1, pad_id=0, **args)


# --- num_samples: one prefill per prompt, its cache copied (GRPO's groups) -----------------------


def tiny_mla() -> Transformer:
    torch.manual_seed(0)
    attention = functools.partial(MLAttention, n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                  v_head_dim=8)
    return Transformer(vocab_size=64, dim=32, n_layers=2, attention=attention,
                       ffn=functools.partial(SwiGLU, hidden_dim=48), rope_theta=1e4, max_seq_len=128).eval()


@pytest.mark.parametrize("build", [tiny, tiny_mla], ids=["gqa", "mla"])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_k=20, seed=5),
                                      dict(temperature=1.0, repetition_penalty=1.3, seed=2)])
def test_num_samples_gives_the_rows_of_each_prompt_passed_n_times(build, sampling):
    model, prompts = build(), mixed_prompts()
    shared = generate(model, prompts, 12, eos_id=5, pad_id=0, return_logprobs=True, num_samples=3, **sampling)
    repeated = generate(model, [p for p in prompts for _ in range(3)], 12, eos_id=5, pad_id=0,
                        return_logprobs=True, **sampling)
    assert shared.tokens_BN.shape[0] == 12
    for name in ("tokens_BN", "mask_BN", "prompt_ids_BP", "prompt_mask_BP"):
        assert torch.equal(getattr(shared, name), getattr(repeated, name)), name
    torch.testing.assert_close(shared.logprobs_BN, repeated.logprobs_BN, atol=1e-5, rtol=1e-5)
    if sampling["temperature"] > 0:     # the copies of a prompt are sampled independently
        assert len({tuple(r) for r in shared.tokens_BN[:3].tolist()}) > 1


def test_repeat_rows_copies_every_layer_and_the_padding_history_contiguously():
    model, prompts = tiny(), mixed_prompts()
    ids_BP, mask_BP = left_pad(prompts, 0, torch.device("cpu"))
    cache = model.new_cache(4, 20)
    with torch.no_grad():
        model(ids_BP, attention_mask_BT=mask_BP, cache=cache)
    k_before = cache.layers[1].k_BKSE.clone()
    cache.repeat_rows_(2)
    assert cache.layers[1].k_BKSE.shape[0] == 8 and cache.length == 13
    assert torch.equal(cache.layers[1].k_BKSE[4:6], k_before[[2, 2]])
    assert torch.equal(cache.key_mask_BS[::2], cache.key_mask_BS[1::2])
    assert cache.n_real_B.tolist() == [3, 3, 5, 5, 8, 8, 13, 13]


@pytest.mark.parametrize("n", [0, -2])
def test_num_samples_below_one_is_refused(n):
    with pytest.raises(ValueError, match=f"num_samples={n}"):
        generate(tiny(), [[1, 2]], 4, eos_id=-1, pad_id=0, num_samples=n)


def test_a_greedy_sampler_gives_the_argmax_and_the_softmax_at_the_given_temperature():
    from llmtrain.generate import Sampler

    z_BV = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.0]])
    sampler = Sampler(0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, generator=torch.Generator())
    next_B, probs_BV = sampler.sample_with_probs(z_BV, greedy_temperature=0.5)
    assert next_B.tolist() == [1, 0]
    torch.testing.assert_close(probs_BV, (z_BV / 0.5).softmax(-1))
    torch.testing.assert_close(sampler.sample_with_probs(z_BV)[1], z_BV.softmax(-1))   # default: temperature 1


def test_under_fsdp_decoding_stops_only_when_every_rank_has_finished(monkeypatch):
    """A rank that stopped early would leave the others waiting in the next step's all-gather."""
    import torch.distributed.fsdp as fsdp

    import llmtrain.generate as generate_module

    class Sharded(torch.nn.Linear):             # stands for a module fully_shard made (needs a process group)
        pass

    reduced = []

    def all_reduce(tensor, op):                 # the other rank still has an unfinished row
        reduced.append(op)
        tensor.zero_()

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    assert not generate_module.ranks_decode_together(torch.nn.Linear(1, 1))     # no process group here
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(fsdp, "FSDPModule", Sharded)
    plain, sharded = torch.nn.Linear(1, 1), torch.nn.Sequential(Sharded(1, 1))
    assert not generate_module.ranks_decode_together(plain) and generate_module.ranks_decode_together(sharded)
    done_B = torch.ones(3, dtype=torch.bool)
    assert generate_module.all_finished(done_B, together=False) and reduced == []
    assert not generate_module.all_finished(done_B, together=True)
    assert reduced == [torch.distributed.ReduceOp.MIN]
