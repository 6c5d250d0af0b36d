"""Checkpoints: exact round trip, atomic writes, keep_last, nothing overwritten, a full disk survived."""

from __future__ import annotations

import errno
import itertools
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest
import torch
from safetensors import SafetensorError

import llmtrain.checkpoint as ckpt
from llmtrain.callbacks.base import Callback
from llmtrain.callbacks.checkpoint import Checkpoint
from llmtrain.callbacks.metrics import JsonlMetrics
from llmtrain.callbacks.samples import SamplesJsonl
from llmtrain.checkpoint import load_checkpoint, prune, save_checkpoint
from llmtrain.rundir import find_checkpoint
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


def test_keep_last_also_bounds_the_folders_moved_aside_by_resumes_from_the_past(tmp_path):
    trainer = trained(1)
    for timeline in range(3):                  # the run, then two resumes from step 2 that redo 4 and 6
        for step in (2, 4, 6) if timeline == 0 else (4, 6):
            trainer.step = step
            save_checkpoint(tmp_path, trainer, f"timeline {timeline}")
            prune(tmp_path, keep_last=2)
            time.sleep(1.01 if step == 6 else 0)   # the aside's name carries the second it was moved
    names = sorted(p.name for p in tmp_path.glob("step_*"))
    assert [n for n in names if "replaced" not in n] == ["step_000004", "step_000006"]
    asides = sorted(tmp_path.glob("step_*.replaced_*"), key=lambda p: p.name)   # 4 asides made, the newest 2 kept
    assert [p.name[:11] for p in asides] == ["step_000006"] * 2
    assert [(p / "config.yaml").read_text() for p in asides] == ["timeline 0", "timeline 1"]
    for step in (8, 10):                        # then 8 and 10 are kept: the asides of step 6 are older
        trainer.step = step
        save_checkpoint(tmp_path, trainer, "timeline 2")
        prune(tmp_path, keep_last=2)
    assert len(list(tmp_path.glob("step_*.replaced_*"))) == (0 if step == 10 else 2)


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


ENOSPC = "No space left on device"
# Each fake fails the way the real writer did on a full tmpfs (safetensors 0.8, torch 2.13).


def fail_safetensors(monkeypatch):
    def save_file(tensors, filename, metadata=None):           # safetensors (Rust): only its message says so
        pathlib.Path(filename).write_bytes(b"partial")
        raise SafetensorError(f"Error while serializing: I/O error: {ENOSPC} (os error 28)")
    monkeypatch.setattr(ckpt, "save_file", save_file)


def fail_torch_save(monkeypatch):
    def save(obj, handle):                                     # torch.save: a RuntimeError over the OSError
        handle.write(b"PK partial")
        try:
            raise OSError(errno.ENOSPC, ENOSPC)
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(ckpt.torch, "save", save)


def fail_meta_json(monkeypatch):
    write_text = pathlib.Path.write_text

    def partial(self, data, *args, **kwargs):
        if self.name != "meta.json":
            return write_text(self, data, *args, **kwargs)
        write_text(self, data[:10])
        raise OSError(errno.ENOSPC, ENOSPC)
    monkeypatch.setattr(pathlib.Path, "write_text", partial)


def fail_os(target, name: str):
    def patch(monkeypatch):
        def fail(*args, **kwargs):
            raise OSError(errno.ENOSPC, ENOSPC)
        monkeypatch.setattr(target, name, fail)
    return patch


def fail_fsync_after_latest(monkeypatch):
    fsync_dir = ckpt._fsync_dir

    def fail(path):
        if (path / "latest").resolve().name == "step_000002":      # latest was just repointed: not yet durable
            raise OSError(errno.ENOSPC, ENOSPC)
        fsync_dir(path)
    monkeypatch.setattr(ckpt, "_fsync_dir", fail)


FAILURES = {"model.safetensors": fail_safetensors, "resume.pt": fail_torch_save, "meta.json": fail_meta_json,
            "fsync": fail_os(ckpt.os, "fsync"), "rename": fail_os(pathlib.Path, "rename"),
            "symlink": fail_os(pathlib.Path, "symlink_to"), "fsync of latest": fail_fsync_after_latest}


