"""The run directory (DESIGN.md section 4): where a run lives, its snapshot and its run.json.

Hydra creates the directory; this module decides its name when resuming (the same directory),
and writes what Hydra does not: resolved_config.yaml and run.json.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
PACKAGES = ("torch", "hydra-core", "omegaconf", "safetensors", "rich", "wandb", "numpy", "llmtrain")


def find_checkpoint(path: str | os.PathLike, option: str = "resume") -> Path:
    """The checkpoint folder that `<option>=<path>` names: a run directory or one of its checkpoints.

    A run directory means its `checkpoints/latest`; if that names no complete checkpoint, the
    newest complete step folder, with a warning.

    Raises:
        ValueError: the path does not exist or holds no checkpoint (the message starts with `option=path`).
    """
    given = path
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    latest = path / "checkpoints" / "latest"
    if (latest / "meta.json").is_file():
        return latest.resolve()
    if not path.exists():
        raise ValueError(f"{option}={given}: no such directory")
    if (newest := newest_complete_step(path / "checkpoints")) is not None:
        log.warning("%s=%s: %s names no complete checkpoint; using the newest complete checkpoint, %s "
                    "(to choose another, give %s=%s/checkpoints/step_N)", option, given, latest, newest.name,
                    option, given)
        return newest.resolve()
    raise ValueError(f"{option}={given}: no checkpoint there (expected {latest}/meta.json); "
                     "was the run stopped before its first checkpoint?")


def newest_complete_step(root: Path) -> Path | None:
    """The highest step_N folder under `root` that holds meta.json (written last, so: complete).

    The fallback when `latest` dangles, which a save never leaves behind (llmtrain.checkpoint) but a
    hand edit, a partial copy or a crash on a filesystem without atomic renames can.
    """
    steps = [p for p in root.glob("step_*") if p.name[5:].isdigit() and (p / "meta.json").is_file()]
    return max(steps, key=lambda p: int(p.name[5:]), default=None)


def relocate(cfg: DictConfig, old: str, new: str) -> DictConfig:
    """The config with every path inside the run directory `old` moved into `new`.

    Snapshots and checkpoint configs are resolved, so `${paths.output_dir}/metrics.jsonl` is already
    the original's absolute path; left alone, a reproduction, or a resume of a moved or copied run
    directory, would write into the original run.
    """
    def move(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
            return new + value[len(old):]
        return value

    return OmegaConf.create(move(OmegaConf.to_container(cfg)))


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory that holds a checkpoint folder (<run>/checkpoints/step_N)."""
    return checkpoint.resolve().parent.parent


def _run_dir_resolver(resume: str | None, default: str) -> str:
    """hydra.run.dir. Hydra resolves it before the job starts, outside the code whose errors it reports
    in one line, so a bad `resume=` or torchrun id exits here with the message alone instead of
    Hydra's traceback (and its "error during exception formatting")."""
    try:
        if resume is not None:
            return str(run_dir_of(find_checkpoint(resume)))
        if "TORCHELASTIC_RUN_ID" in os.environ:
            return torchrun_dir(Path(default), os.environ["TORCHELASTIC_RUN_ID"])
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    return claim_new_dir(Path(default))


def torchrun_dir(default: Path, run_id: str) -> str:
    """The directory every rank of a torchrun job shares (HYDRA.md 5.2): named after the run id that
    torchrun gives all of them (--rdzv-id, the same on every node), not after each rank's clock.
    Rank 0 claims it for a new run later (run.json), so a reused id fails instead of mixing runs."""
    if run_id == "none":
        raise ValueError("torchrun --rdzv-id=none: give each run an id (--rdzv-id=<id>, or --standalone), or "
                         "choose the directory with hydra.run.dir=<dir>")
    path = default.parent / f"torchrun_{run_id}"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _rank0_file_resolver(path: str) -> str:
    """Only rank 0 writes the log file; the other ranks of a torchrun job write to /dev/null."""
    return path if rank() == 0 else os.devnull


