"""Our Transformer vs HF LlamaForCausalLM / Qwen2ForCausalLM with the same weights (SPECS 1.7)."""

import functools

import pytest
import torch
import torch.nn.functional as F

from llmtrain.hf import from_hf_state_dict, llama_config, to_hf_state_dict
from llmtrain.models.attention_gqa import GQAttention
from llmtrain.models.ffn import SwiGLU
from llmtrain.models.transformer import Transformer

transformers = pytest.importorskip("transformers")


def random_model(tied: bool, bias: bool) -> Transformer:
    """V=97, D=64, L=2, H=8, Hkv=2, F=176 with non-default eps/theta and non-trivial weights."""
    torch.manual_seed(0)
    model = Transformer(
        vocab_size=97,
        dim=64,
        n_layers=2,
        attention=functools.partial(GQAttention, n_heads=8, n_kv_heads=2, bias=bias),
        ffn=functools.partial(SwiGLU, hidden_dim=176),
        norm_eps=1e-5,
        rope_theta=1e6,
        max_seq_len=64,
        tie_embeddings=tied,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # gains of one would never test the norm mapping
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            elif name.endswith("w1.weight"):
                p.normal_(0, 0.15)  # w1 and w3 at different scales, so a swap shows
            elif name.endswith("w3.weight"):
                p.normal_(0, 0.05)
            else:
                p.normal_(0, 0.1)
    return model.eval()


def hf_twin(model: Transformer) -> torch.nn.Module:
    cfg = llama_config(model)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[cfg["model_type"]]
    config = config_cls(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    config._attn_implementation = "eager"
    hf = model_cls(config).to(torch.float32).eval()
    hf.load_state_dict(to_hf_state_dict(model), strict=not model.tie_embeddings)
    return hf


CASES = [(tied, bias) for tied in (True, False) for bias in (False, True)]


@pytest.mark.parametrize("tied, bias", CASES)
def test_logits_and_loss_match_hf(tied, bias):
    model = random_model(tied, bias)
    hf = hf_twin(model)
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if bias else "LlamaForCausalLM")
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(input_ids=ids, labels=ids)
    assert (ours - theirs.logits).abs().max() <= 1e-4  # all 12 positions: catches RoPE layout bugs
    loss = F.cross_entropy(ours[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, theirs.loss, atol=1e-5, rtol=1e-5)
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("tied, bias", CASES)
def test_round_trip_gives_identical_tensors(tied, bias):
    model = random_model(tied, bias)
    copy = random_model(tied, bias)
    with torch.no_grad():
        for p in copy.parameters():
            p.zero_()
    from_hf_state_dict(to_hf_state_dict(model), copy)
    for (name, a), (_, b) in zip(model.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(a, b), name
    if tied:
        assert copy.lm_head.weight is copy.embed.weight


def test_hf_state_dict_loads_back_from_hf_model():
    model = random_model(tied=True, bias=False)
    copy = random_model(tied=True, bias=False)
    from_hf_state_dict(hf_twin(model).state_dict(), copy)  # HF's dict carries lm_head.weight too
    assert torch.equal(copy.embed.weight, model.embed.weight)


def test_export_is_contiguous_and_omits_tied_head():
    state = to_hf_state_dict(random_model(tied=True, bias=False))
    assert "lm_head.weight" not in state and all(t.is_contiguous() for t in state.values())
    assert "lm_head.weight" in to_hf_state_dict(random_model(tied=False, bias=False))


def test_config_carries_non_default_values():
    cfg = llama_config(random_model(tied=True, bias=False))
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 1e6
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}
    assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"]) == (2, 8, 176)
    assert cfg["tie_word_embeddings"] is True and cfg["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("extra, refused", [
    ({"rope_scaling": {"rope_type": "default"}}, False),
    ({"rope_scaling": {"type": "default"}}, False),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, True),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, True),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, True),
])
def test_import_takes_plain_rope_however_it_is_spelled_and_refuses_scaling(extra, refused):
    from llmtrain.hf import llama

    config = llama_config(random_model(tied=True, bias=False)) | extra
    if refused:
        with pytest.raises(ValueError, match="rope_scaling="):
            llama.model_node(config)
    else:
        assert llama.model_node(config)["rope_theta"] == 1e6


def test_shape_mismatch_names_tensor_and_shapes():
    state = to_hf_state_dict(random_model(tied=True, bias=False))
    state["model.norm.weight"] = torch.ones(65)
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(65,\).*\(64,\)"):
        from_hf_state_dict(state, random_model(tied=True, bias=False))


def test_unexpected_and_untied_head_are_refused():
    model = random_model(tied=True, bias=False)
    state = to_hf_state_dict(model) | {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    with pytest.raises(ValueError, match="unexpected tensors.*q_proj.bias"):
        from_hf_state_dict(state, model)
    state = to_hf_state_dict(model) | {"lm_head.weight": torch.zeros(97, 64)}
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        from_hf_state_dict(state, model)