@pytest.mark.parametrize("point", FAILURES)
def test_a_full_disk_at_any_point_leaves_the_previous_checkpoint_intact(point, tmp_path, monkeypatch):
    trainer = trained(1)
    first = save_checkpoint(tmp_path, trainer, "seed: 0\n")
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    trainer.step = 2
    FAILURES[point](monkeypatch)
    with pytest.raises(OSError, match=ENOSPC) as error:
        save_checkpoint(tmp_path, trainer, "seed: 0\n")
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001"]     # no debris, no step 2
    assert (tmp_path / "latest").resolve() == first.resolve()
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_a_full_disk_while_replacing_a_step_folder_puts_the_old_one_back(tmp_path, monkeypatch):
    trainer = trained(1)
    save_checkpoint(tmp_path, trainer, "first")
    fail_os(pathlib.Path, "symlink_to")(monkeypatch)            # after the new folder took the old one's place
    with pytest.raises(OSError, match=ENOSPC):
        save_checkpoint(tmp_path, trainer, "second")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001"]
    assert (tmp_path / "latest" / "config.yaml").read_text() == "first"


@pytest.mark.parametrize("name, nth", [("symlink_to", 1), ("rename", 1), ("symlink_to", 2), ("rename", 2),
                                       ("symlink_to", 3)])
def test_a_failure_at_any_step_of_a_replacement_puts_the_folder_and_latest_back(name, nth, tmp_path, monkeypatch):
    trainer = trained(1)
    save_checkpoint(tmp_path, trainer, "first")                 # latest -> step_000001, which is replaced next
    calls, real = itertools.count(1), getattr(pathlib.Path, name)

    def fail_nth(*args, **kwargs):
        if next(calls) == nth:
            raise OSError(errno.ENOSPC, ENOSPC)
        return real(*args, **kwargs)
    monkeypatch.setattr(pathlib.Path, name, fail_nth)
    with pytest.raises(OSError, match=ENOSPC):
        save_checkpoint(tmp_path, trainer, "second")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001"]
    assert os.readlink(tmp_path / "latest") == "step_000001"
    assert (tmp_path / "latest" / "config.yaml").read_text() == "first"


class ListDir(Callback):
    runs_last = True              # after the checkpoint callback, listed before it: sees its save

    def __init__(self, root: pathlib.Path) -> None:
        self.root, self.seen = root, []

    def on_step_end(self, trainer, metrics) -> None:
        self.seen.append(sorted(os.listdir(self.root)))


def test_a_failed_periodic_save_is_logged_and_training_goes_on(tmp_path, monkeypatch, caplog):
    calls, real_save_file = itertools.count(1), ckpt.save_file

    def save_file(*args, **kwargs):                            # the disk is full for the second checkpoint only
        if next(calls) == 2:
            raise OSError(errno.ENOSPC, ENOSPC)
        real_save_file(*args, **kwargs)
    monkeypatch.setattr(ckpt, "save_file", save_file)
    root = tmp_path / "checkpoints"
    listing = ListDir(root)
    trainer = make_trainer(1, 1, [Checkpoint(str(root), every_steps=1, keep_last=1), listing])
    trainer.total_steps = 3
    trainer.fit()
    assert listing.seen[1] == ["latest", "step_000001"]          # after the failure: step 1 kept, nothing else
    assert (root / "latest").resolve().name == "step_000003" and trainer.step == 3
    assert (f"checkpoint of step 2 was NOT saved: [Errno 28] {ENOSPC}: '{root}/.tmp_step_000002/model.safetensors'. "
            f"{root}/latest still points at step_000001 (intact): resume={tmp_path} would continue from step 1; "
            "training goes on and tries again at step 3.") in caplog.text


@pytest.mark.parametrize("every_steps", [1, 100])           # the final save in on_step_end, or in on_train_end
def test_a_failed_final_save_fails_the_run(every_steps, tmp_path, monkeypatch, caplog):
    root = tmp_path / "checkpoints"
    trainer = make_trainer(1, 1, [Checkpoint(str(root), every_steps=every_steps)])
    trainer.total_steps = 2
    fail_meta_json(monkeypatch)
    with pytest.raises(OSError, match=ENOSPC):
        trainer.fit()
    final = caplog.records[-1].getMessage()
    assert final.startswith("checkpoint of step 2 was NOT saved") and "no earlier checkpoint" in final
    assert final.endswith("this was the run's final save, so the run fails.") and trainer.step == 2


class Killed(BaseException):
    """Stands in for SIGKILL: raised in the middle of a save whose clean-up is disabled."""


