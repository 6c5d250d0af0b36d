"""Models that start from saved weights: an llmtrain checkpoint or a Hugging Face folder.

`model.init_from=<path>` (any strategy) and the `llmtrain generate` / `llmtrain export` commands
go through here. The source decides the architecture: a checkpoint's config.yaml, or the HF
config.json, gives the `model` node, so a fine-tuning stage cannot silently build a different
shape than the weights it loads.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_model
from torch import nn

from llmtrain.hf import io as hf_io
from llmtrain.hf.common import THINKING_PREFIX
from llmtrain.rundir import find_checkpoint, run_dir_of

log = logging.getLogger(__name__)


def source_model_node(init_from: str | os.PathLike) -> DictConfig:
    """The `model` node of the weights in `init_from` (HF folder, run directory or checkpoint)."""
    if hf_io.is_hf_dir(init_from):
        return OmegaConf.create(hf_io.model_node(init_from))
    saved = checkpoint_config(find_checkpoint(init_from, "model.init_from"))
    node = OmegaConf.create(OmegaConf.to_container(saved.model))
    node.pop("init_from", None)
    return node


def stage_record(init_from: str | os.PathLike) -> dict[str, Any]:
    """What a stage started from, for run.json: the checkpoint, its step and strategy, and what *it*
    started from, so pre-training -> SFT -> DPO can be traced back from the last run alone."""
    if hf_io.is_hf_dir(init_from):
        return {"path": str(init_from), "format": "huggingface"}
    checkpoint = find_checkpoint(init_from, "model.init_from")
    meta = json.loads((checkpoint / "meta.json").read_text())
    record = {"path": str(init_from), "checkpoint": str(checkpoint.resolve()), "step": meta.get("step"),
              "strategy": checkpoint_config(checkpoint).strategy.get("_target_")}
    source_run = run_dir_of(checkpoint) / "run.json"
    if source_run.is_file():
        record["init_from"] = json.loads(source_run.read_text()).get("init_from")
    return record


def checkpoint_config(checkpoint: Path) -> DictConfig:
    return OmegaConf.create((checkpoint / "config.yaml").read_text())


def build(node: DictConfig, **kwargs: Any) -> nn.Module:
    """Instantiate a `model` node (its `init_from` key is ours, not the model's)."""
    node = OmegaConf.create(OmegaConf.to_container(node))        # detached from the struct-mode run config
    node.pop("init_from", None)
    return instantiate(node, **kwargs)


def load_weights(model: nn.Module, init_from: str | os.PathLike) -> None:
    """Copy the weights of `init_from` into `model`; every name and shape must match, except HRPO's
    thinking module (`thinking.*`), which starts fresh when the source lacks it and is dropped when
    the model lacks it."""
    if hf_io.is_hf_dir(init_from):
        hf_io.load_weights(model, init_from)
        if getattr(model, "thinking", None) is not None:
            log.info("model.init_from=%s: the thinking module (HRPO) starts from its initialisation", init_from)
        return
    checkpoint = find_checkpoint(init_from, "model.init_from")
    device = str(next(model.parameters()).device)
    missing, unexpected = load_model(model, str(checkpoint / "model.safetensors"), strict=False, device=device)
    fresh, dropped = ([n for n in names if n.startswith(THINKING_PREFIX)] for names in (missing, unexpected))
    if fresh:
        log.info("model.init_from=%s has no thinking module: it starts from its initialisation", init_from)
    if dropped:
        log.warning("model.init_from=%s has a thinking module (HRPO) that this model does not: its weights are "
                    "dropped (set model/thinking to keep them)", init_from)
    missing, unexpected = sorted(set(missing) - set(fresh)), sorted(set(unexpected) - set(dropped))
    if missing or unexpected:
        raise ValueError(f"model.init_from={init_from}: {checkpoint}/model.safetensors does not fit the model: "
                         f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    log.info("initial weights from %s", checkpoint)


def load_checkpoint_model(path: str | os.PathLike, option: str = "checkpoint") -> tuple[nn.Module, Any, DictConfig]:
    """(model in eval mode on the CPU, its tokenizer, the run config) of a run directory or checkpoint."""
    checkpoint = find_checkpoint(path, option)
    cfg = checkpoint_config(checkpoint)
    model = build(cfg.model)
    load_weights(model, checkpoint)
    return model.eval(), instantiate(cfg.data.tokenizer), cfg
