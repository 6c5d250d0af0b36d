"""Conversion between llmtrain's MLA Transformer and HF `DeepseekV3ForCausalLM` (SPECS 2.4).

The weights map by name alone:

| llmtrain (MLAttention)             | HF DeepseekV3 (`model.layers.{i}.self_attn.`) |
|------------------------------------|-----------------------------------------------|
| wq (q_lora_rank null)              | q_proj                                        |
| wq_a, q_norm, wq_b                 | q_a_proj, q_a_layernorm, q_b_proj             |
| wkv_a (rows [latent ; rope])       | kv_a_proj_with_mqa                            |
| kv_norm                            | kv_a_layernorm                                |
| wkv_b (per head [k_nope ; v])      | kv_b_proj                                     |
| wo                                 | o_proj                                        |

- RoPE: llmtrain rotates half-split pairs, so the config says `rope_interleave: false` and no rope
  row is permuted (HF's default `true` would permute q_pe/k_pe as for DeepSeek's complex RoPE).
- Dense SwiGLU in every layer: `first_k_dense_replace = num_hidden_layers`; HF still validates
  the MoE fields, so they get small placeholder values (`hf_config(..., **moe_fields)` replaces
  them for an MLA + MoE export).
- HF builds the two latent RMSNorms with eps 1e-6 whatever `rms_norm_eps` says, so export
  requires the attention's norm_eps to be 1e-6; the block norms use `rms_norm_eps`.
- No GQA inside MLA: `num_key_value_heads = num_attention_heads`.
- A tied model is written without `lm_head.weight` and with `tie_word_embeddings: true`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from llmtrain.hf.common import base_config, load_renamed, pop_tied_head, rope_scaling, untied_state
from llmtrain.models.attention_mla import MLAttention
from llmtrain.models.ffn import SwiGLU
from llmtrain.models.transformer import Transformer

ARCHITECTURES = ("DeepseekV3ForCausalLM",)
HF_LATENT_NORM_EPS = 1e-6  # DeepseekV3Attention builds q_a_layernorm / kv_a_layernorm with the default eps

_TOP_LEVEL = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
}
# Valid, minimal MoE fields for a model whose layers are all dense (first_k_dense_replace = L).
DENSE_MOE_FIELDS = {
    "n_routed_experts": 1,
    "n_shared_experts": 1,
    "num_experts_per_tok": 1,
    "moe_intermediate_size": 1,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
}


def hf_name(name: str) -> str:
    """HF DeepseekV3 name of an llmtrain parameter name, e.g. layers.0.attn.wkv_b.weight -> ...kv_b_proj.weight."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _PER_LAYER:
        return f"model.layers.{parts[1]}.{_PER_LAYER[parts[2]]}"
    raise ValueError(f"llmtrain tensor {name!r} has no DeepseekV3 counterpart")


def can_export(model: Transformer) -> bool:
    """Whether every layer is MLAttention + SwiGLU (a dense DeepSeek-V3 shape)."""
    return all(isinstance(layer.attn, MLAttention) and isinstance(layer.ffn, SwiGLU) for layer in model.layers)


def to_hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The model's weights under HF DeepseekV3 names; contiguous, lm_head left out when tied."""
    _check_exportable(model)
    return {hf_name(name): tensor.contiguous() for name, tensor in untied_state(model).items()}


def from_hf_state_dict(state: dict[str, Tensor], model: Transformer) -> None:
    """Load HF DeepseekV3 weights into `model` in place (the inverse of `to_hf_state_dict`).

    Args:
        state: HF names to tensors. For a tied model an `lm_head.weight` entry (HF's own
            `state_dict()` has one) is accepted only if it equals the embedding.
        model: An MLA Transformer whose sizes match the checkpoint.

    Raises:
        ValueError: naming the tensor that is missing, unexpected or of the wrong shape, or a tied
            model given an lm_head different from its embedding.
    """
    _check_exportable(model)
    state = dict(state)
    pop_tied_head(state, model)
    load_renamed(state, model, hf_name)


