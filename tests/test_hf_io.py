"""Hugging Face folders: `llmtrain export hf`, and `model.init_from=<HF folder or run>`."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from omegaconf import OmegaConf

from llmtrain.data.tokenizer import ByteTokenizer
from llmtrain.hf import io as hf_io
from llmtrain.pretrained import build, load_weights, source_model_node
from tests.e2e.test_cli import SMOKE, rows, run_cli

transformers = pytest.importorskip("transformers")
TEXT = ["What is 12 plus 30? Answer: 42", "12加30等于多少？答：42"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke")
    result = run_cli(*SMOKE, "callbacks.progress=null", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


def hf_logits(folder, ids_BT: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids_BT).logits


def random_qwen2(folder) -> None:
    """A small random Qwen2 written with save_pretrained, as a Hub download would look."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rope_theta=10000.0, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            (p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.1))
    model.save_pretrained(folder)


def test_exported_folder_loads_in_transformers_with_the_same_logits(smoke_run, tmp_path):
    result = _llmtrain("export", "hf", str(smoke_run), str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert "LlamaForCausalLM" in result.stdout
    ours = source_model_node(smoke_run)
    model = build(ours).eval()
    load_weights(model, smoke_run)
    tokenizer = ByteTokenizer()
    ids_BT = torch.tensor([tokenizer.encode(TEXT[0], bos=True)])
    with torch.no_grad():
        expected = model(ids_BT)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids_BT), expected, atol=1e-4, rtol=0)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXT:
        assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)
        assert hf_tokenizer.decode(tokenizer.encode(text)) == text
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id


def test_export_never_overwrites_and_names_a_missing_checkpoint(smoke_run, tmp_path):
    (tmp_path / "taken").mkdir()
    result = _llmtrain("export", "hf", str(smoke_run), str(tmp_path / "taken"))
    assert result.returncode == 2 and "already exists" in result.stderr
    result = _llmtrain("export", "hf", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert result.returncode == 2 and f"{tmp_path / 'nowhere'}: no such directory" in result.stderr


def test_qwen2_folder_imports_with_the_same_logits(tmp_path):
    random_qwen2(tmp_path)
    node = source_model_node(tmp_path)
    assert node.attention.bias is True and node.tie_embeddings is False and node.vocab_size == 300
    model = build(node).eval()
    load_weights(model, tmp_path)
    ids_BT = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        ours = model(ids_BT)
    torch.testing.assert_close(ours, hf_logits(tmp_path, ids_BT), atol=1e-4, rtol=0)


def test_init_from_a_hf_folder_trains_and_records_the_architecture(tmp_path):
    random_qwen2(tmp_path / "qwen2")
    result = run_cli(*SMOKE, f"model.init_from={tmp_path / 'qwen2'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    resolved = OmegaConf.load(tmp_path / "run" / "resolved_config.yaml")
    assert resolved.model.dim == 64 and resolved.model.attention.bias is True
    assert resolved.model.init_from == str(tmp_path / "qwen2")
    assert rows(tmp_path / "run")[0]["loss"] < 20           # trained from the imported weights, finite


def test_init_from_a_run_takes_its_architecture_and_weights(smoke_run, tmp_path):
    result = run_cli(*SMOKE, "model/size=small", f"model.init_from={smoke_run}", "trainer.max_steps=3",
                     f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert OmegaConf.load(tmp_path / "resolved_config.yaml").model.dim == 128     # the source's, not small's


def test_unknown_architecture_and_mismatched_tensor_are_named(tmp_path):
    random_qwen2(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="architecture 'GPT2LMHeadModel' cannot be imported"):
        source_model_node(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    node = source_model_node(tmp_path)
    node.ffn.hidden_dim = 128                      # a model that does not fit the checkpoint
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.(gate|up|down)_proj.weight"):
        load_weights(build(node), tmp_path)


THINKING = {"_target_": "llmtrain.models.thinking.ProjectedThinkingResidual", "_partial_": True,
            "r_min": 0.3, "r_max": 0.5}


def test_export_refuses_hrpo_thinking_modules_and_drops_them_only_when_asked(tmp_path, caplog):
    random_qwen2(tmp_path / "qwen2")
    node = source_model_node(tmp_path / "qwen2")
    node.thinking = THINKING
    model = build(node).eval()
    with pytest.raises(ValueError, match=r"HRPO latent-thinking modules .*gates r and i, Lambda, projection.*"
                                         r"--drop-thinking"):
        hf_io.export(model, ByteTokenizer(), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with caplog.at_level(logging.WARNING, logger="llmtrain.hf.io"):
        hf_io.export(model, ByteTokenizer(), tmp_path / "hf", drop_thinking=True)
    assert "they are dropped; the exported model decodes with plain token embeddings only" in caplog.text
    ids_BT = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        plain = model(ids_BT)                                   # no latents: the thinking module is unused
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids_BT), plain, atol=1e-4, rtol=0)


def test_a_model_with_thinking_imports_a_hf_folder_and_keeps_its_fresh_thinking_module(tmp_path):
    random_qwen2(tmp_path)
    node = source_model_node(tmp_path)
    node.thinking = THINKING
    model = build(node).eval()
    fresh = {k: v.clone() for k, v in model.thinking.state_dict().items()}
    load_weights(model, tmp_path)
    assert all(torch.equal(v, fresh[k]) for k, v in model.thinking.state_dict().items())
    ids_BT = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids_BT), hf_logits(tmp_path, ids_BT), atol=1e-4, rtol=0)


def test_unsupported_config_values_are_named(tmp_path):
    random_qwen2(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        hf_io.model_node(tmp_path)


def _llmtrain(*args: str):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "llmtrain.cli", *args], capture_output=True, text=True, timeout=300)
