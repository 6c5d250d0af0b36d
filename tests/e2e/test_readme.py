"""Every command the README shows runs (shortened with debug=smoke where it would train long)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shlex
import subprocess
import sys

import pytest

from llmtrain.data.formats import preference_messages
from llmtrain.data.records import RecordError
from tests.conftest import REPO
from tests.e2e.test_cli import rows, run_cli

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
SEQUENCE = next(block for block in BLOCKS if "llmtrain export" in block)   # commands that build on each other
PIPELINE = next(block for block in BLOCKS if "experiment=pipeline_sft" in block)
TOKENIZERS = next(block for block in BLOCKS if "llmtrain tokenizer train" in block)
SWEEPS = next(block for block in BLOCKS if "llmtrain summarize" in block)
DISTRIBUTED = next(block for block in BLOCKS if "torchrun" in block)
COMMANDS = [line.split("  #")[0].strip() for block in BLOCKS
            if block not in (SEQUENCE, PIPELINE, TOKENIZERS, SWEEPS, DISTRIBUTED)
            for line in block.splitlines() if line.startswith("python run.py")]
CHATS = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                       {"role": "assistant", "content": str(i + 1)}]} for i in range(40)]
PAIRS = [{"prompt": f"What is {i} plus 1?", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(40)]


def write_user_files(cwd) -> None:
    """The files the README's commands name: a text corpus, chats and preference pairs."""
    (cwd / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸。\n" * 400)
    (cwd / "chats.jsonl").write_text("".join(json.dumps(row) + "\n" for row in CHATS))
    (cwd / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
RESUME_PLACEHOLDER = "outputs/2026-11-24/10-00-00"


def test_the_readme_opens_with_the_two_commands_for_a_fresh_machine():
    first, second = BLOCKS[0].strip().splitlines()[:2]
    assert first.endswith("&& python run.py") and "pip install" in first
    assert second.endswith("&& python -m pytest") and ".[test]" in second
    test_command = second.split(". .venv/bin/activate && ", 1)[1]
    assert test_command in (REPO / ".ci" / "run").read_text().splitlines()      # CI runs it verbatim


def test_readme_quotes_the_message_of_a_null_preference_field():
    quoted = re.search(r"\(`(pairs\.jsonl:17: .*?)`", " ".join(README.split())).group(1)
    start, end = quoted.split(" ..., ")                        # the README shortens the list of shapes
    with pytest.raises(RecordError) as error:
        preference_messages("pairs.jsonl:17", {"prompt": "2+2?", "chosen": "4", "rejected": None})
    assert str(error.value).startswith(start) and str(error.value).endswith(end), str(error.value)


def test_readme_run_commands_are_found():
    assert len(COMMANDS) >= 8, COMMANDS


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "python run.py"])   # that one: test_default_run
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
        flags = [a for a in args if a.startswith("-")]                 # -m: argparse wants flags first
        args = [*flags, "debug=smoke", *[a for a in args if a not in flags]]
    if any(a.startswith("data.paths=") for a in args):
        write_user_files(tmp_path)
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run directory" in result.stdout + result.stderr


def run_readme_line(line: str, cwd, *extra: str) -> subprocess.CompletedProcess:
    """One line of a README block: an `llmtrain` command as typed, or a run shortened by debug=smoke."""
    args = shlex.split(line)
    if args[0] == "llmtrain":
        result = subprocess.run([sys.executable, "-m", "llmtrain.cli", *args[1:], *extra], cwd=cwd,
                                capture_output=True, text=True, timeout=600)
    else:
        flags = [a for a in args[2:] if a.startswith("-")]          # -m: argparse wants flags first
        result = run_cli(*flags, "debug=smoke", "hardware=cpu", *[a for a in args[2:] if a not in flags], *extra,
                         cwd=cwd)
    assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
    return result


def test_readme_variant_block_runs_in_order(tmp_path):
    """model variants, then generate / export from a run, then a run that starts from the export."""
    assert run_cli("debug=smoke", "hardware=cpu", f"hydra.run.dir={tmp_path / RESUME_PLACEHOLDER}",
                   cwd=tmp_path).returncode == 0
    lines = [line.split("  #")[0].strip() for line in SEQUENCE.splitlines() if line.strip()]
    assert len(lines) >= 6 and any(line.startswith("llmtrain generate") for line in lines)
    for line in lines:
        run_readme_line(line, tmp_path)
    assert (tmp_path / "exported_hf" / "config.json").is_file()


def test_readme_tokenizer_block_runs_in_order(tmp_path):
    """train a BPE tokenizer, write shards with it, train on the shards and on the text file."""
    write_user_files(tmp_path)
    lines = [line.split("  #")[0].strip() for line in TOKENIZERS.splitlines() if line.strip()]
    for line in lines:
        run_readme_line(line, tmp_path)
    assert (tmp_path / "shards" / "index.json").is_file() and (tmp_path / "tok" / "tokenizer.json").is_file()


