"""Conversion between llmtrain's GQA + MoE Transformer and HF `Qwen2MoeForCausalLM` (SPECS 3.3).

Qwen2-MoE computes softmax -> top-K -> (renormalise) -> routed experts + a shared expert, like
MiniMind 2025, with differences that the conversion absorbs exactly (inverted on import):

| llmtrain                                 | Qwen2-MoE                            | on export                          |
|------------------------------------------|--------------------------------------|------------------------------------|
| shared expert added as is                | times sigmoid(shared_expert_gate(u)) | gate zeros (0.5), shared w2 x 2    |
| routed weights x routed_scaling_factor   | no scaling factor                    | routed experts' w2 x the factor    |
| no q/k/v biases (GQAttention bias=False) | q/k/v biases (`qkv_bias`)            | zero biases                        |
| K = 1 never renormalises                 | renormalises when norm_topk_prob     | norm_topk_prob false when K = 1    |

Names are the Hub's per-expert names (`mlp.experts.{e}.gate_proj.weight`, ...), i.e. what a
saved folder holds; transformers 5.x fuses them on load into `mlp.experts.gate_up_proj`
(E, 2I, D) and `mlp.experts.down_proj` (E, D, I), and `from_hf_state_dict` accepts that in-memory
form too. Import refuses a non-zero shared_expert_gate or non-zero q/k/v biases for a model
without biases, since llmtrain could not reproduce them (so Hub Qwen1.5-MoE checkpoints, whose
shared expert is gated, are refused by name). RoPE uses the half-split layout on both sides.

The last three rows hide llmtrain options that config.json has no key for (a zero
bias looks like a trained one; `qkv_bias` must stay true for transformers 4.x). The export records
them, with the exact aux-loss settings, under config.json's `"llmtrain"` key (the `attention` and
`ffn` fields of the model node; transformers keeps unknown keys and ignores them), and `model_node`
applies it, so export then import gives back the same state dict and options (SPECS 1.7). Exact
for a `routed_scaling_factor` that is a power of two; any other factor, folded into the routed w2
and divided out again, brings them back within one rounding (fp32, 2.5: 7% of entries 1 ulp off).
A folder without the key (a Hub checkpoint) is read as Qwen2-MoE describes it.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from llmtrain.hf import llama
from llmtrain.hf.common import base_config, load_renamed, pop_tied_head, untied_state
from llmtrain.models.attention_gqa import GQAttention
from llmtrain.models.moe import MoE
from llmtrain.models.transformer import Transformer

ARCHITECTURES = ("Qwen2MoeForCausalLM",)
LLMTRAIN_KEY = "llmtrain"       # config.json: {"attention": {...}, "ffn": {...}} merged into the model node

_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MOE_NAMES = [   # llmtrain name pattern -> HF name template
    (re.compile(r"layers\.(\d+)\.ffn\.gate\.weight"), "model.layers.{0}.mlp.gate.weight"),
    (re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight"),
     "model.layers.{0}.mlp.experts.{1}.{2}.weight"),
    (re.compile(r"layers\.(\d+)\.ffn\.shared\.(w[123])\.weight"),
     "model.layers.{0}.mlp.shared_expert.{1}.weight"),
]


def hf_name(name: str) -> str:
    """HF Qwen2-MoE name of an llmtrain parameter name, e.g. layers.0.ffn.experts.3.w1.weight ->
    model.layers.0.mlp.experts.3.gate_proj.weight; attention, norms and embeddings as for Llama."""
    for pattern, template in _MOE_NAMES:
        if match := pattern.fullmatch(name):
            return template.format(*(_PROJ.get(group, group) for group in match.groups()))
    return llama.hf_name(name)


def can_export(model: Transformer) -> bool:
    """Whether every layer is GQAttention + MoE (the Qwen2-MoE shape)."""
    return all(isinstance(layer.attn, GQAttention) and isinstance(layer.ffn, MoE) for layer in model.layers)


def to_hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The model's weights under Hub Qwen2-MoE names (per expert), contiguous, lm_head left out when tied."""
    _check_exportable(model)
    state = {hf_name(name): (t * _scale(model, name)).contiguous() for name, t in untied_state(model).items()}
    for i, layer in enumerate(model.layers):
        weight = layer.ffn.gate.weight
        state[f"model.layers.{i}.mlp.shared_expert_gate.weight"] = weight.new_zeros(1, weight.shape[1])
        state |= {name: weight.new_zeros(n) for name, n in _absent_biases(i, layer)}
    return state


