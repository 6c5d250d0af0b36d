"""Models that start from saved weights: an llmtrain checkpoint or a Hugging Face folder.

`model.init_from=<path>` (any strategy) and the `llmtrain generate` / `llmtrain export` commands
go through here. The source decides the architecture: a checkpoint's config.yaml, or the HF
config.json, gives the `model` node, so a fine-tuning stage cannot silently build a different
shape than the weights it loads; `check_tokenizer` refuses a run tokenizer in which the source's
ids would mean other tokens.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_model
from tokenizers import Tokenizer
from torch import nn

from llmtrain.data.tokenizer import ByteTokenizer
from llmtrain.hf import io as hf_io
from llmtrain.hf.common import THINKING_PREFIX
from llmtrain.hf.tokenizer import byte_tokenizer_json
from llmtrain.rundir import find_checkpoint, run_dir_of

log = logging.getLogger(__name__)


def source_model_node(init_from: str | os.PathLike) -> DictConfig:
    """The `model` node of the weights in `init_from` (HF folder, run directory or checkpoint)."""
    if hf_io.is_hf_dir(init_from):
        return OmegaConf.create(hf_io.model_node(init_from))
    saved = checkpoint_config(find_source(init_from, "model.init_from"))
    node = OmegaConf.create(OmegaConf.to_container(saved.model))
    node.pop("init_from", None)
    return node


def find_source(init_from: str | os.PathLike, option: str = "model.init_from") -> Path:
    """The llmtrain checkpoint of a source that is not an HF folder. A folder that holds neither kind
    (no config.json, no meta.json, checkpoints/ or run.json) is refused saying what each would hold;
    an llmtrain run without a complete checkpoint gets rundir's message."""
    path = Path(init_from)
    if path.is_dir() and not any((path / name).exists() for name in ("meta.json", "checkpoints", "run.json")):
        raise ValueError(f"{option}={init_from}: neither a Hugging Face model folder (expected {path / 'config.json'} "
                         "beside model.safetensors) nor an llmtrain run directory or checkpoint (expected "
                         f"{path / 'checkpoints/latest/meta.json'}, or meta.json in a checkpoint's step folder)")
    return find_checkpoint(init_from, option)


def check_tokenizer(init_from: str | os.PathLike, tokenizer_node: DictConfig) -> None:
    """Refuse a run whose tokenizer (`data.tokenizer`) does not fit the weights of `init_from`.

    The source's embedding rows learned what each id means, so every token of the tokenizer it was
    trained with must keep its id in this run's; a tokenizer that only adds tokens passes (its new
    ids start from rows the source never trained). Vocabularies are compared, not paths, so a copied
    or moved tokenizer passes too. The source's tokenizer is its config.yaml's data.tokenizer (a
    llmtrain checkpoint) or the folder's tokenizer.json (Hugging Face); where that cannot be read, a
    warning says that nothing was checked. Last, the source must have a row for each of this run's ids.
    """
    tokenizer, ours = instantiate(tokenizer_node), describe_tokenizer(tokenizer_node)
    check_source_ids(init_from, tokenizer, ours)
    vocab_size = source_model_node(init_from).vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={vocab_size} (from model.init_from={init_from}) is smaller than the "
                         f"tokenizer's vocabulary ({tokenizer.vocab_size} tokens, {ours})")


def check_source_ids(init_from: str | os.PathLike, tokenizer: Any, ours: str, option: str = "model.init_from") -> None:
    """The vocabulary half of `check_tokenizer`, for a built `tokenizer` (described as `ours`); also
    what a DPO `strategy.reference=<path>` goes through."""
    if (source := source_vocabulary(init_from, option)) is not None:
        check_ids_kept(init_from, source, vocabulary(tokenizer), ours, option)


def check_ids_kept(init_from: str | os.PathLike, source: tuple[str, str, dict[str, int]],
                   vocab: dict[str, int] | None, ours: str, option: str = "model.init_from") -> None:
    """Refuse a run vocabulary `vocab` in which a token of the source's has another id (or none)."""
    theirs, choice, source_vocab = source
    if vocab is None:
        log.warning("%s=%s: this run's tokenizer (%s) has no tokenizers.Tokenizer vocabulary, so it "
                    "is not checked against the source's (%s)", option, init_from, ours, theirs)
        return
    moved = sorted((i, token) for token, i in source_vocab.items() if vocab.get(token) != i)
    if moved:
        raise ValueError(f"{option}={init_from} was trained with tokenizer {theirs}; this run uses {ours}, "
                         f"where {len(moved)} of its {len(source_vocab)} tokens have another id or none (e.g. "
                         f"id {moved[0][0]} {moved[0][1]!r}), so the weights would read them as other tokens. "
                         f"Set {choice}")
    if len(vocab) > len(source_vocab):
        log.info("%s=%s: this run's tokenizer adds %d tokens to the source's; their embeddings "
                 "start untrained", option, init_from, len(vocab) - len(source_vocab))


