"""Every command the README shows runs (shortened with debug=smoke where it would train long)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.e2e.test_cli import run_cli

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
SEQUENCE = next(block for block in BLOCKS if "llmtrain export" in block)   # commands that build on each other
COMMANDS = [line.split("  #")[0].strip() for block in BLOCKS if block is not SEQUENCE
            for line in block.splitlines() if line.startswith("python run.py")]
RESUME_PLACEHOLDER = "outputs/2026-11-24/10-00-00"


def test_the_readme_opens_with_the_two_commands_for_a_fresh_machine():
    first, second = BLOCKS[0].strip().splitlines()[:2]
    assert first.endswith("&& python run.py") and "pip install" in first
    assert second.endswith("&& python -m pytest") and ".[test]" in second
    test_command = second.split(". .venv/bin/activate && ", 1)[1]
    assert test_command in (REPO / ".ci" / "run").read_text().splitlines()      # CI runs it verbatim


def test_readme_run_commands_are_found():
    assert len(COMMANDS) >= 8, COMMANDS


@pytest.mark.parametrize("command", COMMANDS[1:])      # the first is the README's main job: test_default_run
def test_readme_run_command(command, tmp_path):
    args = shlex.split(command)[2:]
    if args and args[0].startswith("--"):
        result = run_cli(*args)
        assert result.returncode == 0 and result.stdout, result.stderr
        return
    if any(a.startswith("resume=") for a in args):       # make the run the placeholder names
        assert run_cli("debug=smoke", "hardware=cpu", f"hydra.run.dir={tmp_path / RESUME_PLACEHOLDER}",
                       cwd=tmp_path).returncode == 0
        args.append("trainer.max_steps=10")
    else:
        args = ["debug=smoke", *args]
    if any(a.startswith("data.paths=") for a in args):
        (tmp_path / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸。\n" * 400)
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run directory" in result.stdout + result.stderr


def test_readme_variant_block_runs_in_order(tmp_path):
    """model variants, then generate / export from a run, then a run that starts from the export."""
    assert run_cli("debug=smoke", "hardware=cpu", f"hydra.run.dir={tmp_path / RESUME_PLACEHOLDER}",
                   cwd=tmp_path).returncode == 0
    lines = [line.split("  #")[0].strip() for line in SEQUENCE.splitlines() if line.strip()]
    assert len(lines) >= 6 and any(line.startswith("llmtrain generate") for line in lines)
    for line in lines:
        args = shlex.split(line)
        if args[0] == "llmtrain":
            result = subprocess.run([sys.executable, "-m", "llmtrain.cli", *args[1:]], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=600)
        else:
            result = run_cli("debug=smoke", "hardware=cpu", *args[2:], cwd=tmp_path)
        assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
    assert (tmp_path / "exported_hf" / "config.json").is_file()


def test_readme_benchmark_command_runs():
    command = re.search(r"`(python benchmarks/train_throughput.py)`", README).group(1)
    result = subprocess.run([sys.executable, *shlex.split(command)[1:], "--sizes", "tiny", "--steps", "2",
                             "--warmup", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| tiny gqa | ratio llmtrain/transformers" in result.stdout and "| tiny moe | ratio" in result.stdout


def test_readme_generation_benchmark_command_runs():
    command = re.search(r"`(python benchmarks/generate_throughput.py)`", README).group(1)
    result = subprocess.run([sys.executable, *shlex.split(command)[1:], "--sizes", "tiny", "--repeats", "1",
                             "--new-tokens", "8"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| gqa tiny | ratio llmtrain/transformers" in result.stdout and "| mla tiny | llmtrain |" in result.stdout
