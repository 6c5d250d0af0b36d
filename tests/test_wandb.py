"""callbacks=wandb: offline without credentials, one group per sweep, rank 0 only, never stops training.

Nothing here reaches the network: the CLI test runs with no credentials and an empty HOME (so the
logger picks offline mode), and the unit tests replace the wandb package with a recorder.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from llmtrain.callbacks.base import Callback
from llmtrain.callbacks.wandb import WandbLogger, hydra_sweep_group, resolve_mode, sweep_group
from tests.conftest import REPO, compose_cfg
from tests.test_trainer import make_trainer

CONFIG_YAML = "optimizer:\n  lr: 0.001\n"


def wandb_records(path: Path) -> list:
    """The records of an offline run's .wandb file: a LevelDB-style log of protobuf `Record`s.

    wandb 0.31 (wandb-core) keeps an offline run's config and history only in this file (what
    `wandb sync` uploads); files/config.yaml appears only once a run is online or synced.
    """
    from wandb.proto.wandb_internal_pb2 import Record

    data, pos, chunks, records = path.read_bytes(), 7, [], []    # 7: the ":W&B" file header
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:                               # a block's tail too short for a header
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])   # crc, length, full/first/middle/last
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(b"".join(chunks)))
            chunks = []
    return records


def test_a_sweep_without_credentials_logs_each_job_offline_into_its_run_directory(tmp_path):
    """`python run.py -m callbacks=wandb ...`: one offline run per job, the config, the metrics, one group."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "NETRC"))}
    env.update(HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1",
               WANDB_ERROR_REPORTING="false")               # no crash reports sent anywhere either
    sweep = tmp_path / "sweep"
    args = ["-m", "callbacks=wandb", "seed=0,1", "debug=smoke", "hardware=cpu", "~callbacks.progress",
            "trainer.max_steps=2", "trainer.eval_every=2", "data.n_train=2000", "data.n_eval=40",
            "data.accuracy_examples=8", "optimizer.lr=0.00123", f"hydra.sweep.dir={sweep}"]
    result = subprocess.run([sys.executable, str(REPO / "run.py"), *args], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "logging offline" in result.stdout + result.stderr
    jobs = [[r for f in (sweep / job / "wandb").glob("offline-run-*/*.wandb") for r in wandb_records(f)]
            for job in ("0", "1")]
    runs = [record.run for records in jobs for record in records if record.HasField("run")]
    assert len(runs) == 2 and runs[0].run_id != runs[1].run_id           # one wandb run per job
    assert runs[0].run_group == runs[1].run_group == str(sweep)
    for run in runs:
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        assert config["optimizer"]["lr"] == 0.00123                     # the resolved config
    for records in jobs:
        history = [record.history for record in records if record.HasField("history")]
        logged = {item.nested_key[0]: json.loads(item.value_json) for item in history[-1].item}
        assert len(history) == 2 and logged["_step"] == 2 and {"loss", "lr", "eval/loss"} <= set(logged)
        assert [record.exit.exit_code for record in records if record.HasField("exit")] == [0]   # finished


class FakeWandb(types.ModuleType):
    """Stands in for the wandb package and its run: records every call; `fail` names the one that raises."""

    def __init__(self, fail: str | None = None) -> None:
        super().__init__("wandb")
        self.fail, self.calls = fail, []

    def init(self, **kwargs):
        return self._record("init", kwargs) or self

    def log(self, metrics, step):
        self._record("log", step)

    def finish(self, exit_code):
        self._record("finish", exit_code)

    def _record(self, name, arg):
        self.calls.append((name, arg))
        if name == self.fail:
            raise RuntimeError(f"{name} broke")


@pytest.fixture
def fake_wandb(monkeypatch):
    def install(fail: str | None = None) -> FakeWandb:
        monkeypatch.setitem(sys.modules, "wandb", fake := FakeWandb(fail))
        return fake
    return install


def fit(*callbacks: Callback, start_step: int = 0):
    """Three steps of the tiny model of tests/test_trainer.py, from `start_step` (> 0: a resumed run)."""
    trainer = make_trainer(batch_size=1, accumulation_steps=1, callbacks=callbacks)
    trainer.total_steps, trainer.step, trainer.config_yaml = start_step + 3, start_step, CONFIG_YAML
    trainer.fit()
    return trainer


def test_a_run_logs_the_config_each_step_and_finishes(fake_wandb, tmp_path):
    fake = fake_wandb()
    fit(WandbLogger(mode="offline", dir=str(tmp_path / "run")))
    (_, init), *rest = fake.calls
    assert init["config"] == {"optimizer": {"lr": 0.001}} and init["name"] == "run" and init["group"] is None
    assert init["dir"] == tmp_path / "run" and init["resume"] is None
    assert rest == [("log", 1), ("log", 2), ("log", 3), ("finish", 0)]


def test_a_resumed_run_continues_the_stored_run_id(fake_wandb, tmp_path):
    fake = fake_wandb()
    fit(WandbLogger(mode="offline", dir=str(tmp_path)))
    fit(WandbLogger(mode="offline", dir=str(tmp_path)), start_step=3)
    first, resumed = (args for name, args in fake.calls if name == "init")
    assert resumed["id"] == first["id"] == (tmp_path / "wandb" / "run_id").read_text()
    assert resumed["resume"] == "allow"


@pytest.mark.parametrize("fail, calls", [("init", ["init"]), ("log", ["init", "log"]),
                                         ("finish", ["init", "log", "log", "log", "finish"])])
def test_a_wandb_failure_warns_once_and_training_completes(fail, calls, fake_wandb, caplog, tmp_path):
    fake = fake_wandb(fail)
    with caplog.at_level(logging.WARNING, logger="llmtrain.callbacks.wandb"):
        trainer = fit(WandbLogger(mode="offline", dir=str(tmp_path)))
    assert trainer.step == 3
    assert [name for name, _ in fake.calls] == calls                  # nothing is tried after a failure
    assert len(caplog.records) == 1 and f"wandb {fail} failed (RuntimeError: {fail} broke)" in caplog.text


class Crash(Callback):
    def on_step_end(self, trainer, metrics: dict[str, float]) -> None:
        raise ValueError("boom")


def test_a_crash_finishes_the_run_with_a_nonzero_exit_code(fake_wandb, tmp_path):
    fake = fake_wandb()
    with pytest.raises(ValueError, match="boom"):
        fit(WandbLogger(mode="offline", dir=str(tmp_path)), Crash())
    assert fake.calls[-1] == ("finish", 1)


def test_only_rank_0_calls_wandb(fake_wandb, monkeypatch, tmp_path):
    fake = fake_wandb()
    monkeypatch.setenv("RANK", "1")
    fit(WandbLogger(mode="offline", dir=str(tmp_path)))
    assert fake.calls == [] and not (tmp_path / "wandb").exists()


def test_disabled_mode_does_not_even_import_wandb(fake_wandb, monkeypatch, tmp_path):
    fake = fake_wandb()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    fit(WandbLogger(dir=str(tmp_path)))
    assert fake.calls == []


def test_the_group_is_the_sweep_directory_inside_a_multirun(fake_wandb, monkeypatch, tmp_path):
    assert sweep_group(RunMode.MULTIRUN, "multirun/2026-11-25/10-00-00") == "multirun/2026-11-25/10-00-00"
    assert sweep_group(RunMode.RUN, "multirun/2026-11-25/10-00-00") is None
    assert sweep_group(None, "multirun/2026-11-25/10-00-00") is None
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)    # restored afterwards
    compose_cfg("hydra.mode=MULTIRUN", "hydra.sweep.dir=multirun/sweep_a", f"paths.output_dir={tmp_path}")
    assert hydra_sweep_group() == "multirun/sweep_a"
    fake = fake_wandb()
    fit(WandbLogger(mode="offline", dir=str(tmp_path)))
    assert fake.calls[0][1]["group"] == "multirun/sweep_a"


