"""Checkpoints: safetensors weights plus the state needed to resume exactly, written atomically.

Layout of `checkpoints/step_000200/`:

    meta.json           format version, step, epoch, iteration, config hash (written last)
    model.safetensors   weights (a tied matrix is stored once)
    resume.pt           optimizer, scheduler, RNG, trainer and (fp16) loss-scaler state; loads with weights_only=True
    strategy.safetensors  only where the strategy keeps state (GRPO's synced reference and buffered rollouts)
    config.yaml         the resolved run config

Every checkpoint is written into a hidden temporary folder that is renamed into place, and then
`latest` is repointed with an atomic symlink replace: a crash at any moment leaves `latest`
pointing at a complete checkpoint. Replacing a step folder that `latest` names (a resume from an
older checkpoint) moves `latest` onto the complete temporary folder, then onto the old folder's
new name, before each rename. Each rename and repoint is followed by an fsync of its directory,
so it also survives a power loss. A write that fails (a full disk) removes what it created and
raises OSError, leaving the earlier checkpoints and `latest` as they were.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from llmtrain.hardware import rng_state, set_rng_state

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def config_hash(config_yaml: str) -> str:
    return hashlib.sha256(config_yaml.encode()).hexdigest()[:16]


def unique_tensors(model: nn.Module, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The state dict with one name per parameter (a tied lm_head is stored once, as embed.weight).

    `state` is the full state dict to take the tensors from (default `model.state_dict()`; FSDP2
    gathers it from the shards, see Hardware.model_state_dict); which names are tied is read from
    the live module. Not `safetensors.save_model`: it records the dropped names as extra metadata
    entries, and the order of several entries in the file header varies between processes, so two
    identical models would not give identical files (and resume would not be byte-exact).
    """
    state = model.state_dict() if state is None else state
    tied = tied_names(model)
    return {name: tensor.contiguous() for name, tensor in state.items() if name not in tied}


def tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that are the same Parameter as an earlier name (lm_head.weight when tied)."""
    seen: set[int] = set()
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        with file.open("rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    """fsync a directory, which makes the entries created, renamed or replaced in it durable.

    A file's own fsync does not cover its name (POSIX): without this, a power loss after a save can
    bring back the old `latest` or no step folder at all. Windows cannot open a directory (no
    O_DIRECTORY) and journals renames itself; a filesystem that cannot fsync directories (EINVAL)
    has nothing to flush. Any other error (EIO) is raised.
    """
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def os_error(error: BaseException) -> OSError | None:
    """The OS error behind a failed write, or None (a bug must stay a bug, not become "disk trouble").

    The writers report a full disk in their own types: torch.save into an open file raises a
    RuntimeError ("unexpected pos ...") whose context is the OSError, and safetensors (Rust) names it
    only in its message, "I/O error: No space left on device (os error 28)" (both seen on a full tmpfs).
    """
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError):
            return cause
        cause = cause.__cause__ or cause.__context__
    if match := re.search(r"I/O error: (.+?) \(os error (\d+)\)", str(error)):
        return OSError(int(match[2]), match[1])
    return None


def _write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(path)`, turning a failed write into OSError(errno, strerror, path) whatever wrote it."""
    try:
        write(path)
    except Exception as error:
        cause = os_error(error)
        if cause is None or cause.errno is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from error


def _torch_save(obj: object, path: Path) -> None:
    with path.open("wb") as handle:             # a file object, not a path: torch then keeps the OSError
        torch.save(obj, handle)


def gather_state(trainer: Any) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Tensor]]:
    """(weights, resume state, strategy state) as one process would hold them; every rank calls it
    (FSDP2 gathers, so may the strategy)."""
    hardware = trainer.hardware
    weights = unique_tensors(trainer.model, hardware.model_state_dict(trainer.model))
    state = {"optimizer": hardware.optimizer_state_dict(trainer.model, trainer.optimizer),
             "scheduler": trainer.scheduler.state_dict(), "rng": rng_state(), "trainer": trainer.state_dict()}
    if hardware.scaler is not None:
        state["scaler"] = hardware.scaler.state_dict()
    return weights, state, getattr(trainer.strategy, "state_dict", dict)()