def from_hf_state_dict(state: dict[str, Tensor], model: Transformer) -> None:
    """Load Qwen2-MoE weights (per-expert Hub names, or transformers 5.x fused names) into `model`.

    Raises:
        ValueError: naming the tensor that is missing, unexpected, of the wrong shape, or that
            llmtrain cannot reproduce (a non-zero shared_expert_gate or bias the model lacks).
    """
    _check_exportable(model)
    state = _split_fused_experts(dict(state))
    pop_tied_head(state, model)
    for i, layer in enumerate(model.layers):
        _pop_zero(state, f"model.layers.{i}.mlp.shared_expert_gate.weight", "llmtrain's shared expert has no gate")
        for name, _ in _absent_biases(i, layer):
            if name in state:
                _pop_zero(state, name, "the model's attention has no q/k/v biases (GQAttention bias=false)")
    load_renamed(state, model, hf_name, convert=lambda name, tensor: tensor / _scale(model, name))


def hf_config(model: Transformer, bos_token_id: int | None = None, eos_token_id: int | None = None,
              pad_token_id: int | None = None) -> dict:
    """The config.json dict of a Qwen2MoeForCausalLM with `model`'s sizes (every layer sparse)."""
    _check_exportable(model)
    attn, moe = model.layers[0].attn, model.layers[0].ffn
    return {
        **base_config(model, bos_token_id, eos_token_id, pad_token_id),
        "architectures": list(ARCHITECTURES),
        "model_type": "qwen2_moe",
        "intermediate_size": moe.n_shared_experts * moe.expert_hidden_dim,   # unused: no dense layers
        "num_attention_heads": attn.n_heads,
        "num_key_value_heads": attn.n_kv_heads,
        "head_dim": attn.head_dim,
        "qkv_bias": True,                   # Qwen2-MoE always has them (4.x has no switch): zeros if ours has none
        "use_sliding_window": False,
        "max_window_layers": model.n_layers,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "num_experts": moe.n_routed_experts,
        "num_experts_per_tok": moe.n_experts_per_tok,
        "moe_intermediate_size": moe.expert_hidden_dim,
        "shared_expert_intermediate_size": moe.n_shared_experts * moe.expert_hidden_dim,
        "norm_topk_prob": moe.norm_topk_prob and moe.n_experts_per_tok > 1,
        "output_router_logits": False,
        # HF pools every layer's router into one balance loss, K at uniform routing; ours is 1 per
        # layer (SPECS 3.2), L in all: the same strength at balance.
        "router_aux_loss_coef": moe.aux_loss_coef * model.n_layers / moe.n_experts_per_tok,
        LLMTRAIN_KEY: {"attention": {"bias": attn.wq.bias is not None},
                       "ffn": {"routed_scaling_factor": moe.routed_scaling_factor, "norm_topk_prob": moe.norm_topk_prob,
                               "aux_loss_coef": moe.aux_loss_coef, "seq_aux": moe.seq_aux}},
    }


