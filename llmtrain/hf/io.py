"""Hugging Face model folders: write one from an llmtrain model, read one back into llmtrain.

A folder is config.json + model.safetensors (or sharded model-*.safetensors with an index) +
tokenizer files; an export also writes generation_config.json (the bos, eos and pad ids). Each
architecture family is a module with the same five functions:

    ARCHITECTURES                    the HF class names it imports
    can_export(model) -> bool        whether it can write this llmtrain model
    hf_config(model, bos, eos, pad)  the config.json dict
    to_hf_state_dict(model)          weights under HF names
    from_hf_state_dict(state, model) load HF-named weights into an llmtrain model (names and shapes checked)
    model_node(config) -> dict       the llmtrain `model` config node that rebuilds the architecture
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmtrain.data.tokenizer import ByteTokenizer
from llmtrain.hf import deepseek, llama, qwen2_moe
from llmtrain.hf.tokenizer import write_tokenizer_files

FAMILIES: tuple[ModuleType, ...] = (llama, qwen2_moe, deepseek)
log = logging.getLogger(__name__)


def is_hf_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def read_config(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def family_for_config(config: dict, path: str | os.PathLike) -> ModuleType:
    architecture = (config.get("architectures") or ["<none>"])[0]
    for family in FAMILIES:
        if architecture in family.ARCHITECTURES:
            return family
    known = [name for family in FAMILIES for name in family.ARCHITECTURES]
    raise ValueError(f"{Path(path) / 'config.json'}: architecture {architecture!r} cannot be imported; "
                     f"llmtrain reads {known}")


def family_for_model(model: nn.Module) -> ModuleType:
    for family in FAMILIES:
        if family.can_export(model):
            return family
    layer = model.layers[0]
    raise ValueError(f"no Hugging Face export for {type(layer.attn).__name__} attention with "
                     f"{type(layer.ffn).__name__} feed-forward")


def model_node(path: str | os.PathLike) -> dict:
    """The llmtrain `model` node that rebuilds the HF checkpoint in `path`."""
    config = read_config(path)
    return family_for_config(config, path).model_node(config)


def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's model.safetensors (or its shards)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ValueError(f"{path}: no model.safetensors (or model.safetensors.index.json); convert .bin "
                         "checkpoints to safetensors first")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state |= load_file(str(path / shard))
    return state


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the HF checkpoint in `path` into `model` (built from `model_node(path)`)."""
    family = family_for_config(read_config(path), path)
    state = {name: tensor for name, tensor in read_state(path).items() if not name.endswith("rotary_emb.inv_freq")}
    dtype = next(model.parameters()).dtype
    family.from_hf_state_dict({name: tensor.to(dtype) for name, tensor in state.items()}, model)


def check_thinking(model: nn.Module, drop: bool) -> None:
    """Refuse a model with a thinking module, or (drop=True) warn that it is left out."""
    thinking = getattr(model, "thinking", None)
    if thinking is None:
        return
    what = (f"this model has HRPO latent-thinking modules ({type(thinking).__name__}: gates r and i, Lambda"
            f"{', projection' if hasattr(thinking, 'thinking_projection') else ''}), which no Hugging Face "
            "architecture has")
    if not drop:
        raise ValueError(f"{what}; the exported model would decode with plain token embeddings only, not as the "
                         "hybrid policy was trained. Pass --drop-thinking (export(..., drop_thinking=True)) to "
                         "export the trunk without them")
    log.warning("%s: they are dropped; the exported model decodes with plain token embeddings only", what)


def export(model: nn.Module, tokenizer: ByteTokenizer, out_dir: str | os.PathLike,
           drop_thinking: bool = False) -> Path:
    """Write `model` and `tokenizer` as a HF folder; refuses to replace an existing folder.

    The folder is written next to its destination under a temporary name and renamed at the end,
    so an interrupted export never leaves a half-written model that looks complete, and a failed
    one (e.g. a model the format cannot hold) removes it again. A model with HRPO's thinking module
    is refused unless `drop_thinking`: the exported model has no latent blend and decodes with plain
    token embeddings, i.e. it is not the hybrid policy that was trained.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose a new folder (nothing is overwritten)")
    check_thinking(model, drop_thinking)
    family = family_for_model(model)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        config = family.hf_config(model, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        special = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                   "pad_token_id": tokenizer.pad_id}                              # what `generate` starts and stops on
        (tmp / "generation_config.json").write_text(json.dumps(special, indent=2) + "\n")
        save_file(family.to_hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_tokenizer_files(tokenizer, tmp)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)       # a refused or interrupted export leaves nothing behind
        raise
    return out_dir