def _write_files(tmp: Path, trainer: Any, weights: dict[str, Tensor], state: dict[str, Any],
                 strategy_state: dict[str, Tensor], config_yaml: str) -> None:
    meta = {"format_version": FORMAT_VERSION, "step": trainer.step, "epoch": trainer.epoch,
            "iteration": trainer.iteration, "config_hash": config_hash(config_yaml), "rope_layout": "half",
            "time": dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    _write(tmp / "model.safetensors",
           lambda path: save_file(weights, str(path), metadata={"format": "pt"}))
    _write(tmp / "resume.pt", lambda path: _torch_save(state, path))
    if strategy_state:
        _write(tmp / "strategy.safetensors", lambda path: save_file(strategy_state, str(path)))
    _write(tmp / "config.yaml", lambda path: path.write_text(config_yaml))
    _write(tmp / "meta.json", lambda path: path.write_text(json.dumps(meta, indent=2)))     # last


def save_checkpoint(root: Path, trainer: Any, config_yaml: str = "") -> Path:
    """Write the trainer's current state to `root/step_N` and point `root/latest` at it.

    Every rank calls this (the state is gathered collectively); only rank 0 writes.

    Raises:
        OSError: a write, fsync, rename or the symlink failed (e.g. errno ENOSPC, "No space left on
            device"), whichever library wrote the file. What this call created is removed first (best
            effort, never masking that error) and a folder it moved aside is put back, so the earlier
            step folders and `latest` are as they were: `latest` still names the last complete checkpoint.
    """
    weights, state, strategy_state = gather_state(trainer)
    final = root / step_dir_name(trainer.step)
    if not trainer.hardware.is_rank0:
        return final
    root.mkdir(parents=True, exist_ok=True)
    _fsync_dir(root.parent)                     # `checkpoints/` itself, the first time
    tmp = root / f".tmp_{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)                      # debris of a write that was killed
    latest_before = os.readlink(root / "latest") if (root / "latest").is_symlink() else None
    placed = aside = None
    try:
        tmp.mkdir()
        _write_files(tmp, trainer, weights, state, strategy_state, config_yaml)
        _fsync_tree(tmp)
        if final.exists():                      # e.g. resumed from an older checkpoint: keep, never overwrite
            aside = final.with_name(f"{final.name}.replaced_{dt.datetime.now():%Y%m%d-%H%M%S}")
            log.warning("checkpoint %s already exists; moved to %s", final, aside.name)
            _move_aside(root, final, aside, tmp)
        tmp.rename(final)
        placed = final
        _fsync_dir(root)
        _point_latest(root, final.name)
    except BaseException:                       # OSError, or a second Ctrl-C in the middle of the write
        _undo(placed or tmp, aside, final, root, latest_before)
        raise
    return final


def _move_aside(root: Path, final: Path, aside: Path, tmp: Path) -> None:
    """Rename `final` to `aside`; if `latest` names `final`, it names a complete checkpoint throughout.

    `latest` is first moved onto `tmp` (complete and fsynced), then onto `aside`, because the next
    step, renaming `tmp` to `final`, takes `tmp`'s name away. Without this, a crash between the
    renames left `latest` dangling and `resume=<run dir>` found "no checkpoint there".
    """
    follows = (root / "latest").resolve() == final.resolve()
    if follows:
        _point_latest(root, tmp.name)
    final.rename(aside)
    _fsync_dir(root)
    if follows:
        _point_latest(root, aside.name)


def _undo(created: Path, aside: Path | None, final: Path, root: Path, latest_before: str | None) -> None:
    """Remove what a failed save created, put back what it moved aside and point `latest` where it
    pointed before; each part best effort."""
    shutil.rmtree(created, ignore_errors=True)
    with contextlib.suppress(OSError):
        if aside is not None:
            aside.rename(final)
    latest = root / "latest"
    with contextlib.suppress(OSError):
        current = os.readlink(latest) if latest.is_symlink() else None
        if current != latest_before:
            if latest_before is None:
                latest.unlink()
            else:
                _point_latest(root, latest_before)
    with contextlib.suppress(OSError):
        (root / ".latest.tmp").unlink(missing_ok=True)


def _point_latest(root: Path, name: str) -> None:
    link = root / ".latest.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(name)                       # relative: the run directory can be moved
    os.replace(link, root / "latest")
    _fsync_dir(root)


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step folders (never the one `latest` names).

    Folders moved aside by a resume from an older checkpoint (`step_N.replaced_<time>`, the steps
    of the abandoned continuation) are kept too, but bounded the same way: at most the `keep_last`
    newest of them, and none older than the oldest step folder kept, so disk use stays within
    2 x keep_last checkpoints however often a run is resumed from the past.
    """
    latest = (root / "latest").resolve()
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit())
    aside_step = {p: int(m.group(1)) for p in root.glob("step_*.replaced_*")
                  if p.is_dir() and (m := re.fullmatch(r"step_(\d+)\.replaced_.+", p.name))}
    asides = sorted(aside_step, key=lambda p: (aside_step[p], p.name))
    oldest_kept = int(steps[-keep_last].name[5:]) if len(steps) >= keep_last else 0
    doomed = steps[:-keep_last] + asides[:-keep_last] + [p for p in asides[-keep_last:] if aside_step[p] < oldest_kept]
    for old in doomed:
        if old.resolve() != latest:
            shutil.rmtree(old)


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / "meta.json").read_text())


def load_checkpoint(path: Path, trainer: Any) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler, trainer counters and RNG from a checkpoint folder."""
    meta = read_meta(path)
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta['format_version']}, this llmtrain reads {FORMAT_VERSION}")
    missing, unexpected = trainer.hardware.load_model_weights(trainer.model, str(path / "model.safetensors"))
    if missing or unexpected:
        raise ValueError(f"{path}/model.safetensors does not fit the model: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    state = torch.load(path / "resume.pt", weights_only=True, map_location="cpu")
    trainer.hardware.load_optimizer_state_dict(trainer.model, trainer.optimizer, state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.load_state_dict(state["trainer"])
    if "scaler" in state and trainer.hardware.scaler is not None:
        trainer.hardware.scaler.load_state_dict(state["scaler"])
    if hasattr(trainer.strategy, "load_state_dict"):
        strategy_file = path / "strategy.safetensors"
        trainer.strategy.load_state_dict(load_file(str(strategy_file)) if strategy_file.exists() else {})
    set_rng_state(state["rng"])
    return meta
