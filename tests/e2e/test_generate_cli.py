"""`llmtrain generate` in a subprocess, on the checkpoint of a real smoke run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e.test_cli import SMOKE, run_cli


def llmtrain(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "llmtrain.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("smoke_run")
    result = run_cli(*SMOKE, f"hydra.run.dir={path}")
    assert result.returncode == 0, result.stderr[-3000:]
    return path


def test_generate_prints_one_completion_per_prompt(run_dir):
    result = llmtrain("generate", str(run_dir), "--prompt", "What is 2 + 3?", "--prompt", "Hi",
                      "--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "20", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("=== prompt ") == 2 and "'What is 2 + 3?'" in result.stdout


def test_a_checkpoint_folder_works_and_greedy_output_is_deterministic(run_dir):
    step = run_dir / "checkpoints" / "step_000008"
    args = ["--prompt", "abc", "--max-new-tokens", "6", "--temperature", "0"]
    first, second = llmtrain("generate", str(step), *args), llmtrain("generate", str(run_dir), *args)
    assert first.returncode == second.returncode == 0, first.stderr
    assert first.stdout == second.stdout                  # latest == step_000008 in a smoke run


def test_a_path_without_checkpoint_fails_with_one_line_naming_it(tmp_path):
    result = llmtrain("generate", str(tmp_path), "--prompt", "x")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert str(tmp_path) in result.stderr and "no checkpoint" in result.stderr
