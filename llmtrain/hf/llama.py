"""Conversion between llmtrain's Transformer and HF `LlamaForCausalLM` / `Qwen2ForCausalLM`.

llmtrain uses the half-split RoPE layout of HF, so the weights map by name alone (SPECS 1.7);
no q/k permutation is needed. A tied model is written without `lm_head.weight` and with
`tie_word_embeddings: true`, which HF re-ties on load (SPECS 1.6). Qwen2 is Llama plus biases
on q/k/v (and none on o_proj), which is what GQAttention(bias=True) builds.
"""

from torch import Tensor

from llmtrain.hf.common import base_config, load_renamed, pop_tied_head, rope_scaling, untied_state
from llmtrain.models.attention_gqa import GQAttention
from llmtrain.models.ffn import SwiGLU
from llmtrain.models.transformer import Transformer

_TOP_LEVEL = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wv.bias": "self_attn.v_proj.bias",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
}


def hf_name(name: str) -> str:
    """HF Llama name of an llmtrain parameter name, e.g. layers.0.ffn.w1.weight -> ...gate_proj.weight."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _PER_LAYER:
        return f"model.layers.{parts[1]}.{_PER_LAYER[parts[2]]}"
    raise ValueError(f"llmtrain tensor {name!r} has no Llama/Qwen2 counterpart")


def to_hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The model's weights under HF Llama/Qwen2 names; contiguous, lm_head left out when tied."""
    _check_exportable(model)
    return {hf_name(name): tensor.contiguous() for name, tensor in untied_state(model).items()}


def from_hf_state_dict(state: dict[str, Tensor], model: Transformer) -> None:
    """Load HF Llama/Qwen2 weights into `model` in place (the inverse of `to_hf_state_dict`).

    Args:
        state: HF names to tensors. For a tied model an `lm_head.weight` entry (HF's own
            `state_dict()` has one) is accepted only if it equals the embedding.
        model: A Transformer whose sizes match the checkpoint.

    Raises:
        ValueError: A name is missing or unexpected, a shape differs, or a tied model is given
            an lm_head different from its embedding.
    """
    _check_exportable(model)
    state = dict(state)
    pop_tied_head(state, model)
    load_renamed(state, model, hf_name)




def llama_config(
    model: Transformer,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict:
    """The config.json dict of SPECS 1.7 for `model` (Qwen2 when the attention has biases).

    Both `rope_theta` (read by transformers 4.x) and `rope_parameters` (5.x) are written.
    """
    _check_exportable(model)
    attn, ffn = model.layers[0].attn, model.layers[0].ffn
    qwen2 = attn.wq.bias is not None
    config = {
        **base_config(model, bos_token_id, eos_token_id, pad_token_id),
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "intermediate_size": ffn.hidden_dim,
        "num_attention_heads": attn.n_heads,
        "num_key_value_heads": attn.n_kv_heads,
        "head_dim": attn.head_dim,
    }
    if not qwen2:
        config |= {"attention_bias": False, "mlp_bias": False}
    return config


ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def can_export(model: Transformer) -> bool:
    """Whether every layer is GQAttention + SwiGLU (the Llama/Qwen2 shape)."""
    return all(isinstance(layer.attn, GQAttention) and isinstance(layer.ffn, SwiGLU) for layer in model.layers)


def hf_config(model: Transformer, bos_token_id: int | None, eos_token_id: int | None,
              pad_token_id: int | None) -> dict:
    return llama_config(model, bos_token_id, eos_token_id, pad_token_id)


def model_node(config: dict) -> dict:
    """The llmtrain `model` config node that rebuilds a Llama/Qwen2 checkpoint's architecture.

    Raises:
        ValueError: naming the config.json key this converter cannot reproduce.
    """
    qwen2 = config["architectures"][0] == "Qwen2ForCausalLM"
    rope = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = rope_scaling(config)
    found = {   # config.json key -> (its value, whether llmtrain can reproduce it)
        "hidden_act": (config.get("hidden_act", "silu"), config.get("hidden_act", "silu") == "silu"),
        "rope_scaling": (scaling, not scaling),
        "attention_bias": (config.get("attention_bias", False), qwen2 or not config.get("attention_bias", False)),
        "mlp_bias": (config.get("mlp_bias", False), not config.get("mlp_bias", False)),
        "use_sliding_window": (config.get("use_sliding_window", False), not config.get("use_sliding_window", False)),
    }
    if bad := [f"{key}={value!r}" for key, (value, ok) in found.items() if not ok]:
        raise ValueError(f"config.json: {', '.join(bad)} is not supported by llmtrain's GQA model")
    n_heads = config["num_attention_heads"]
    return {
        "_target_": "llmtrain.models.transformer.Transformer",
        "vocab_size": config["vocab_size"],
        "dim": config["hidden_size"],
        "n_layers": config["num_hidden_layers"],
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": float(theta),
        "max_seq_len": config.get("max_position_embeddings", 2048),
        "tie_embeddings": config.get("tie_word_embeddings", False),
        "init_std": config.get("initializer_range", 0.02),
        "attention": {"_target_": "llmtrain.models.attention_gqa.GQAttention", "_partial_": True,
                      "n_heads": n_heads, "n_kv_heads": config.get("num_key_value_heads", n_heads),
                      "head_dim": config.get("head_dim") or config["hidden_size"] // n_heads, "bias": qwen2},
        "ffn": {"_target_": "llmtrain.models.ffn.SwiGLU", "_partial_": True,
                "hidden_dim": config["intermediate_size"]},
    }


def _check_exportable(model: Transformer) -> None:
    for i, layer in enumerate(model.layers):
        if not isinstance(layer.attn, GQAttention) or not isinstance(layer.ffn, SwiGLU):
            raise ValueError(
                f"Llama/Qwen2 export needs GQAttention and SwiGLU, layer {i} has "
                f"{type(layer.attn).__name__} and {type(layer.ffn).__name__}"
            )
