"""Every combination of group options composes and resolves; every option instantiates."""

from __future__ import annotations

import itertools

import pytest
import torch
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import REPO, compose_cfg, group_options

GROUPS = ("model", "model/size", "strategy", "optimizer", "scheduler", "data", "hardware", "callbacks")
COMBOS = list(itertools.product(*(group_options(g) for g in GROUPS)))


def test_groups_are_discovered():
    assert len(COMBOS) >= 54            # guards against a test that silently checks nothing
    assert {"tiny", "small", "1b"} <= set(group_options("model/size"))
    assert {"cosine", "sgdr", "constant"} <= set(group_options("scheduler"))


MUST_BE_GIVEN = {"data.paths"}     # the only ??? values: things no default can know


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_every_combination_composes_and_resolves(combo, tmp_path):
    cfg = compose_cfg(*(f"{g}={o}" for g, o in zip(GROUPS, combo)), f"paths.output_dir={tmp_path}")
    OmegaConf.to_container(cfg, resolve=True)
    assert OmegaConf.missing_keys(cfg) <= MUST_BE_GIVEN


@pytest.mark.parametrize("size", group_options("model/size"))
@pytest.mark.parametrize("model", group_options("model"))
def test_every_model_builds_on_meta(model, size, tmp_path):
    cfg = compose_cfg(f"model={model}", f"model/size={size}", f"paths.output_dir={tmp_path}")
    with torch.device("meta"):
        net = instantiate(cfg.model, vocab_size=cfg.model.vocab_size or 264)
    assert all(p.is_meta for p in net.parameters())


def test_1b_preset_has_one_billion_parameters(tmp_path):
    cfg = compose_cfg("model/size=1b", f"paths.output_dir={tmp_path}")
    with torch.device("meta"):
        net = instantiate(cfg.model)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - 1.0e9) <= 0.05e9, n


@pytest.mark.parametrize("group", ["strategy", "optimizer", "scheduler", "data", "hardware", "callbacks"])
def test_every_option_instantiates(group, tmp_path):
    for option in group_options(group):
        cfg = compose_cfg(f"{group}={option}", f"paths.output_dir={tmp_path}")
        node = cfg[group]
        if "paths" in node.keys():                # data=text: point it at a real file
            (tmp_path / "a.txt").write_text("hello")
            node.paths = [str(tmp_path / "a.txt")]
        if group == "hardware" and node.device == "cuda" and not torch.cuda.is_available():
            with pytest.raises(InstantiationException, match="CUDA is not available"):
                instantiate(node)
            continue
        nodes = node.values() if group == "callbacks" else [node]
        for item in nodes:
            assert instantiate(item) is not None


def test_unknown_group_option_is_refused_with_its_name(tmp_path):
    with pytest.raises(ConfigCompositionException, match="model/size.*huge|huge.*model/size"):
        compose_cfg("model/size=huge", f"paths.output_dir={tmp_path}")


EXPERIMENTS = group_options("experiment")


def test_experiments_are_visible_through_the_search_path_plugin():
    assert "tiny_long" in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_is_recorded(name, tmp_path):
    cfg = compose_cfg(f"experiment={name}", f"paths.output_dir={tmp_path}")
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert f"`python run.py experiment={name}`" in (REPO / "experiments" / "README.md").read_text()