def model_node(config: dict) -> dict:
    """The llmtrain `model` node that rebuilds a Qwen2-MoE checkpoint's architecture, with the
    llmtrain-only options an llmtrain export recorded under `LLMTRAIN_KEY` (see the module docstring).

    Raises:
        ValueError: naming the config.json keys llmtrain's MoE cannot reproduce.
    """
    K, moe_size = config.get("num_experts_per_tok", 4), config.get("moe_intermediate_size", 1408)
    shared_size = config.get("shared_expert_intermediate_size", 5632)
    found = {   # config.json key -> (its value, whether llmtrain reproduces it)
        "decoder_sparse_step": (config.get("decoder_sparse_step", 1), config.get("decoder_sparse_step", 1) == 1),
        "mlp_only_layers": (config.get("mlp_only_layers") or [], not config.get("mlp_only_layers")),
        "shared_expert_intermediate_size": (shared_size, shared_size % moe_size == 0 and shared_size > 0),
        "norm_topk_prob": (config.get("norm_topk_prob", False), not (config.get("norm_topk_prob", False) and K == 1)),
    }
    if bad := [f"{key}={value!r}" for key, (value, ok) in found.items() if not ok]:
        raise ValueError(f"config.json: {', '.join(bad)} is not supported by llmtrain's MoE (every layer sparse, "
                         "shared width a multiple of the expert width, no renormalisation at K=1)")
    node = llama.model_node({**config, "architectures": ["Qwen2ForCausalLM" if config.get("qkv_bias", True)
                                                         else "LlamaForCausalLM"], "intermediate_size": moe_size})
    node["ffn"] = {"_target_": "llmtrain.models.moe.MoE", "_partial_": True,
                   "n_routed_experts": config.get("num_experts", 60), "n_experts_per_tok": K,
                   "n_shared_experts": shared_size // moe_size, "expert_hidden_dim": moe_size,
                   "norm_topk_prob": config.get("norm_topk_prob", False), "routed_scaling_factor": 1.0,
                   "aux_loss_coef": config.get("router_aux_loss_coef", 0.001) * K / config["num_hidden_layers"],
                   "seq_aux": True}
    recorded = config.get(LLMTRAIN_KEY) or {}
    node["attention"] |= recorded.get("attention", {})
    node["ffn"] |= recorded.get("ffn", {})
    return node


def _scale(model: Transformer, name: str) -> float:
    """Factor an llmtrain tensor is multiplied by on export (divided by on import)."""
    if name.endswith(".ffn.shared.w2.weight"):
        return 2.0      # undoes sigmoid(0) = 0.5 of the zero shared_expert_gate
    if ".ffn.experts." in name and name.endswith(".w2.weight"):
        return model.layers[int(name.split(".")[1])].ffn.routed_scaling_factor
    return 1.0


def _absent_biases(i: int, layer: torch.nn.Module) -> list[tuple[str, int]]:
    """(HF name, size) of the q/k/v biases Qwen2-MoE has and this layer's attention lacks."""
    if layer.attn.wq.bias is not None:
        return []
    return [(f"model.layers.{i}.self_attn.{proj}.bias", getattr(layer.attn, ours).out_features)
            for ours, proj in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"))]


def _pop_zero(state: dict[str, Tensor], name: str, why: str) -> None:
    if name not in state:
        raise ValueError(f"checkpoint lacks tensor {name!r}")
    if state.pop(name).count_nonzero():
        raise ValueError(f"checkpoint tensor {name!r} is not zero, but {why}; llmtrain cannot reproduce it")


def _split_fused_experts(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers 5.x in-memory names -> Hub per-expert names (gate_up_proj holds gate rows, then up rows)."""
    for key in [k for k in state if k.endswith("mlp.experts.gate_up_proj")]:
        prefix, gate_up_E2ID = key.removesuffix("gate_up_proj"), state.pop(key)
        hidden = gate_up_E2ID.shape[1] // 2
        for e, tensor in enumerate(gate_up_E2ID):
            state[f"{prefix}{e}.gate_proj.weight"], state[f"{prefix}{e}.up_proj.weight"] = tensor.split(hidden)
    for key in [k for k in state if k.endswith("mlp.experts.down_proj")]:
        prefix = key.removesuffix("down_proj")
        for e, tensor in enumerate(state.pop(key)):
            state[f"{prefix}{e}.down_proj.weight"] = tensor
    return state




def _check_exportable(model: Transformer) -> None:
    for i, layer in enumerate(model.layers):
        if not isinstance(layer.attn, GQAttention) or not isinstance(layer.ffn, MoE):
            raise ValueError(f"Qwen2-MoE export needs GQAttention and MoE, layer {i} has "
                             f"{type(layer.attn).__name__} and {type(layer.ffn).__name__}")
        if layer.ffn.n_shared_experts == 0:
            raise ValueError(f"Qwen2-MoE export needs n_shared_experts >= 1, layer {i} has none "
                             "(a Mixtral/Qwen3-MoE exporter would take it; none is written yet)")
