"""HRPO latent thinking (SPECS 5.7): latent, gate, float32 blend, answer marker, cached decode == replay."""

from __future__ import annotations

import functools

import pytest
import torch

from llmtrain.data.tokenizer import ByteTokenizer
from llmtrain.generate import generate
from llmtrain.models.attention_gqa import GQAttention
from llmtrain.models.attention_mla import MLAttention
from llmtrain.models.ffn import SwiGLU
from llmtrain.models.thinking import ProjectedThinkingResidual, ThinkingResidual, latent_from_probs
from llmtrain.models.transformer import Transformer
from llmtrain.thinking_decode import AnswerWatch, ThinkingDecoder, thinking_decoder

TOKENIZER = ByteTokenizer()
DECODE = functools.partial(TOKENIZER.decode, skip_special=False)
VARIANTS = [ThinkingResidual, ProjectedThinkingResidual]


def tiny(thinking=None, attention=functools.partial(GQAttention, n_heads=4, n_kv_heads=2)) -> Transformer:
    torch.manual_seed(0)
    return Transformer(vocab_size=264, dim=32, n_layers=2, attention=attention, ffn=SwiGLU, thinking=thinking).eval()


def test_the_latent_of_a_one_hot_distribution_is_the_token_embedding():
    torch.manual_seed(0)
    embed_VD = torch.randn(10, 6)
    torch.testing.assert_close(latent_from_probs(torch.eye(10)[[3, 7]], embed_VD), embed_VD[[3, 7]], atol=0, rtol=0)
    uniform_V = torch.zeros(10).index_fill_(0, torch.tensor([1, 2, 5, 9]), 0.25)     # ||p||_2 = 1/2
    torch.testing.assert_close(latent_from_probs(uniform_V[None], embed_VD)[0], embed_VD[[1, 2, 5, 9]].mean(0) * 2)


@pytest.mark.parametrize("cls", VARIANTS)
def test_the_gate_at_init_lies_in_r_min_to_one_and_equals_u_to_the_r(cls):
    torch.manual_seed(0)
    module = cls(64, r_min=0.99, r_max=0.999)
    with torch.no_grad():
        a_TD = module.retention(torch.randn(50, 64))
        assert float(a_TD.min()) > 0.99 and float(a_TD.max()) < 1.0
        u_D = torch.exp(-8.0 * torch.nn.functional.softplus(-module.thinking_residual_Lambda.Lambda))  # a at r = 1
        e_TD = torch.randn(50, 64)
        r_TD = torch.sigmoid(module.thinking_residual_gate_r(e_TD))
        assert float(u_D.min()) >= 0.99 - 1e-6 and float(u_D.max()) <= 0.999 + 1e-6
        torch.testing.assert_close(module.retention(e_TD), u_D ** r_TD)