def hf_config(model: Transformer, bos_token_id: int | None = None, eos_token_id: int | None = None,
              pad_token_id: int | None = None, **moe_fields: Any) -> dict:
    """The config.json dict of a DeepseekV3ForCausalLM with `model`'s sizes (SPECS 2.4).

    Args:
        model: An MLA Transformer (every layer MLAttention + SwiGLU).
        bos_token_id, eos_token_id, pad_token_id: Written as given.
        moe_fields: Replace `DENSE_MOE_FIELDS` and `first_k_dense_replace` (default: every layer
            dense); for an MLA + MoE export.
    """
    _check_exportable(model)
    attn = model.layers[0].attn
    moe = DENSE_MOE_FIELDS | {"first_k_dense_replace": model.n_layers} | moe_fields
    return {
        **base_config(model, bos_token_id, eos_token_id, pad_token_id),
        "architectures": list(ARCHITECTURES),
        "model_type": "deepseek_v3",
        "intermediate_size": model.layers[0].ffn.hidden_dim,
        "num_attention_heads": attn.n_heads,
        "num_key_value_heads": attn.n_heads,  # every head has its own k_nope and v
        "q_lora_rank": attn.q_lora_rank,
        "kv_lora_rank": attn.kv_lora_rank,
        "qk_nope_head_dim": attn.qk_nope_head_dim,
        "qk_rope_head_dim": attn.qk_rope_head_dim,
        "v_head_dim": attn.v_head_dim,
        "rope_interleave": False,  # half-split RoPE, as llmtrain's
        "attention_bias": False,
        **moe,
        "num_nextn_predict_layers": 0,  # no multi-token-prediction module
    }


def model_node(config: dict) -> dict:
    """The llmtrain `model` node that rebuilds a dense, half-split-RoPE DeepseekV3 checkpoint.

    Raises:
        ValueError: naming the config.json keys llmtrain's MLA model cannot reproduce.
    """
    n_layers, n_heads = config["num_hidden_layers"], config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    scaling = rope_scaling(config)
    found = {   # config.json key -> (its value, whether llmtrain reproduces it)
        "rope_interleave": (config.get("rope_interleave", True), config.get("rope_interleave", True) is False),
        "first_k_dense_replace": (config.get("first_k_dense_replace"),
                                  (config.get("first_k_dense_replace") or 0) >= n_layers),
        "num_key_value_heads": (config.get("num_key_value_heads", n_heads),
                                config.get("num_key_value_heads", n_heads) == n_heads),
        "rope_scaling": (scaling, not scaling),
        "attention_bias": (config.get("attention_bias", False), not config.get("attention_bias", False)),
        "hidden_act": (config.get("hidden_act", "silu"), config.get("hidden_act", "silu") == "silu"),
    }
    if bad := [f"{key}={value!r}" for key, (value, ok) in found.items() if not ok]:
        raise ValueError(f"config.json: {', '.join(bad)} is not supported by llmtrain's MLA model (half-split "
                         "RoPE, every layer dense, no rope scaling, no biases)")
    return {
        "_target_": "llmtrain.models.transformer.Transformer",
        "vocab_size": config["vocab_size"],
        "dim": config["hidden_size"],
        "n_layers": n_layers,
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": float(config.get("rope_theta", rope.get("rope_theta", 10000.0))),
        "max_seq_len": config.get("max_position_embeddings", 4096),
        "tie_embeddings": config.get("tie_word_embeddings", False),
        "init_std": config.get("initializer_range", 0.02),
        "attention": {"_target_": "llmtrain.models.attention_mla.MLAttention", "_partial_": True,
                      "n_heads": n_heads, "kv_lora_rank": config["kv_lora_rank"],
                      "qk_nope_head_dim": config["qk_nope_head_dim"], "qk_rope_head_dim": config["qk_rope_head_dim"],
                      "v_head_dim": config["v_head_dim"], "q_lora_rank": config.get("q_lora_rank"),
                      "norm_eps": HF_LATENT_NORM_EPS},
        "ffn": {"_target_": "llmtrain.models.ffn.SwiGLU", "_partial_": True,
                "hidden_dim": config["intermediate_size"]},
    }




def _check_exportable(model: Transformer) -> None:
    for i, layer in enumerate(model.layers):
        if not isinstance(layer.attn, MLAttention) or not isinstance(layer.ffn, SwiGLU):
            raise ValueError(f"DeepseekV3 export needs MLAttention and SwiGLU, layer {i} has "
                             f"{type(layer.attn).__name__} and {type(layer.ffn).__name__}")
        for norm in (getattr(layer.attn, "q_norm", None), layer.attn.kv_norm):
            if norm is not None and norm.eps != HF_LATENT_NORM_EPS:
                raise ValueError(f"DeepseekV3 builds its latent RMSNorms with eps {HF_LATENT_NORM_EPS}; layer {i} "
                                 f"of this model uses {norm.eps} (model.attention.norm_eps)")
