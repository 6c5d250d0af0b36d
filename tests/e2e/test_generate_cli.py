"""`llmtrain generate` in a subprocess, on the checkpoint of a real smoke run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from llmtrain.data.bpe import tokenizer_config, train_bpe, write_tokenizer_dir
from llmtrain.data.chat import make_template
from llmtrain.data.tokenizer import SPECIAL_TOKENS
from llmtrain.pretrained import load_checkpoint_model
from tests.conftest import REPO
from tests.e2e.test_cli import SMOKE, run_cli


def llmtrain(*args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", **env}
    return subprocess.run([sys.executable, "-m", "llmtrain.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)


def argmax_continuation(model: torch.nn.Module, ids: Sequence[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Greedy decoding the slow way (a full forward per token, no cache): what --temperature 0 must print."""
    new: list[int] = []
    with torch.no_grad():
        while len(new) < max_new_tokens and (not new or new[-1] != eos_id):
            new.append(int(model(torch.tensor([[*ids, *new]]))[0, -1].argmax()))
    return new


def printed(text: str) -> str:
    """`text` as print() writes it and a text-mode pipe reads it back (\\r and \\r\\n become \\n)."""
    return (text + "\n").replace("\r\n", "\n").replace("\r", "\n")


def checkpoint_copy(run_dir: Path, folder: Path, changes: dict[str, Any]) -> Path:
    """The smoke run's step_000008 (weights and all) with `changes` (dotted keys) made to its config.yaml."""
    shutil.copytree(run_dir / "checkpoints" / "step_000008", folder, ignore=shutil.ignore_patterns("resume.pt"))
    config = OmegaConf.load(folder / "config.yaml")
    for key, value in changes.items():
        OmegaConf.update(config, key, value, merge=False)
    OmegaConf.save(config, folder / "config.yaml")
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("smoke_run")
    result = run_cli(*SMOKE, f"hydra.run.dir={path}")
    assert result.returncode == 0, result.stderr[-3000:]
    return path


@pytest.fixture(scope="module")
def varied(run_dir, tmp_path_factory) -> Path:
    """The smoke checkpoint with noise on its weights: after 8 steps it continues every prompt with
    spaces, which would not show which prompt, or which decoding, gave an output."""
    folder = checkpoint_copy(run_dir, tmp_path_factory.mktemp("varied") / "step", {})
    generator = torch.Generator().manual_seed(2)      # one whose greedy outputs are printable ASCII
    state = {name: t + 0.05 * torch.randn(t.shape, generator=generator)
             for name, t in load_file(folder / "model.safetensors").items()}
    save_file(state, folder / "model.safetensors")
    return folder


