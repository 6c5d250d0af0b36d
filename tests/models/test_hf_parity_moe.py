"""Our GQA + MoE Transformer vs HF Qwen2MoeForCausalLM loaded from a saved folder (SPECS 3.3)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from llmtrain.hf import qwen2_moe
from llmtrain.models.attention_gqa import GQAttention
from llmtrain.models.moe import MoE
from llmtrain.models.transformer import Transformer

transformers = pytest.importorskip("transformers")


def random_model(tied: bool = True, bias: bool = False, **moe) -> Transformer:
    """V=97, D=64, L=2, H=8, Hkv=2, E=4, K=2, Ns=1, I=32, non-default eps/theta, non-trivial weights."""
    torch.manual_seed(0)
    model = Transformer(
        vocab_size=97, dim=64, n_layers=2, norm_eps=1e-5, rope_theta=1e6, max_seq_len=64, tie_embeddings=tied,
        attention=functools.partial(GQAttention, n_heads=8, n_kv_heads=2, bias=bias),
        ffn=functools.partial(MoE, **{"n_routed_experts": 4, "n_experts_per_tok": 2, "n_shared_experts": 1,
                                      "expert_hidden_dim": 32} | moe),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("w1.weight"):
                p.normal_(0, 0.15)     # w1 and w3 at different scales, so a swap shows
            elif name.endswith("gate.weight"):
                p.normal_(0, 0.5)      # a decisive router, so a wrong top-K or weight shows
            else:
                p.normal_(0, 0.1 if not name.endswith("bias") else 0.05)
    return model.eval()


def save(model: Transformer, path) -> None:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(qwen2_moe.hf_config(model, 1, 2, 0)))
    save_file(qwen2_moe.to_hf_state_dict(model), str(path / "model.safetensors"), metadata={"format": "pt"})


def load_hf(path) -> torch.nn.Module:
    hf, info = transformers.Qwen2MoeForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return hf.eval()


CASES = [{}, {"tied": False, "bias": True}, {"n_experts_per_tok": 1},
         {"norm_topk_prob": False, "routed_scaling_factor": 2.0, "n_shared_experts": 2}]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_logits_match_hf_loaded_from_hub_style_folder(case, tmp_path):
    model = random_model(**case)
    save(model, tmp_path / "hf")
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in load_file(str(tmp_path / "hf" / "model.safetensors"))
    hf = load_hf(tmp_path / "hf")
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - hf(input_ids=ids).logits).abs().max() <= 1e-4    # all 12 positions


def test_round_trip_from_disk_and_from_hf_memory_gives_identical_tensors(tmp_path):
    model = random_model(routed_scaling_factor=2.0)
    save(model, tmp_path / "hf")
    hf_memory = load_hf(tmp_path / "hf").state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in hf_memory   # transformers 5.x fuses the experts
    for state in (load_file(str(tmp_path / "hf" / "model.safetensors")), hf_memory):
        copy = random_model(routed_scaling_factor=2.0)
        with torch.no_grad():
            for p in copy.parameters():
                p.zero_()
        qwen2_moe.from_hf_state_dict(state, copy)
        for (name, a), (_, b) in zip(model.state_dict().items(), copy.state_dict().items()):
            assert torch.equal(a, b), name


def test_model_node_rebuilds_the_architecture(tmp_path):
    model = random_model(n_experts_per_tok=1, bias=True)
    save(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    rebuilt = instantiate(qwen2_moe.model_node(config)).eval()
    qwen2_moe.from_hf_state_dict(load_file(str(tmp_path / "hf" / "model.safetensors")), rebuilt)
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids), model(ids))
    assert rebuilt.layers[0].ffn.aux_loss_coef == pytest.approx(model.layers[0].ffn.aux_loss_coef)


def test_the_exported_aux_coefficient_gives_the_same_balance_loss_in_transformers(tmp_path):
    """HF pools the L layers' routers into one loss (K at uniform routing); ours sums one term per layer
    (1 each): at near-uniform routing coef * aux agrees, and import gives the coefficient back."""
    from llmtrain.models.moe import collect_aux_loss

    model = random_model(aux_loss_coef=0.01, seq_aux=False).train()
    with torch.no_grad():
        for layer in model.layers:
            layer.ffn.gate.weight.mul_(0.001)                       # near-uniform routing
    save(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf = load_hf(tmp_path / "hf").train()
    ids = torch.randint(0, 97, (4, 64), generator=torch.Generator().manual_seed(0))
    model(ids)
    ours = collect_aux_loss(model).item()
    theirs = config["router_aux_loss_coef"] * hf(ids, output_router_logits=True).aux_loss.item()
    assert ours == pytest.approx(0.01 * model.n_layers, rel=0.01) and theirs == pytest.approx(ours, rel=0.01)
    plain = {k: v for k, v in config.items() if k != qwen2_moe.LLMTRAIN_KEY}       # as a Hub checkpoint has it
    assert instantiate(qwen2_moe.model_node(plain)).layers[0].ffn.aux_loss_coef == pytest.approx(0.01)


def test_mismatched_and_unknown_tensors_are_refused_by_name():
    model = random_model()
    state = qwen2_moe.to_hf_state_dict(model)
    with pytest.raises(ValueError, match=r"experts\.2\.up_proj\.weight.*\(31, 64\).*\(32, 64\)"):
        qwen2_moe.from_hf_state_dict(state | {"model.layers.0.mlp.experts.2.up_proj.weight": torch.zeros(31, 64)},
                                     model)
    with pytest.raises(ValueError, match=r"unexpected tensors.*experts\.4\.gate_proj"):
        qwen2_moe.from_hf_state_dict(state | {"model.layers.0.mlp.experts.4.gate_proj.weight": torch.zeros(32, 64)},
                                     model)
    with pytest.raises(ValueError, match=r"shared_expert_gate\.weight.*not zero"):
        qwen2_moe.from_hf_state_dict(state | {"model.layers.1.mlp.shared_expert_gate.weight": torch.ones(1, 64)},
                                     model)
    with pytest.raises(ValueError, match=r"k_proj\.bias.*not zero"):
        qwen2_moe.from_hf_state_dict(state | {"model.layers.0.self_attn.k_proj.bias": torch.ones(16)}, model)


def test_unsupported_models_and_configs_are_refused():
    assert not qwen2_moe.can_export(Transformer(vocab_size=10, dim=16, n_layers=1, attention=functools.partial(
        GQAttention, n_heads=2), ffn=functools.partial(torch.nn.Identity)))
    with pytest.raises(ValueError, match="n_shared_experts >= 1"):
        qwen2_moe.hf_config(random_model(n_shared_experts=0))
    config = qwen2_moe.hf_config(random_model()) | {"norm_topk_prob": True, "num_experts_per_tok": 1}
    with pytest.raises(ValueError, match="norm_topk_prob=True"):
        qwen2_moe.model_node(config)


ROUND_TRIPS = [{}, {"bias": True, "tied": False}, {"n_experts_per_tok": 1},
               {"routed_scaling_factor": 4.0, "seq_aux": False, "aux_loss_coef": 0.003, "norm_topk_prob": False}]
MOE_OPTIONS = ("n_routed_experts", "n_experts_per_tok", "n_shared_experts", "expert_hidden_dim", "norm_topk_prob",
               "routed_scaling_factor", "aux_loss_coef", "seq_aux")


def rebuilt_from_folder(path) -> Transformer:
    rebuilt = instantiate(qwen2_moe.model_node(json.loads((path / "config.json").read_text())))
    qwen2_moe.from_hf_state_dict(load_file(str(path / "model.safetensors")), rebuilt)
    return rebuilt.eval()


@pytest.mark.parametrize("case", ROUND_TRIPS, ids=[str(c) for c in ROUND_TRIPS])
def test_export_then_import_gives_back_the_state_dict_and_options(case, tmp_path):
    """SPECS 1.7: no q/k/v biases gained, the scaling factor and the balance settings kept."""
    model = random_model(**case)
    save(model, tmp_path / "hf")
    rebuilt = rebuilt_from_folder(tmp_path / "hf")
    original, back = model.state_dict(), rebuilt.state_dict()
    assert list(back) == list(original)
    assert all(torch.equal(back[name], original[name]) for name in original)
    for ours, theirs in zip(model.layers, rebuilt.layers):
        assert {k: getattr(theirs.ffn, k) for k in MOE_OPTIONS} == {k: getattr(ours.ffn, k) for k in MOE_OPTIONS}
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids), model(ids))
    load_hf(tmp_path / "hf")                 # transformers still reads the folder (the extra key is ignored)


def test_a_scaling_factor_that_is_no_power_of_two_comes_back_within_one_rounding(tmp_path):
    model = random_model(routed_scaling_factor=2.5)
    save(model, tmp_path / "hf")
    rebuilt = rebuilt_from_folder(tmp_path / "hf")
    assert rebuilt.layers[0].ffn.routed_scaling_factor == 2.5
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[name], tensor, atol=0, rtol=1.2e-7)   # 1 ulp
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids), model(ids), atol=1e-5, rtol=1e-5)


def test_a_folder_without_the_llmtrain_key_reads_as_qwen2_moe_describes_it(tmp_path):
    config = qwen2_moe.hf_config(random_model())
    del config[qwen2_moe.LLMTRAIN_KEY]
    node = qwen2_moe.model_node(config)
    assert node["attention"]["bias"] is True and node["ffn"]["routed_scaling_factor"] == 1.0
