"""The real CLI in a subprocess: what a run leaves on disk, overrides, resume, early errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO

SMOKE = ["debug=smoke", "hardware=cpu"]
ROW_KEYS = {"step", "epoch", "iteration", "lr", "loss", "grad_norm", "tokens_per_s", "elapsed_s", "ppl"}


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", "COLUMNS": "200"}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600, preexec_fn=_interactive_signals)


def _interactive_signals() -> None:
    """Ctrl-C as at a terminal, even when pytest itself runs as a background job (SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_leaves_the_design_run_directory(tmp_path):
    result = run_cli(*SMOKE, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "resolved_config.yaml",
                 "run.json", "metrics.jsonl", "train.log", "checkpoints/latest/meta.json",
                 "checkpoints/step_000008/model.safetensors", "checkpoints/step_000008/resume.pt"):
        assert (tmp_path / name).exists(), name
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "completed" and record["seed"] == 0 and record["device"] == "cpu"
    assert {"commit", "dirty"} <= set(record["git"]) and record["versions"]["torch"]
    assert "eval/loss" in record["final_metrics"] and "eval/accuracy" in record["final_metrics"]
    assert all(ROW_KEYS <= set(row) for row in rows(tmp_path))
    assert {"eval/loss", "eval/ppl", "eval/accuracy"} <= set(rows(tmp_path)[-1])
    assert OmegaConf.load(tmp_path / "resolved_config.yaml").model.vocab_size == 264
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {row["step"] for row in samples} == {4, 8} and {"prompt", "expected", "predicted"} <= set(samples[0])
    log = (tmp_path / "train.log").read_text()
    assert "held-out accuracy" in log and str(tmp_path) in log
    # Not a terminal: the progress bar's line is logged as it goes (each step here: 8 // 20 rounds up to 1)
    assert "step 3/8: loss " in log and re.search(r"step 4/8: loss .* eval \d\.\d{3} acc ", log)


# scheduler=sgdr, optimizer.lr, trainer.accumulation_steps and callbacks=none run as README commands
# (tests/e2e/test_readme.py); the overrides below are the ones the README does not show.
@pytest.mark.parametrize("override", ["scheduler=constant"])
def test_overrides_need_no_code_change(override, tmp_path):
    result = run_cli(*SMOKE, override, "trainer.max_steps=3", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "completed"


RESUME_RUN = [*SMOKE, "trainer.max_steps=40", "trainer.eval_every=10", "callbacks.checkpoint.every_steps=20"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted 40-step run that every interrupted-and-resumed run must equal."""
    run_dir = tmp_path_factory.mktemp("straight")
    result = run_cli(*RESUME_RUN, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


def test_resume_is_bit_exact(straight, tmp_path):
    """40 steps straight == 40 steps interrupted (Ctrl-C) at step 25, then `resume=` from step 20."""
    split = tmp_path / "split"
    common = RESUME_RUN
    interrupted = run_cli(*common, "+callbacks.stop={_target_:tests.e2e.interrupt.InterruptAt,step:25}",
                          f"hydra.run.dir={split}")
    assert interrupted.returncode != 0
    assert json.loads((split / "run.json").read_text())["status"] == "interrupted"
    assert rows(split)[-1]["step"] == 25               # rows 21-25 are redone after the resume
    resumed = run_cli(f"resume={split}", "+callbacks.stop=null")      # the saved config still has the stop
    assert resumed.returncode == 0, resumed.stderr
    a = (straight / "checkpoints/latest/model.safetensors").read_bytes()
    b = (split / "checkpoints/latest/model.safetensors").read_bytes()
    assert a == b
    losses = lambda d: [(r["step"], r["loss"], r["lr"], r.get("eval/loss")) for r in rows(d)]   # noqa: E731
    assert losses(straight) == losses(split) and len(losses(split)) == 40
    record = json.loads((split / "run.json").read_text())
    assert record["status"] == "completed" and len(record["resumes"]) == 1
    assert (split / ".hydra/config.yaml").exists() and list((split / ".hydra").glob("resume_*"))


def test_a_copied_run_directory_resumes_in_place_and_leaves_the_original_alone(straight, tmp_path):
    """The checkpoint's config holds the original's absolute paths; resuming the copy must not use them."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    interrupted = run_cli(*RESUME_RUN, "+callbacks.stop={_target_:tests.e2e.interrupt.InterruptAt,step:25}",
                          f"hydra.run.dir={original}")
    assert interrupted.returncode != 0
    shutil.copytree(original, copy, symlinks=True)
    before = {p.relative_to(original): p.read_bytes() for p in original.rglob("*") if p.is_file()}
    resumed = run_cli(f"resume={copy}", "+callbacks.stop=null")
    assert resumed.returncode == 0, resumed.stderr
    after = {p.relative_to(original): p.read_bytes() for p in original.rglob("*") if p.is_file()}
    assert after == before
    assert (copy / "checkpoints/latest").resolve().name == "step_000040"
    assert (copy / "checkpoints/latest/model.safetensors").read_bytes() == \
        (straight / "checkpoints/latest/model.safetensors").read_bytes()
    assert [r["loss"] for r in rows(copy)] == [r["loss"] for r in rows(straight)]
    assert json.loads((copy / "run.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_the_current_step_and_resume_is_exact(signal_name, straight, tmp_path):
    """SIGTERM (or one Ctrl-C) at step 25: a step-25 checkpoint, status interrupted; resume ends bit-exact."""
    split = tmp_path / "split"
    common = RESUME_RUN
    stopped = run_cli(*common, f"+callbacks.stop={{_target_:tests.e2e.interrupt.SignalAt,step:25,"
                               f"signal_name:{signal_name}}}", f"hydra.run.dir={split}")
    assert stopped.returncode == 128 + getattr(signal, signal_name)          # the shell convention: 143, 130
    assert f"{signal_name}: stopping after step" in stopped.stdout + stopped.stderr
    assert json.loads((split / "run.json").read_text())["status"] == "interrupted"
    assert (split / "checkpoints/latest").resolve().name == "step_000025"
    assert rows(split)[-1]["step"] == 25
    resumed = run_cli(f"resume={split}", "+callbacks.stop=null")
    assert resumed.returncode == 0, resumed.stderr
    a = (straight / "checkpoints/latest/model.safetensors").read_bytes()
    assert (split / "checkpoints/latest/model.safetensors").read_bytes() == a
    losses = lambda d: [(r["step"], r["loss"], r.get("eval/loss")) for r in rows(d)]   # noqa: E731
    assert losses(straight) == losses(split)


@pytest.mark.parametrize("args, message", [
    ([*SMOKE, "model.attention.n_kv_heads=3"], "n_heads=4 is not divisible by n_kv_heads=3"),
    ([*SMOKE, "model/size=huge"], "huge"),
    ([*SMOKE, "optimizer.lr=-0.001"], "optimizer.lr=-0.001"),
    (["data=text", "data.paths=[no_such_file.txt]"], "data.paths: no_such_file.txt does not exist"),
])
def test_bad_input_fails_at_start_naming_the_value(args, message, tmp_path):
    result = run_cli(*args, f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert not (tmp_path / "metrics.jsonl").exists()            # failed before training began


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_resume_of_a_directory_without_checkpoint_is_refused_in_one_line(tmp_path, where):
    path = tmp_path if where == "empty" else tmp_path / "nowhere"
    result = run_cli(f"resume={path}")
    expected = "no checkpoint there" if where == "empty" else "no such directory"
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"error: resume={path}: {expected}"), result.stderr
    assert "Traceback" not in result.stderr and "exception formatting" not in result.stderr


def test_resume_of_a_finished_run_says_how_to_extend_it(tmp_path):
    assert run_cli(*SMOKE, f"hydra.run.dir={tmp_path}").returncode == 0
    result = run_cli(f"resume={tmp_path}")
    assert result.returncode != 0 and "already finished its 8 steps" in result.stderr + result.stdout
    refused = run_cli(f"resume={tmp_path}", "optimizer.lr=0.5")
    assert refused.returncode != 0 and "optimizer.lr=0.5: a resumed run keeps" in refused.stderr
    assert not list((tmp_path / ".hydra").glob("resume_*"))      # refused resumes leave no snapshot
    longer = run_cli(f"resume={tmp_path}", "trainer.max_steps=12")
    assert longer.returncode == 0, longer.stderr
    assert rows(tmp_path)[-1]["step"] == 12
    assert len(list((tmp_path / ".hydra").glob("resume_*"))) == 1   # the one that ran keeps its own


def test_a_nan_stops_the_run_with_a_checkpoint_when_configured(tmp_path):
    result = run_cli(*SMOKE, "trainer.nonfinite=stop", "+callbacks.nan={_target_:tests.faults.NaNAt,steps:[3]}",
                     f"hydra.run.dir={tmp_path}")
    checkpoint = tmp_path / "checkpoints" / "step_000003"
    assert result.returncode == 1
    assert "step 3: non-finite loss and gradients" in result.stderr and "Traceback" not in result.stderr
    assert f"resume={checkpoint} trainer.nonfinite=skip" in result.stderr
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "stopped_nonfinite"
    assert (tmp_path / "checkpoints/latest").resolve() == checkpoint
    assert rows(tmp_path)[-1]["step"] == 3 and rows(tmp_path)[-1]["loss"] is None


def test_a_rank_of_a_multi_process_job_without_distributed_hardware_is_refused(tmp_path):
    """torchrun without hardware=ddp|fsdp: each rank would train the whole run into one directory."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", "WORLD_SIZE": "2", "RANK": "0"}
    result = subprocess.run([sys.executable, str(REPO / "run.py"), *SMOKE, f"hydra.run.dir={tmp_path}"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode != 0
    assert "one of 2 ranks" in result.stderr + result.stdout and "hardware=ddp" in result.stderr + result.stdout
    assert not (tmp_path / "metrics.jsonl").exists()
