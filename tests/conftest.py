"""Shared fixtures: compose the real conf/ with the Hydra compose API (HYDRA.md 6.1)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import llmtrain.entry  # noqa: F401  registers the resolvers conf/hydra needs

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
os.environ.setdefault("WANDB_MODE", "disabled")
# One built-in data cache (llmtrain.data.cache) for the session, inherited by the CLI subprocesses:
# the suite's runs generate the default data once, and the user's own cache is neither read nor filled.
os.environ["LLMTRAIN_CACHE"] = tempfile.mkdtemp(prefix="llmtrain-test-cache-")
atexit.register(shutil.rmtree, os.environ["LLMTRAIN_CACHE"], ignore_errors=True)


def compose_cfg(*overrides: str) -> DictConfig:
    """The job config for `python run.py <overrides>`, without the hydra node."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="test"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)       # ${hydra:...} and HydraConfig.get() work outside @hydra.main
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def group_options(group: str) -> list[str]:
    """Every option of a config group, as Hydra sees it (search-path plugins included)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        options = GlobalHydra.instance().config_loader().get_group_options(group)
    GlobalHydra.instance().clear()
    return sorted(options)


@pytest.fixture(autouse=True)
def _fresh_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


SMOKE = ("debug=smoke", "hardware=cpu", "callbacks.progress=null")