def test_mode_is_offline_without_credentials_unless_set(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_mode(None) == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    assert resolve_mode(None) == "online"                             # what `wandb login` writes
    assert resolve_mode("offline") == "offline"                       # an explicit value wins
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(None) is None                                 # wandb reads WANDB_MODE itself


def test_a_bad_mode_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="callbacks.wandb.mode='onlin'"):
        WandbLogger(mode="onlin")


def test_rank_processes_of_a_sweep_job_keep_the_sweep_group(monkeypatch):
    """hardware.nprocs ranks rebuild the config without Hydra: the group is pinned before they start."""
    from omegaconf import OmegaConf

    import llmtrain.callbacks.wandb as wandb_module
    from llmtrain.entry import _pin_wandb_group
    monkeypatch.setattr(wandb_module, "hydra_sweep_group", lambda: "multirun/2026-12-07/10-00-00")
    cfg = OmegaConf.create({"callbacks": {"wandb": {"group": None}}})
    _pin_wandb_group(cfg)
    assert cfg.callbacks.wandb.group == "multirun/2026-12-07/10-00-00"
    chosen = OmegaConf.create({"callbacks": {"wandb": {"group": "mine"}}})
    _pin_wandb_group(chosen)
    assert chosen.callbacks.wandb.group == "mine"
    none = OmegaConf.create({"callbacks": {}})
    _pin_wandb_group(none)
    assert "wandb" not in none.callbacks
