"""Helpers every HF family converter shares: one name per tensor, and name/shape checks on import."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from llmtrain.models.transformer import Transformer


# HRPO's thinking module (llmtrain.models.thinking) has no HF counterpart: export refuses it unless
# asked to drop it (llmtrain.hf.io.export), and an HF import leaves a fresh one as initialised.
THINKING_PREFIX = "thinking."


def untied_state(model: Transformer) -> dict[str, Tensor]:
    """The model's state dict with a tied lm_head (one name per storage, safetensors #98) and any
    thinking module left out: the trunk that HF architectures describe."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(THINKING_PREFIX)}
    if model.tie_embeddings:
        del state["lm_head.weight"]          # HF re-ties it on load from tie_word_embeddings
    return state


def check_names_and_shapes(state: dict[str, Tensor], shapes: dict[str, torch.Size]) -> None:
    """Raise ValueError naming every missing or unexpected tensor, or the first with a wrong shape."""
    if missing := sorted(set(shapes) - set(state)):
        raise ValueError(f"checkpoint lacks tensors {missing}")
    if unexpected := sorted(set(state) - set(shapes)):
        raise ValueError(f"checkpoint has unexpected tensors {unexpected}")
    for name, shape in shapes.items():
        if state[name].shape != shape:
            raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(state[name].shape)}, model {tuple(shape)}")


def pop_tied_head(state: dict[str, Tensor], model: Transformer) -> None:
    """Drop an HF `lm_head.weight` from `state` for a tied model, after checking it is the embedding."""
    if model.tie_embeddings and "lm_head.weight" in state:
        if not torch.equal(state.pop("lm_head.weight"), state["model.embed_tokens.weight"]):
            raise ValueError("model is tied but the checkpoint's lm_head.weight differs from embed_tokens")


def load_renamed(state: dict[str, Tensor], model: Transformer, hf_name: Callable[[str], str],
                 convert: Callable[[str, Tensor], Tensor] = lambda name, tensor: tensor) -> None:
    """Load HF-named `state` into `model`: every model tensor must be there under `hf_name(name)`.

    `convert(our_name, tensor)` undoes any scaling the exporter applied. A thinking module keeps its
    initialisation (HF has none to load).
    """
    expected = {hf_name(name): (name, tensor.shape) for name, tensor in untied_state(model).items()}
    check_names_and_shapes(state, {hf_key: shape for hf_key, (_, shape) in expected.items()})
    ours = {name: convert(name, state[hf_key]) for hf_key, (name, _) in expected.items()}
    if model.tie_embeddings:
        ours["lm_head.weight"] = ours["embed.weight"]  # the same Parameter; lets the check below pass
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected and all(name.startswith(THINKING_PREFIX) for name in missing), (missing, unexpected)


def rope_scaling(config: dict) -> dict:
    """A config.json's RoPE scaling, {} for none: `rope_scaling` (transformers 4.x) or else `rope_parameters`
    (5.x), where a `rope_type` (4.x also `type`) of "default" means plain RoPE in either."""
    for key, default in (("rope_scaling", None), ("rope_parameters", "default")):
        scaling = config.get(key) or {}
        if scaling and scaling.get("rope_type", scaling.get("type", default)) != "default":
            return scaling
    return {}


def base_config(model: Transformer, bos_token_id: int | None, eos_token_id: int | None,
                pad_token_id: int | None) -> dict:
    """The config.json keys every exported family shares: sizes of the trunk, norms, RoPE, tokens."""
    return {
        "vocab_size": model.vocab_size,
        "hidden_size": model.dim,
        "num_hidden_layers": model.n_layers,
        "hidden_act": "silu",
        "max_position_embeddings": model.rope.max_seq_len,
        "rms_norm_eps": model.norm.eps,
        "rope_theta": model.rope.theta,               # read by transformers 4.x
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope.theta},   # 5.x
        "tie_word_embeddings": model.tie_embeddings,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "initializer_range": model.init_std,
        "use_cache": True,
        "torch_dtype": str(model.embed.weight.dtype).removeprefix("torch."),
    }
