"""Build a model preset of conf/ (model=<kind>, model/size=<size>) outside a run, for the benchmarks."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from llmtrain.pretrained import build

CONF = Path(__file__).resolve().parents[1] / "conf"


def build_preset(model: str, size: str, vocab_size: int = 264) -> nn.Module:
    """The model of `python run.py model=<model> model/size=<size>`; a preset's own vocab_size wins."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", f"model/size={size}", "paths.output_dir=unused"])
    GlobalHydra.instance().clear()
    node = cfg.model
    if node.vocab_size is None:
        node.vocab_size = vocab_size
    return build(node)
