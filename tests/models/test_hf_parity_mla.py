"""Our MLA Transformer vs HF DeepseekV3ForCausalLM with the same weights (SPECS 2.4, 2.5)."""

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from safetensors.torch import save_file

from llmtrain.hf import deepseek
from llmtrain.models.attention_mla import MLAttention
from llmtrain.models.ffn import SwiGLU
from llmtrain.models.transformer import Transformer

transformers = pytest.importorskip("transformers")
if not hasattr(getattr(transformers, "DeepseekV3Config", object)(), "rope_interleave"):
    # Older DeepseekV3 always permutes q_pe/k_pe for interleaved RoPE (SPECS 2.4): no half-split export.
    pytest.skip("needs a transformers DeepseekV3 with the rope_interleave flag", allow_module_level=True)

V = 97


def random_model(tied: bool, q_lora_rank: int | None) -> Transformer:
    """V=97, D=64, L=2, H=4, C=32, nope 16, rope 8, v 12 (!= 24), F=176; non-default eps/theta."""
    torch.manual_seed(0)
    model = Transformer(
        vocab_size=V,
        dim=64,
        n_layers=2,
        attention=functools.partial(MLAttention, n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                                    qk_rope_head_dim=8, v_head_dim=12, q_lora_rank=q_lora_rank),
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
            elif name.endswith("w1.weight"):
                p.normal_(0, 0.15)  # w1 and w3 at different scales, so a swap shows
            elif name.endswith("w3.weight"):
                p.normal_(0, 0.05)
            else:
                p.normal_(0, 0.1)
    return model.eval()


def hf_twin(model: Transformer) -> torch.nn.Module:
    cfg = deepseek.hf_config(model)
    config = transformers.DeepseekV3Config(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    config._attn_implementation = "eager"
    hf = transformers.DeepseekV3ForCausalLM(config).to(torch.float32).eval()
    hf.load_state_dict(deepseek.to_hf_state_dict(model), strict=not model.tie_embeddings)
    return hf


CASES = [(tied, q_lora_rank) for tied in (True, False) for q_lora_rank in (None, 24)]


@pytest.mark.parametrize("tied, q_lora_rank", CASES)
def test_logits_and_loss_match_hf(tied, q_lora_rank):
    model = random_model(tied, q_lora_rank)
    hf = hf_twin(model)
    assert (hf.model.layers[0].self_attn.q_proj is None) == (q_lora_rank is not None)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(input_ids=ids, labels=ids)
    assert (ours - theirs.logits).abs().max() <= 1e-4  # all 12 positions: catches RoPE layout bugs
    loss = F.cross_entropy(ours[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, theirs.loss, atol=1e-5, rtol=1e-5)
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("tied, q_lora_rank", CASES)
def test_round_trip_gives_identical_tensors(tied, q_lora_rank):
    model = random_model(tied, q_lora_rank)
    copy = random_model(tied, q_lora_rank)
    with torch.no_grad():
        for p in copy.parameters():
            p.zero_()
    deepseek.from_hf_state_dict(deepseek.to_hf_state_dict(model), copy)
    for (name, a), (_, b) in zip(model.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(a, b), name
    if tied:
        assert copy.lm_head.weight is copy.embed.weight


def test_hf_state_dict_loads_back_from_hf_model():
    model = random_model(tied=True, q_lora_rank=24)
    copy = random_model(tied=True, q_lora_rank=24)
    with torch.no_grad():
        copy.embed.weight.zero_()
    deepseek.from_hf_state_dict(hf_twin(model).state_dict(), copy)  # HF's dict carries lm_head.weight too
    assert torch.equal(copy.embed.weight, model.embed.weight)


def test_config_is_dense_mla_with_half_split_rope():
    cfg = deepseek.hf_config(random_model(tied=True, q_lora_rank=None))
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"] == 4
    assert cfg["first_k_dense_replace"] == cfg["num_hidden_layers"] == 2
    assert cfg["rope_interleave"] is False and cfg["q_lora_rank"] is None
    assert (cfg["kv_lora_rank"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]) == (32, 16, 8, 12)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}
    assert cfg["tie_word_embeddings"] is True and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert deepseek.hf_config(random_model(True, None), n_routed_experts=8)["n_routed_experts"] == 8


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_model_node_rebuilds_the_architecture(q_lora_rank):
    model = random_model(tied=False, q_lora_rank=q_lora_rank)
    rebuilt = instantiate(deepseek.model_node(deepseek.hf_config(model)))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert (rebuilt.norm.eps, rebuilt.rope.theta, rebuilt.tie_embeddings) == (1e-5, 1e6, False)


@pytest.mark.parametrize("key, value", [("rope_interleave", True), ("first_k_dense_replace", 1),
                                        ("num_key_value_heads", 2)])
def test_model_node_refuses_what_llmtrain_cannot_build(key, value):
    cfg = deepseek.hf_config(random_model(tied=True, q_lora_rank=None)) | {key: value}
    with pytest.raises(ValueError, match=f"{key}={value!r}"):
        deepseek.model_node(cfg)


def test_shape_mismatch_and_unknown_names_are_refused_by_name():
    model = random_model(tied=True, q_lora_rank=None)
    state = deepseek.to_hf_state_dict(model)
    state["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(4 * 28, 31)
    with pytest.raises(ValueError, match=r"kv_b_proj\.weight.*\(112, 31\).*\(112, 32\)"):
        deepseek.from_hf_state_dict(state, model)
    state = deepseek.to_hf_state_dict(model) | {"model.layers.0.self_attn.q_a_proj.weight": torch.zeros(24, 64)}
    with pytest.raises(ValueError, match="unexpected tensors.*q_a_proj"):
        deepseek.from_hf_state_dict(state, model)


def test_export_refuses_a_latent_norm_eps_hf_cannot_express():
    model = random_model(tied=True, q_lora_rank=None)
    model.layers[1].attn.kv_norm.eps = 1e-5
    with pytest.raises(ValueError, match="eps 1e-06.*layer 1.*1e-05"):
        deepseek.to_hf_state_dict(model)


def test_saved_folder_loads_with_auto_model(tmp_path):
    model = random_model(tied=True, q_lora_rank=24)
    (tmp_path / "config.json").write_text(json.dumps(deepseek.hf_config(model, 1, 2, 0)))
    save_file(deepseek.to_hf_state_dict(model), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - hf.eval()(input_ids=ids).logits).abs().max() <= 1e-4
