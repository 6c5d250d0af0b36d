"""python run.py [group=option ...] [key=value ...]: compose conf/ and train (see README.md)."""

import logging
import os
import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from llmtrain.entry import train
from llmtrain.trainer import NonFiniteError, StopRequested


def quiet_other_ranks() -> None:
    """Under torchrun every rank runs this script; the console shows rank 0 (others: warnings and up)."""
    if int(os.environ.get("RANK", "0")) != 0:
        for handler in logging.getLogger().handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    quiet_other_ranks()
    try:
        metrics, _ = train(cfg)
    except StopRequested as stop:        # SIGTERM / Ctrl-C: checkpointed; the shell convention 128 + signal
        print(stop, file=sys.stderr)
        sys.exit(128 + signal.Signals[stop.reason].value)
    except NonFiniteError as error:      # checkpointed; the message says how to go on, a traceback would not
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise                        # the sweep records this job as failed and runs the others
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    return metrics["eval/loss"]          # the objective a Hydra sweeper (e.g. optuna) minimises


if __name__ == "__main__":
    main()
