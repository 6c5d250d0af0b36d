"""`hardware.nprocs=N`: the one Hydra job starts N rank processes itself (HYDRA.md 5.3, pattern B).

Hydra runs once, in the job: one run directory, one timestamp, and `-m` sweeps and optuna work as
for one process. The job hands each worker the resolved config as plain data (spawned children
have no resolvers, and `${now:}` must not be evaluated again) through torch's elastic agent with a
c10d rendezvous on a free local port (parallel jobs never collide), and returns rank 0's metrics.
Workers never touch Hydra; rank 0 logs to the console and to the job's train.log, the other ranks
only print warnings and errors.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def under_launcher() -> bool:
    """True in a rank process (torchrun, a worker of `launch`, SLURM with submitit's environment)."""
    return "RANK" in os.environ


def launch(cfg: DictConfig, checkpoint: Path | None, nprocs: int) -> dict[str, float]:
    """Run `llmtrain.entry.run` in `nprocs` local rank processes; rank 0's final metrics."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nprocs, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id=uuid.uuid4().hex, max_restarts=0,
                          start_method="spawn", monitor_interval=0.1)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)   # agent chatter
    log.info("starting %d rank processes (hardware.nprocs=%d)", nprocs, nprocs)
    outcome, value = elastic_launch(config, worker)(plain, None if checkpoint is None else str(checkpoint))[0]
    if outcome == "stopped":
        raise value                      # as in one process: StopRequested, NonFiniteError, KeyboardInterrupt
    return value


def worker(config: dict[str, Any], checkpoint: str | None) -> tuple[str, Any]:
    """One rank: the elastic agent set RANK, WORLD_SIZE, MASTER_ADDR/PORT in its environment.

    Returns ("done", final metrics), or ("stopped", the error) for a run that stopped between two
    steps with a checkpoint (all ranks stop at the same step). Returned, not raised: torch's spawn
    wrapper swallows a KeyboardInterrupt (StopRequested is one) and exits 0 without a return value,
    and the agent would then wait for it forever.
    """
    from llmtrain.entry import run
    from llmtrain.trainer import NonFiniteError

    cfg = OmegaConf.create(config)
    rank_logging(int(os.environ["RANK"]), Path(cfg.paths.output_dir) / "train.log")
    try:
        metrics, _ = run(cfg, None if checkpoint is None else Path(checkpoint), claim=False)
    except (KeyboardInterrupt, NonFiniteError) as error:
        return "stopped", error
    return "done", metrics


def rank_logging(rank: int, log_file: Path) -> None:
    """Rank 0: INFO to the console and appended to the job's log file; other ranks: warnings and up."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.addHandler(console)
    if rank == 0:
        file = logging.FileHandler(log_file)
        file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(file)
