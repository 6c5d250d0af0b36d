"""python run.py [group=option ...] [key=value ...]: compose conf/ and train (see README.md)."""

import hydra
from omegaconf import DictConfig

from llmtrain.entry import train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    metrics, _ = train(cfg)
    return metrics["eval/loss"]          # the objective a Hydra sweeper (e.g. optuna) minimises


if __name__ == "__main__":
    main()