def test_a_crash_between_the_renames_of_a_replaced_step_leaves_latest_complete(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    trainer = trained(1)
    save_checkpoint(root, trainer, "first")                    # latest -> step_000001, about to be replaced
    rename = pathlib.Path.rename

    def killed_after_moving_aside(self, target):
        moved = rename(self, target)
        if ".replaced_" in pathlib.Path(target).name:
            raise Killed
        return moved
    monkeypatch.setattr(pathlib.Path, "rename", killed_after_moving_aside)
    monkeypatch.setattr(ckpt, "_undo", lambda *args, **kwargs: None)     # a killed process cleans nothing up
    with pytest.raises(Killed):
        save_checkpoint(root, trainer, "second")
    monkeypatch.undo()
    assert (root / "latest" / "meta.json").is_file()
    assert load_checkpoint(find_checkpoint(tmp_path), make_trainer(1, 1))["step"] == 1    # resume=<run dir>


def test_latest_names_a_complete_checkpoint_after_every_rename_of_a_replacement(tmp_path, monkeypatch):
    trainer = trained(1)
    save_checkpoint(tmp_path, trainer, "first")
    rename, replace, seen = pathlib.Path.rename, os.replace, []

    def checked(move):
        def wrapper(*args):
            move(*args)
            seen.append((tmp_path / "latest" / "meta.json").is_file())     # a crash right here would see this
        return wrapper
    monkeypatch.setattr(pathlib.Path, "rename", checked(rename))
    monkeypatch.setattr(ckpt.os, "replace", checked(replace))
    save_checkpoint(tmp_path, trainer, "second")
    monkeypatch.undo()
    assert len(seen) >= 3 and all(seen)
    assert (tmp_path / "latest" / "config.yaml").read_text() == "second"


def test_resume_falls_back_to_the_newest_complete_step_when_latest_dangles(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    trainer = trained(1)
    for step in (1, 2):
        trainer.step = step
        save_checkpoint(root, trainer, "")
    (root / "step_000003").mkdir()                             # a folder without meta.json is not complete
    (root / "latest").unlink()
    (root / "latest").symlink_to("step_000004")
    assert find_checkpoint(tmp_path) == (root / "step_000002").resolve()
    assert "using the newest complete checkpoint, step_000002" in caplog.text


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names each fsynced descriptor from /proc (Linux)")
def test_renames_and_latest_are_made_durable_by_fsyncing_their_directories(tmp_path, monkeypatch):
    trainer = trained(1)
    save_checkpoint(tmp_path, trainer, "first")
    events, fsync, replace = [], os.fsync, os.replace

    def logged_fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            events.append(("fsync dir", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def logged_replace(src, dst):
        replace(src, dst)
        events.append(("replace", str(dst)))
    monkeypatch.setattr(ckpt.os, "fsync", logged_fsync)
    monkeypatch.setattr(ckpt.os, "replace", logged_replace)
    trainer.step = 2
    save_checkpoint(tmp_path, trainer, "second")
    monkeypatch.undo()
    root = str(tmp_path.resolve())
    assert ("fsync dir", f"{root}/.tmp_step_000002") in events           # the files' entries, before the rename
    assert events[-2:] == [("replace", f"{tmp_path}/latest"), ("fsync dir", root)]


@pytest.mark.parametrize("jsonl", [JsonlMetrics, SamplesJsonl])
def test_resume_drops_a_last_line_cut_short_by_a_killed_process(jsonl, tmp_path, caplog):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"step": 12, "loss": 1.0}\n{"step": 13, "loss": 0.9}\n{"step": 14, "lo')
    callback = jsonl(str(path))
    callback.on_train_begin(types.SimpleNamespace(step=13))      # resumed from the checkpoint of step 13
    if isinstance(callback, JsonlMetrics):
        callback.on_train_end(None)                                # closes the file it opened to append
    assert path.read_text() == '{"step": 12, "loss": 1.0}\n{"step": 13, "loss": 0.9}\n'
    assert f"{path}:3" in caplog.text and "cut short" in caplog.text


@pytest.mark.parametrize("jsonl", [JsonlMetrics, SamplesJsonl])
def test_resume_refuses_a_broken_line_in_the_middle_naming_file_and_line(jsonl, tmp_path):
    path = tmp_path / "rows.jsonl"
    text = '{"step": 12, "loss": 1.0}\n{"step": 13, "lo\n{"step": 14, "loss": 0.8}\n'
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}:2: "):
        jsonl(str(path)).on_train_begin(types.SimpleNamespace(step=13))
    assert path.read_text() == text                            # left as it was, for the user to look at