def source_vocabulary(init_from: str | os.PathLike, option: str = "model.init_from"
                      ) -> tuple[str, str, dict[str, int]] | None:
    """(what the source's tokenizer is, the data.tokenizer overrides that choose it, its token -> id),
    or None with a warning when it cannot be read."""
    unchecked = "make sure that this run's tokenizer is the one its weights were trained with"
    if hf_io.is_hf_dir(init_from):
        file = Path(init_from) / "tokenizer.json"
        if not file.is_file():
            log.warning("%s=%s has no tokenizer.json: %s", option, init_from, unchecked)
            return None
        try:
            vocab = Tokenizer.from_file(str(file)).get_vocab(with_added_tokens=True)
        except Exception as error:          # tokenizers raises a bare Exception for a file it cannot read
            log.warning("%s=%s: %s cannot be read (%s): %s", option, init_from, file, error, unchecked)
            return None
        return str(file), f"data/tokenizer=file data.tokenizer.path={init_from}", vocab
    node = checkpoint_config(find_source(init_from, option)).data.tokenizer
    try:
        tokenizer = instantiate(node)
    except InstantiationException as error:  # e.g. its tokenizer.json was moved since
        log.warning("%s=%s was trained with tokenizer %s, which cannot be loaded now (%s): %s",
                    option, init_from, describe_tokenizer(node), error.__cause__ or error, unchecked)
        return None
    if (vocab := vocabulary(tokenizer)) is None:
        log.warning("%s=%s was trained with tokenizer %s, which has no tokenizers.Tokenizer "
                    "vocabulary: %s", option, init_from, describe_tokenizer(node), unchecked)
        return None
    return describe_tokenizer(node), choose_tokenizer(node), vocab


def vocabulary(tokenizer: Any) -> dict[str, int] | None:
    """token -> id, special tokens included, of a ByteTokenizer or TokenizerFile (None for other classes)."""
    hf = byte_tokenizer_json(tokenizer) if isinstance(tokenizer, ByteTokenizer) else getattr(tokenizer, "hf", None)
    return hf.get_vocab(with_added_tokens=True) if isinstance(hf, Tokenizer) else None


def describe_tokenizer(node: DictConfig) -> str:
    name = str(node._target_).rsplit(".", 1)[-1]
    return f"{name}({node.path})" if "path" in node else name


def choose_tokenizer(node: DictConfig) -> str:
    """The command-line overrides that give a run the tokenizer of `node`."""
    if "path" in node:
        return f"data/tokenizer=file data.tokenizer.path={node.path}"
    return "data/tokenizer=byte" if node._target_ == "llmtrain.data.tokenizer.ByteTokenizer" else \
        f"data.tokenizer._target_={node._target_}"


def stage_record(init_from: str | os.PathLike) -> dict[str, Any]:
    """What a stage started from, for run.json: the checkpoint, its step and strategy, and what *it*
    started from, so pre-training -> SFT -> DPO can be traced back from the last run alone."""
    if hf_io.is_hf_dir(init_from):
        return {"path": str(init_from), "format": "huggingface"}
    checkpoint = find_source(init_from, "model.init_from")
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


def load_weights(model: nn.Module, init_from: str | os.PathLike, option: str = "model.init_from") -> None:
    """Copy the weights of `init_from` into `model`; every name and shape must match, except HRPO's
    thinking module (`thinking.*`), which starts fresh when the source lacks it and is dropped when
    the model lacks it. `option` names `init_from` in the errors."""
    if hf_io.is_hf_dir(init_from):
        hf_io.load_weights(model, init_from)
        if getattr(model, "thinking", None) is not None:
            log.info("model.init_from=%s: the thinking module (HRPO) starts from its initialisation", init_from)
        return
    checkpoint = find_source(init_from, option)
    file = checkpoint / "model.safetensors"
    if wrong := wrong_shapes(model, file):     # else load_model raises torch's multi-line RuntimeError
        raise ValueError(f"{option}={init_from}: {file} does not fit the model: {'; '.join(wrong)}")
    device = str(next(model.parameters()).device)
    missing, unexpected = load_model(model, str(file), strict=False, device=device)
    fresh, dropped = ([n for n in names if n.startswith(THINKING_PREFIX)] for names in (missing, unexpected))
    if fresh:
        log.info("model.init_from=%s has no thinking module: it starts from its initialisation", init_from)
    if dropped:
        log.warning("model.init_from=%s has a thinking module (HRPO) that this model does not: its weights are "
                    "dropped (set model/thinking to keep them)", init_from)
    missing, unexpected = sorted(set(missing) - set(fresh)), sorted(set(unexpected) - set(dropped))
    if missing or unexpected:
        raise ValueError(f"{option}={init_from}: {file} does not fit the model: "
                         f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    log.info("initial weights from %s", checkpoint)


def wrong_shapes(model: nn.Module, file: Path) -> list[str]:
    """One entry per tensor that the file and the model both hold with different shapes."""
    with safe_open(str(file), "pt") as saved:
        shapes = {name: list(saved.get_slice(name).get_shape()) for name in saved.keys()}
    return [f"{name} is {shapes[name]} there, {list(tensor.shape)} in the model"
            for name, tensor in model.state_dict().items() if name in shapes and shapes[name] != list(tensor.shape)]


def load_checkpoint_model(path: str | os.PathLike, option: str = "checkpoint") -> tuple[nn.Module, Any, DictConfig]:
    """(model in eval mode on the CPU, its tokenizer, the run config) of a run directory or checkpoint."""
    checkpoint = find_checkpoint(path, option)
    cfg = checkpoint_config(checkpoint)
    model = build(cfg.model)
    load_weights(model, checkpoint, option)
    return model.eval(), instantiate(cfg.data.tokenizer), cfg