def test_generate_prints_one_completion_per_prompt(run_dir):
    result = llmtrain("generate", str(run_dir), "--prompt", "What is 2 + 3?", "--prompt", "Hi",
                      "--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "20", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("=== prompt ") == 2 and "'What is 2 + 3?'" in result.stdout


def test_greedy_output_is_the_argmax_continuation_whatever_the_seed(varied):
    model, tokenizer, _ = load_checkpoint_model(varied)
    expected = tokenizer.decode(argmax_continuation(model, tokenizer.encode("abc", bos=True), 6, tokenizer.eos_id))
    args = ["generate", str(varied), "--prompt", "abc", "--max-new-tokens", "6"]
    greedy = [llmtrain(*args, "--temperature", "0", "--seed", seed) for seed in ("1", "2")]
    assert all(result.returncode == 0 for result in greedy), greedy[0].stderr
    assert greedy[0].stdout == greedy[1].stdout == printed(expected)
    sampled = [llmtrain(*args, "--temperature", "1", "--seed", seed).stdout for seed in ("1", "2")]
    assert sampled[0] != sampled[1]                   # the seed matters when sampling, so it was ignored above


def test_chat_sends_each_prompt_as_a_user_turn_through_the_run_chat_template(varied):
    model, tokenizer, cfg = load_checkpoint_model(varied)
    question = "What is 2 + 3?"
    chat_ids = make_template(tokenizer, cfg.data.get("chat_template")).encode_prompt([{"role": "user",
                                                                                      "content": question}])
    assert chat_ids[-1] == tokenizer.special_tokens["<|assistant|>"]
    expected, plain = (tokenizer.decode(argmax_continuation(model, ids, 8, tokenizer.eos_id))
                       for ids in (chat_ids, tokenizer.encode(question, bos=True)))
    assert expected != plain                          # so the output shows which prompt was sent
    result = llmtrain("generate", str(varied), "--chat", "--prompt", question, "--max-new-tokens", "8",
                      "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == printed(expected)


def test_a_tokenizer_without_bos_prompts_without_it(run_dir, tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "corpus.txt").write_text("abc " * 100)
    specials = [token for token in SPECIAL_TOKENS if token != "<bos>"]
    bpe = train_bpe([tmp_path / "tok" / "corpus.txt"], vocab_size=len(specials) + 256, special_tokens=specials)
    write_tokenizer_dir(bpe, tokenizer_config(bpe, bos=None, eos="<eos>", pad="<pad>"), tmp_path / "tok")
    step = checkpoint_copy(run_dir, tmp_path / "step", {"data.tokenizer": {
        "_target_": "llmtrain.data.bpe.TokenizerFile", "path": str(tmp_path / "tok")}})
    model, tokenizer, _ = load_checkpoint_model(step)
    assert tokenizer.bos_id is None
    expected = tokenizer.decode(argmax_continuation(model, tokenizer.encode("abc"), 6, tokenizer.eos_id))
    result = llmtrain("generate", str(step), "--prompt", "abc", "--max-new-tokens", "6", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == printed(expected)


def test_a_device_this_machine_lacks_is_a_usage_error(run_dir):
    result = llmtrain("generate", str(run_dir), "--prompt", "x", "--device", "cuda", CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "argument --device: 'cuda': this machine has 0 CUDA device(s); use --device cpu" in result.stderr


def test_a_checkpoint_that_does_not_fit_its_config_fails_with_one_line_naming_the_tensor(run_dir, tmp_path):
    step = checkpoint_copy(run_dir, tmp_path / "step", {"model.vocab_size": 300})
    result = llmtrain("generate", str(step), "--prompt", "x")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "model.safetensors does not fit the model: embed.weight is [264, 128] there, [300, 128]" in result.stderr


def test_a_path_without_checkpoint_fails_with_one_line_naming_it(tmp_path):
    result = llmtrain("generate", str(tmp_path), "--prompt", "x")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert str(tmp_path) in result.stderr and "no checkpoint" in result.stderr


def test_ids_past_the_tokenizer_are_dropped_from_the_printed_text(varied, tmp_path):
    """A model with embedding rows no token owns (model.vocab_size above the tokenizer's, as many HF
    checkpoints pad it) can sample one: it has no text, and the command must not fail on it."""
    step = shutil.copytree(varied, tmp_path / "step")
    config = OmegaConf.load(step / "config.yaml")
    config.model.vocab_size = 300
    OmegaConf.save(config, step / "config.yaml")
    state = load_file(step / "model.safetensors")
    embed = state["embed.weight"]                     # tied: the output rows too
    state["embed.weight"] = torch.cat([embed, 3 * embed[8:44]])   # each padding row outscores its byte
    save_file(state, step / "model.safetensors")
    model, tokenizer, _ = load_checkpoint_model(step)
    ids = argmax_continuation(model, tokenizer.encode("abc", bos=True), 6, tokenizer.eos_id)
    assert any(i >= tokenizer.vocab_size for i in ids)         # the greedy path meets a padding row
    result = llmtrain("generate", str(step), "--prompt", "abc", "--max-new-tokens", "6", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == printed(tokenizer.decode([i for i in ids if i < tokenizer.vocab_size]))