def test_readme_pipeline_block_runs_in_order(tmp_path):
    """pre-train -> SFT -> DPO, each stage from the last one's directory (shortened with debug=smoke)."""
    lines = [line.split("  #")[0].strip() for line in PIPELINE.splitlines() if line.strip()]
    assert [line.split("experiment=")[1] for line in lines] == ["pipeline_pretrain", "pipeline_sft", "pipeline_dpo"]
    for line in lines:
        run_readme_line(line, tmp_path)
    pre, sft, dpo = (tmp_path / "outputs/pipeline" / stage for stage in ("pretrain", "sft", "dpo"))
    sft_rows, dpo_rows = rows(sft), rows(dpo)
    assert {"ppl", "response_tokens", "eval/ppl", "eval/accuracy"} <= set(sft_rows[-1])
    assert all(row["response_tokens"] > 0 for row in sft_rows)
    dpo_keys = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "nll/chosen"}
    assert dpo_keys <= set(dpo_rows[0]) and {f"eval/{k}" for k in dpo_keys} <= set(dpo_rows[-1])
    assert dpo_rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)   # policy == reference at step 1
    assert dpo_rows[0]["loss"] == pytest.approx(math.log(2) + dpo_rows[0]["nll/chosen"], abs=1e-5)
    assert "held-out preference accuracy" in (dpo / "train.log").read_text()
    assert json.loads((pre / "run.json").read_text())["init_from"] is None
    lineage = json.loads((dpo / "run.json").read_text())["init_from"]
    assert lineage["strategy"] == "llmtrain.strategies.sft.SFT" and lineage["step"] == 8
    assert lineage["checkpoint"].startswith(str(sft.resolve()))
    assert lineage["init_from"]["strategy"] == "llmtrain.strategies.seq.NextToken"


def test_readme_sweep_block_runs_in_order(tmp_path):
    """an lr sweep, its summary rebuilt, the parallel launcher, the optuna search, a reproduction."""
    lines = [line.split("  #")[0].strip() for line in SWEEPS.splitlines() if line.strip()]
    assert len(lines) == 5
    for line in lines:
        extra = ["hydra.sweeper.n_trials=2"] if "optuna" in line else []    # 8 trials in the recipe
        result = run_readme_line(line, tmp_path, *extra)
        if line.startswith("llmtrain reproduce"):
            assert "MATCH" in result.stdout + result.stderr
    sweep = tmp_path / "multirun" / "lr"
    summary = (sweep / "summary.md").read_text()
    assert summary.count("| COMPLETED |") == 3 and "optimizer.lr=0.0003" in summary
    assert json.loads((tmp_path / "multirun/lr/0.reproduce/reproduce.json").read_text())["match"] is True
    others = sorted(p.parent for p in (tmp_path / "multirun").rglob("summary.md") if p.parent != sweep)
    assert len(others) == 2                                  # the parallel sweep and the optuna search
    assert sum((d / "optimization_results.yaml").is_file() for d in others) == 1
    for sweep_dir in others:
        assert "**FAILED**" not in (sweep_dir / "summary.md").read_text()


@pytest.mark.slow       # ~2 min: the same engines run in tests/test_distributed.py (curves vs 1 process)
def test_readme_distributed_block_runs(tmp_path):
    """ddp, fsdp, torchrun, a ddp sweep, activation checkpointing and compile, each for a smoke run."""
    lines = [line.split("  #")[0].strip() for line in DISTRIBUTED.splitlines() if line.strip()]
    assert len(lines) == 6
    for line in lines:
        if line.startswith("torchrun"):
            args = shlex.split(line)
            command = [sys.executable, "-m", "torch.distributed.run", *args[1:2], str(REPO / "run.py"), *args[3:],
                       "debug=smoke", "callbacks.progress=null"]
            result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stderr[-3000:]
        else:
            run_readme_line(line, tmp_path)
    assert len(list((tmp_path / "outputs").rglob("run.json"))) == 5


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


def test_readme_dpo_benchmark_command_runs_or_names_its_extra():
    """TRL is the `bench` extra, not a test dependency: without it the command says what to install."""
    command = re.search(r"`(python benchmarks/dpo_throughput.py)`", README).group(1)
    result = subprocess.run([sys.executable, *shlex.split(command)[1:], "--steps", "1", "--warmup", "1"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    if importlib.util.find_spec("trl") is None:
        assert result.returncode != 0 and "pip install -e '.[bench]'" in result.stderr, result.stderr
    else:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "| llmtrain | online reference |" in result.stdout and "| TRL DPOTrainer |" in result.stdout


def test_readme_grpo_benchmark_command_runs_or_names_its_extra():
    """benchmarks/README.md's GRPO command as a --quick smoke run; without TRL it says what to install."""
    readme = (REPO / "benchmarks" / "README.md").read_text()
    command = re.search(r"`(python benchmarks/grpo_throughput.py)`", readme).group(1)
    result = subprocess.run([sys.executable, *shlex.split(command)[1:], "--quick"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    if importlib.util.find_spec("trl") is None:
        assert result.returncode != 0 and "pip install -e '.[bench]'" in result.stderr, result.stderr
    else:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "| llmtrain |" in result.stdout and "| TRL GRPOTrainer |" in result.stdout
        assert "every completion 8 tokens on both sides" in result.stdout
