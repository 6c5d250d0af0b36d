"""Weights & Biases: the resolved config and every metrics row, from rank 0 only.

The run is offline when no credentials are configured (sync it later with `wandb sync`), and
jobs of one Hydra sweep share a group. A wandb failure never stops training: the first one logs a
warning and turns this logger off for the rest of the run.
"""

from __future__ import annotations

import logging
import netrc
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from llmtrain.callbacks.base import Callback

log = logging.getLogger(__name__)
MODES = ("online", "offline", "disabled")


def has_credentials() -> bool:
    """An API key in the environment, or `wandb login`'s entry in ~/.netrc for the server's host.

    A cheap local check (stdlib netrc, the file `wandb login` writes): nothing is sent anywhere.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str | None) -> str | None:
    """`mode` if given; None when WANDB_MODE is set (wandb reads it); else online iff credentials exist."""
    if mode is not None or os.environ.get("WANDB_MODE"):
        return mode
    return "online" if has_credentials() else "offline"


def sweep_group(run_mode: RunMode | None, sweep_dir: str | None) -> str | None:
    """The sweep directory inside a Hydra multirun (constant across its jobs, HYDRA.md 4.5), else None."""
    return str(sweep_dir) if run_mode == RunMode.MULTIRUN and sweep_dir else None


def hydra_sweep_group() -> str | None:
    """sweep_group of the running Hydra job (None outside Hydra)."""
    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    return sweep_group(hydra.mode, hydra.sweep.dir)


class WandbLogger(Callback):
    """Log the resolved config once and each step's metrics (every `log_every` steps, eval rows always).

    Args:
        group: None = the sweep directory inside a Hydra multirun, else no group.
        name: None = the name of `dir` (the run directory).
        mode: "online", "offline" or "disabled"; None = $WANDB_MODE if set, else online when
            credentials are configured (WANDB_API_KEY or `wandb login`), offline otherwise.
        dir: where the wandb/ folder goes; the run id is kept in it, so `resume=` continues the run.
    """

    rank_zero_only = True

    def __init__(self, project: str = "llmtrain", entity: str | None = None, name: str | None = None,
                 group: str | None = None, tags: Sequence[str] = (), mode: str | None = None,
                 dir: str | None = None, log_every: int = 1) -> None:
        if mode is not None and mode not in MODES:
            raise ValueError(f"callbacks.wandb.mode={mode!r} must be one of {', '.join(MODES)} or null")
        if log_every < 1:
            raise ValueError(f"callbacks.wandb.log_every={log_every} must be >= 1")
        self.project, self.entity, self.group, self.tags = project, entity, group, [str(t) for t in tags]
        self.dir = None if dir is None else Path(dir)
        self.name = name or (self.dir.name if self.dir else None)
        self.mode, self.log_every = mode, log_every
        self.run: Any = None
        self.failed = False

    def on_train_begin(self, trainer) -> None:
        if int(os.environ.get("RANK", "0")) != 0 or (self.mode or os.environ.get("WANDB_MODE")) == "disabled":
            return                                      # disabled: not even the (slow) import
        self.run = self._call("init", lambda: self._init(trainer))

    def on_step_end(self, trainer, metrics: dict[str, float]) -> None:
        if trainer.step % self.log_every == 0 or any(k.startswith("eval/") for k in metrics):
            self._call("log", lambda: self.run.log(dict(metrics), step=trainer.step))

    def on_train_end(self, trainer) -> None:
        self._call("finish", lambda: self.run.finish(exit_code=0))
        self.run = None

    def on_exception(self, trainer, error: BaseException) -> None:
        self._call("finish", lambda: self.run.finish(exit_code=1))
        self.run = None

    def _init(self, trainer) -> Any:
        import wandb                                    # slow to import: only when a run starts

        mode = resolve_mode(self.mode)
        if mode == "offline" and self.mode is None:
            where = self.dir or Path.cwd()
            log.info("wandb: no credentials (WANDB_API_KEY or `wandb login`), logging offline; upload with "
                     "`wandb sync %s`", where / "wandb" / "offline-run-*")
        run_id, resume = self._run_id(resume=trainer.step > 0)
        # finish_previous: Hydra's basic launcher runs a sweep's jobs in one process; each gets its own run.
        return wandb.init(project=self.project, entity=self.entity, name=self.name,
                          group=self.group or hydra_sweep_group(), tags=self.tags or None, mode=mode,
                          dir=self.dir, config=yaml.safe_load(trainer.config_yaml or "{}") or {},
                          id=run_id, resume=resume, reinit="finish_previous")

    def _run_id(self, resume: bool) -> tuple[str | None, str | None]:
        """(id, "allow") continuing the id stored in dir/wandb on a resumed run; a new stored id otherwise."""
        if self.dir is None:
            return None, None
        path = self.dir / "wandb" / "run_id"
        if resume and path.exists():
            return path.read_text().strip(), "allow"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id := secrets.token_hex(4))
        return run_id, None

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """fn(), unless there is no run (rank != 0, disabled) or an earlier call failed; a failure turns
        the logger off."""
        if self.failed or (what != "init" and self.run is None):
            return None
        try:
            return fn()
        except Exception as error:                      # never stop training for a logger
            self.failed = True
            log.warning("wandb %s failed (%s: %s); wandb logging is off for the rest of this run, training "
                        "continues", what, type(error).__name__, error)
            return None