def test_the_blend_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    module = ThinkingResidual(16, r_min=0.996, r_max=0.998)
    e_BTD, h_BTD = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    want_BTD, want_a = module.blend(e_BTD, h_BTD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_BTD, got_a = module.blend(e_BTD, h_BTD)
        mixed_BTD = module(e_BTD, h_BTD, torch.ones(2, 3, dtype=torch.bool))
    assert got_a.dtype == got_BTD.dtype == mixed_BTD.dtype == torch.float32
    torch.testing.assert_close(got_a, want_a, atol=0, rtol=0)          # bf16 would round a to 2^-8 steps
    torch.testing.assert_close(mixed_BTD, want_BTD, atol=0, rtol=0)


@pytest.mark.parametrize("cls", VARIANTS)
def test_without_thinking_positions_the_forward_is_the_plain_models_bit_for_bit(cls):
    plain, hybrid = tiny(), tiny(functools.partial(cls, r_min=0.5, r_max=0.6))
    ids_BT = torch.randint(8, 264, (2, 7))
    latents_BTD = torch.randn(2, 7, 32)
    with torch.no_grad():
        want = plain(ids_BT)
        assert torch.equal(hybrid(ids_BT), want)                          # same trunk init, no latents
        assert torch.equal(hybrid(ids_BT, latents_BTD=latents_BTD, thinking_BT=torch.zeros(2, 7, dtype=torch.bool)),
                           want)
        some_BT = torch.zeros(2, 7, dtype=torch.bool)
        some_BT[:, 4] = True
        blended = hybrid(ids_BT, latents_BTD=latents_BTD, thinking_BT=some_BT)
    assert torch.equal(blended[:, :4], want[:, :4]) and not torch.allclose(blended[:, 4:], want[:, 4:])
    with pytest.raises(ValueError, match="thinking module"):
        plain(ids_BT, latents_BTD=latents_BTD, thinking_BT=some_BT)


def test_gradients_reach_the_gates_lambda_and_projection_but_not_the_stored_latents():
    model = tiny(functools.partial(ProjectedThinkingResidual, r_min=0.5, r_max=0.6)).train()
    latents_BTD = torch.randn(2, 5, 32)
    model(torch.randint(8, 264, (2, 5)), latents_BTD=latents_BTD,
          thinking_BT=torch.ones(2, 5, dtype=torch.bool)).sum().backward()
    for name, p in model.thinking.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert latents_BTD.grad is None and not latents_BTD.requires_grad


@pytest.mark.parametrize("text, marker, thinking", [
    ("x ####5", "####", [1, 1, 1, 1, 1, 0, 0]),              # the token completing the marker is plain
    ("####ab", "####", [1, 1, 1, 0, 0, 0]),
    ("a 答案:9", "答案:", [1] * 8 + [0, 0]),                  # a marker made of byte-level pieces
    ("no marker here", "####", [1] * 14),
])
def test_a_row_thinks_until_its_text_contains_the_marker(text, marker, thinking):
    ids = TOKENIZER.encode(text)
    watch, finished_B = AnswerWatch(marker, DECODE, 1), torch.zeros(1, dtype=torch.bool)
    assert [int(watch.update(torch.tensor([i]), finished_B)) for i in ids] == thinking


def test_a_special_token_can_be_the_marker_and_finished_rows_never_think():
    end_think = TOKENIZER.special_tokens["</think>"]
    watch = AnswerWatch("</think>", DECODE, 2)
    steps = [([9, 9], [False, False]), ([end_think, 2], [False, False]), ([9, 0], [False, True])]
    assert [watch.update(torch.tensor(t), torch.tensor(f)).tolist() for t, f in steps] == \
        [[True, True], [False, True], [False, False]]


def sample(model, marker: str, seed: int = 1, n: int = 10):
    prompts = [TOKENIZER.encode(t, bos=True) for t in ("12+30=", "hello there", "a", "x*y")]
    return generate(model, prompts, n, TOKENIZER.eos_id, TOKENIZER.pad_id, temperature=0.7, seed=seed,
                    return_logprobs=True, thinking=ThinkingDecoder(marker, DECODE))


def replay(model, out) -> torch.Tensor:
    """Full-forward logits of every completion position with the stored latents (no cache)."""
    ids_BT = torch.cat([out.prompt_ids_BP, out.tokens_BN], 1)[:, :-1]
    P = out.prompt_ids_BP.shape[1]
    latents_BTD = torch.cat([torch.zeros(4, P, 32), out.latents_BND[:, :-1]], 1)
    thinking_BT = torch.cat([torch.zeros(4, P, dtype=torch.bool), out.thinking_BN[:, :-1]], 1)
    mask_BT = torch.cat([out.prompt_mask_BP, torch.ones_like(out.tokens_BN)], 1)[:, :-1]
    with torch.no_grad():
        return model(ids_BT, attention_mask_BT=mask_BT, latents_BTD=latents_BTD, thinking_BT=thinking_BT)[:, P - 1:]


@pytest.mark.parametrize("cls, attention", [(ThinkingResidual, None), (ProjectedThinkingResidual, None),
                                            (ThinkingResidual, functools.partial(
                                                MLAttention, n_heads=4, kv_lora_rank=16,
                                                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8))])
def test_cached_hrpo_decode_equals_a_full_recompute_with_the_stored_latents(cls, attention):
    kwargs = {} if attention is None else {"attention": attention}
    model = tiny(functools.partial(cls, r_min=0.3, r_max=0.5), **kwargs)     # a strong blend: a ~ 0.3-0.7
    first = sample(model, "never")
    row, marker = next((b, DECODE([t])) for b in range(4) for t in first.tokens_BN[b, 2:].tolist() if 40 <= t < 120)
    out = sample(model, marker)                                            # an ASCII character of that row
    assert out.thinking_BN.any() and not out.thinking_BN[row].all()        # the row stops thinking at the marker
    logp_BNV = (replay(model, out).float() / 0.7).log_softmax(-1)
    logp_BN = logp_BNV.gather(-1, out.tokens_BN[..., None]).squeeze(-1) * out.mask_BN
    torch.testing.assert_close(logp_BN, out.logprobs_BN, atol=1e-5, rtol=0)
    if cls is ThinkingResidual:                                            # the latents, too, from the recompute
        latents_BND = latent_from_probs(logp_BNV.exp().flatten(0, 1), model.embed.weight).view(4, -1, 32)
        keep_BN = out.mask_BN.bool()
        torch.testing.assert_close(latents_BND[keep_BN], out.latents_BND[keep_BN], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", [None, functools.partial(MLAttention, n_heads=4, kv_lora_rank=16,
                                                               qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)],
                         ids=["gqa", "mla"])
