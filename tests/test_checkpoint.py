"""Checkpoints: exact round trip, atomic writes, keep_last, nothing overwritten."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import llmtrain.checkpoint as ckpt
from llmtrain.checkpoint import load_checkpoint, prune, save_checkpoint
from tests.conftest import REPO
from tests.test_trainer import make_trainer


def trained(steps: int = 2):
    trainer = make_trainer(1, 1)
    trainer.total_steps = steps
    trainer.fit()
    return trainer


def test_round_trip_restores_weights_optimizer_and_counters(tmp_path):
    trainer = trained()
    path = save_checkpoint(tmp_path, trainer, "seed: 0\n")
    fresh = make_trainer(1, 1)
    meta = load_checkpoint(path, fresh)
    assert meta["step"] == 2 and fresh.step == 2 and fresh.iteration == 2
    for (name, a), b in zip(trainer.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.model.lm_head.weight.data_ptr() == fresh.model.embed.weight.data_ptr()   # still tied
    assert torch.equal(fresh.optimizer.state_dict()["state"][0]["exp_avg"],
                       trainer.optimizer.state_dict()["state"][0]["exp_avg"])
    assert fresh.scheduler.last_epoch == trainer.scheduler.last_epoch
    assert (path / "config.yaml").read_text() == "seed: 0\n"
    assert (tmp_path / "latest").resolve() == path.resolve()


def test_a_write_that_dies_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    trainer = trained(1)
    first = save_checkpoint(tmp_path, trainer, "")
    trainer.step = 2

    def die(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", die)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, trainer, "")
    monkeypatch.undo()
    assert (tmp_path / "latest").resolve() == first.resolve()
    assert load_checkpoint(tmp_path / "latest", make_trainer(1, 1))["step"] == 1
    save_checkpoint(tmp_path, trainer, "")          # the next write clears the debris
    assert not list(tmp_path.glob(".tmp_*")) and (tmp_path / "latest").resolve().name == "step_000002"


def test_keep_last_prunes_old_steps_but_never_latest(tmp_path):
    trainer = trained(1)
    for step in (1, 2, 3, 4):
        trainer.step = step
        save_checkpoint(tmp_path, trainer, "")
    prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000003", "step_000004"]


def test_an_existing_step_folder_is_moved_aside_not_overwritten(tmp_path):
    trainer = trained(1)
    save_checkpoint(tmp_path, trainer, "first")
    save_checkpoint(tmp_path, trainer, "second")
    aside = list(tmp_path.glob("step_000001.replaced_*"))
    assert len(aside) == 1 and (aside[0] / "config.yaml").read_text() == "first"
    assert (tmp_path / "latest" / "config.yaml").read_text() == "second"


def test_sigkill_during_writes_leaves_latest_loadable(tmp_path):
    script = textwrap.dedent(f"""
        import itertools, sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from llmtrain.checkpoint import save_checkpoint
        from tests.test_trainer import make_trainer
        trainer = make_trainer(1, 1)
        trainer.total_steps = 1
        trainer.fit()
        for step in itertools.count(1):
            trainer.step = step
            save_checkpoint(Path({str(tmp_path)!r}), trainer, "x" * 1_000_000)
            print(step, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(3):                                   # let a few checkpoints land, then kill mid-stream
        proc.stdout.readline()
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = tmp_path / "latest"
    meta = load_checkpoint(latest, make_trainer(1, 1))
    assert meta["step"] >= 3


def test_identical_weights_give_identical_files_in_separate_processes(tmp_path):
    """The weights file must not depend on the process (e.g. header order), or resume is not byte-exact."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from llmtrain.checkpoint import save_checkpoint
        from tests.test_trainer import make_trainer
        torch.manual_seed(0)
        save_checkpoint(__import__("pathlib").Path(sys.argv[1]), make_trainer(1, 1))
    """)
    files = []
    for i, hash_seed in enumerate(("1", "2", "3")):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / str(i))], check=True, env=env, cwd=REPO)
        files.append((tmp_path / str(i) / "step_000000" / "model.safetensors").read_bytes())
    assert files[0] == files[1] == files[2]