def claim_new_dir(path: str | os.PathLike) -> str:
    """`path`, else `path_2`, `path_3`, ...: the first that does not exist yet, created here.

    mkdir is atomic, so two runs started in the same second get two directories, never one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        candidate = path if n == 1 else path.with_name(f"{path.name}_{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return str(candidate)
    raise AssertionError("unreachable")


def holds_run(output_dir: str | os.PathLike) -> bool:
    """Whether a run claimed `output_dir` (its run.json exists; llmtrain.entry.claim_run_dir)."""
    return (Path(output_dir) / "run.json").exists()


def _snapshot_dir_resolver(resume: str | None, *, _root_: DictConfig) -> str | None:
    """hydra.output_subdir: where Hydra writes the job's .hydra/ snapshot, or None for no snapshot.

    Hydra writes it before the job starts, so before entry.claim_run_dir refuses a new run in a
    directory that already holds one (hydra.run.dir=<old run>, or a sweep rerun into its sweep dir):
    that run's .hydra/ would already describe the refused overrides. Such a job gets no snapshot,
    and the refusal leaves the directory as it was. Not cached: each job of a sweep has its own
    directory, known only once Hydra has set hydra.runtime.output_dir for it.
    """
    if rank() != 0:
        return None                                                  # Hydra writes no .hydra/ then
    if resume is None:
        output_dir = OmegaConf.select(_root_, "hydra.runtime.output_dir", default=None)
        return None if output_dir is not None and holds_run(output_dir) else ".hydra"
    global _resume_stamp
    _resume_stamp = _resume_stamp or f"{dt.datetime.now():%Y-%m-%d_%H-%M-%S}"   # one per process: re-read later
    return f".hydra/resume_{_resume_stamp}"        # never overwrite the original


_resume_stamp: str | None = None


def register_resolvers() -> None:
    """Resolvers used by conf/hydra/default.yaml; must run before @hydra.main composes."""
    OmegaConf.register_new_resolver("llmtrain.run_dir", _run_dir_resolver, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("llmtrain.new_dir", claim_new_dir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("llmtrain.snapshot_dir", _snapshot_dir_resolver, replace=True)
    OmegaConf.register_new_resolver("llmtrain.rank0_file", _rank0_file_resolver, replace=True)


def git_state(cwd: Path) -> dict[str, Any]:
    """Commit and dirty flag of the repository that holds `cwd` (None outside a repository)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


class RunRecord:
    """run.json: provenance at start, then status, timing and final metrics at the end.

    On resume the existing record is kept and the resume is appended to its `resumes` list.
    `init_from` says which earlier stage the weights came from (llmtrain.pretrained.stage_record).
    """

    def __init__(self, output_dir: Path, seed: int, device: str, resumed_from: str | None,
                 init_from: dict[str, Any] | None = None) -> None:
        self.path = output_dir / "run.json"
        if resumed_from is not None and self.path.exists():
            self.data = json.loads(self.path.read_text())
            self.data.setdefault("resumes", []).append(
                {"time": now(), "checkpoint": resumed_from, "command": sys.argv})
        else:
            self.data = {
                "command": sys.argv, "cwd": os.getcwd(), "git": git_state(Path(__file__).parent),
                "versions": package_versions(), "seed": seed, "device": device,
                "threads": torch.get_num_threads(),     # CPU results depend on it (llmtrain reproduce sets it)
                "start_time": now(),
                "init_from": init_from,
            }
        self.data.update(status="running", end_time=None)
        self.write()

    def finish(self, status: str, metrics: dict[str, float] | None, elapsed_s: float) -> None:
        self.data.update(status=status, end_time=now(), elapsed_s=round(elapsed_s, 3))
        if metrics is not None:
            self.data["final_metrics"] = metrics
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def save_resolved_config(cfg: DictConfig, output_dir: Path) -> None:
    """resolved_config.yaml: every value as used, interpolations resolved."""
    OmegaConf.save(cfg, output_dir / "resolved_config.yaml", resolve=True)