def test_hrpo_num_samples_gives_the_rows_of_each_prompt_passed_n_times(attention):
    kwargs = {} if attention is None else {"attention": attention}
    model = tiny(functools.partial(ThinkingResidual, r_min=0.3, r_max=0.5), **kwargs)
    prompts = [TOKENIZER.encode(t, bos=True) for t in ("12+30=", "hello there")]
    marker = DECODE([TOKENIZER.encode("e")[0]])
    run = functools.partial(generate, max_new_tokens=10, eos_id=TOKENIZER.eos_id, pad_id=TOKENIZER.pad_id,
                            temperature=0.7, seed=3, return_logprobs=True, thinking=ThinkingDecoder(marker, DECODE))
    shared, repeated = run(model, prompts, num_samples=3), run(model, [p for p in prompts for _ in range(3)])
    for name in ("tokens_BN", "mask_BN", "thinking_BN", "prompt_ids_BP", "prompt_mask_BP"):
        assert torch.equal(getattr(shared, name), getattr(repeated, name)), name
    for name in ("logprobs_BN", "latents_BND"):
        torch.testing.assert_close(getattr(shared, name), getattr(repeated, name), atol=1e-5, rtol=1e-5)


def test_greedy_hrpo_decode_takes_the_argmax_but_the_latent_of_the_training_temperature():
    """SPECS 5.5: evaluation picks argmax tokens, yet builds each latent from softmax(logits / tau),
    tau the rollouts' temperature (the module's latent_temperature), not from softmax(logits)."""
    model = tiny(functools.partial(ThinkingResidual, r_min=0.3, r_max=0.5, latent_temperature=0.5))
    prompts = [TOKENIZER.encode(t, bos=True) for t in ("12+30=", "hello there", "a", "x*y")]
    out = generate(model, prompts, 8, TOKENIZER.eos_id, TOKENIZER.pad_id, temperature=0.0,
                   thinking=thinking_decoder(model, TOKENIZER))
    logits_BNV, keep_BN = replay(model, out).float(), out.mask_BN.bool()
    assert out.thinking_BN[keep_BN].all()                                  # no marker: every token blended
    assert torch.equal(logits_BNV.argmax(-1)[keep_BN], out.tokens_BN[keep_BN])
    probs_KV = (logits_BNV[keep_BN] / 0.5).softmax(-1)
    torch.testing.assert_close(latent_from_probs(probs_KV, model.embed.weight), out.latents_BND[keep_BN],
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("option", ["hrpo", "hrpo_proj"])
def test_an_hrpo_model_decodes_greedily_at_the_strategys_temperature(option, tmp_path):
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    cfg = compose_cfg("strategy=grpo", f"model/thinking={option}", "strategy.temperature=0.5",
                      f"paths.output_dir={tmp_path}")
    assert instantiate(cfg.model.thinking)(dim=8).latent_temperature == 0.5


def test_hrpo_decoding_reads_past_sampled_padding_rows():
    """The answer watch decodes each row's recent tokens: an id no token owns (a model whose
    vocab_size exceeds the tokenizer's) has no text there, instead of failing the rollout."""
    torch.manual_seed(0)
    model = Transformer(vocab_size=300, dim=32, n_layers=2, attention=functools.partial(GQAttention, n_heads=4),
                        ffn=SwiGLU, thinking=ThinkingResidual).eval()
    prompts = [TOKENIZER.encode(t, bos=True) for t in ("12+30=", "hello there")]
    out = generate(model, prompts, 24, TOKENIZER.eos_id, TOKENIZER.pad_id, temperature=1.0, seed=3,
                   thinking=thinking_decoder(model, TOKENIZER))
    assert (out.tokens_BN >= TOKENIZER.vocab_size).any()      # random weights draw padding rows
