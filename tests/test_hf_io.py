"""Hugging Face folders: `llmtrain export hf`, and `model.init_from=<HF folder or run>`."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from llmtrain.data.bpe import tokenizer_config, train_bpe, write_tokenizer_dir
from llmtrain.data.tokenizer import ByteTokenizer
from llmtrain.hf import io as hf_io
from llmtrain.hf.tokenizer import write_tokenizer_files
from llmtrain.pretrained import build, check_tokenizer, load_checkpoint_model, load_weights, source_model_node
from tests.conftest import compose_cfg
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
        assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text, bos=True)    # as the model was trained
        assert hf_tokenizer.decode(tokenizer.encode(text)) == text
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == \
        (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)


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


def test_init_from_a_hf_folder_starts_from_its_weights_and_records_the_architecture(tmp_path):
    random_qwen2(tmp_path / "qwen2")
    # The untrained folder's greedy answers hold ids 264..299, past the 264-id byte tokenizer: the
    # accuracy evaluation drops them (as transformers' decode does) instead of ending the run.
    result = run_cli(*SMOKE, f"model.init_from={tmp_path / 'qwen2'}", "optimizer.lr=1e-7",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    resolved = OmegaConf.load(tmp_path / "run" / "resolved_config.yaml")
    assert resolved.model.dim == 64 and resolved.model.attention.bias is True
    assert resolved.model.init_from == str(tmp_path / "qwen2")
    assert rows(tmp_path / "run")[0]["loss"] < 20
    # An Adam step moves a weight by about lr at most (Kingma & Ba 2015, 2.1): 8 steps at 1e-7 leave the
    # run within ~1e-6 of the folder's weights, where a fresh initialisation is ~0.1 away.
    trained, _, _ = load_checkpoint_model(tmp_path / "run")
    imported = build(source_model_node(tmp_path / "qwen2"))
    load_weights(imported, tmp_path / "qwen2")
    for name, tensor in imported.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[name], tensor, atol=1e-5, rtol=0, msg=name)


def test_init_from_a_run_takes_its_architecture_and_weights(smoke_run, tmp_path):
    result = run_cli(*SMOKE, "model/size=small", f"model.init_from={smoke_run}", "trainer.max_steps=3",
                     f"hydra.run.dir={tmp_path / 'refused'}")
    assert result.returncode != 0 and "model/size=small: with model.init_from=" in result.stderr  # not silently dropped
    result = run_cli(*SMOKE, f"model.init_from={smoke_run}", "trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert OmegaConf.load(tmp_path / "run/resolved_config.yaml").model.dim == 128     # the source's


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


def test_a_checkpoint_whose_shapes_do_not_fit_is_a_value_error_naming_the_tensor(smoke_run):
    node = source_model_node(smoke_run)
    node.vocab_size = 300
    with pytest.raises(ValueError, match=rf"model.init_from={smoke_run}: .*model.safetensors does not fit the model: "
                                         r"embed.weight is \[264, 128\] there, \[300, 128\] in the model"):
        load_weights(build(node), smoke_run)


def bpe_folder(folder, vocab_size: int = 300):
    """A BPE tokenizer trained on TEXT, as `llmtrain tokenizer train` writes it."""
    folder.mkdir(parents=True)
    (folder / "corpus.txt").write_text(" ".join(f"{TEXT[i % 2]} {i * 7919}" for i in range(2000)))
    tokenizer = train_bpe([folder / "corpus.txt"], vocab_size=vocab_size)
    write_tokenizer_dir(tokenizer, tokenizer_config(tokenizer, bos="<bos>", eos="<eos>", pad="<pad>"), folder)
    return folder


def file_tokenizer(path) -> DictConfig:
    return OmegaConf.create({"_target_": "llmtrain.data.bpe.TokenizerFile", "path": str(path)})


BYTE = OmegaConf.create({"_target_": "llmtrain.data.tokenizer.ByteTokenizer"})


def test_init_from_a_folder_of_neither_kind_says_what_it_expected(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")           # weights without their config.json
    with pytest.raises(ValueError, match=rf"model.init_from={tmp_path}: neither a Hugging Face model folder "
                                         rf"\(expected {tmp_path / 'config.json'} beside model.safetensors\) nor "
                                         rf"an llmtrain run directory or checkpoint \(expected {tmp_path}/checkpoints"):
        check_tokenizer(tmp_path, BYTE)
    with pytest.raises(ValueError, match=rf"strategy.reference={tmp_path}: neither a Hugging Face"):
        load_weights(torch.nn.Linear(1, 1), tmp_path, "strategy.reference")
    (tmp_path / "run.json").write_text("{}")                   # a run stopped before its first checkpoint
    with pytest.raises(ValueError, match="was the run stopped before its first checkpoint"):
        source_model_node(tmp_path)


def run_with_tokenizer(smoke_run, folder, tokenizer):
    """A copy of the smoke run's checkpoint whose config.yaml records `tokenizer` (weights: the byte model's)."""
    shutil.copytree(smoke_run / "checkpoints" / "step_000008", folder / "checkpoints" / "latest")
    config = OmegaConf.load(folder / "checkpoints" / "latest" / "config.yaml")
    config.data.tokenizer = tokenizer
    OmegaConf.save(config, folder / "checkpoints" / "latest" / "config.yaml")
    return folder


def test_init_from_refuses_a_tokenizer_that_gives_the_source_ids_other_meanings(smoke_run, tmp_path):
    bpe = bpe_folder(tmp_path / "bpe")
    with pytest.raises(ValueError, match=rf"model.init_from={smoke_run} was trained with tokenizer ByteTokenizer; "
                                         rf"this run uses TokenizerFile\({bpe}\), .*Set data/tokenizer=byte$"):
        check_tokenizer(smoke_run, file_tokenizer(bpe))
    source = run_with_tokenizer(smoke_run, tmp_path / "bpe_run", file_tokenizer(bpe))
    with pytest.raises(ValueError, match=rf"trained with tokenizer TokenizerFile\({bpe}\); this run uses "
                                         r"ByteTokenizer, where 292 of its 300 tokens have another id or none .*"
                                         rf"Set data/tokenizer=file data.tokenizer.path={bpe}$"):
        check_tokenizer(source, BYTE)


def test_init_from_takes_the_same_vocabulary_from_another_path(smoke_run, tmp_path, caplog):
    (tmp_path / "byte_files").mkdir()
    write_tokenizer_files(ByteTokenizer(), tmp_path / "byte_files")
    check_tokenizer(smoke_run, file_tokenizer(tmp_path / "byte_files"))      # ByteTokenizer's ids, as files
    source = run_with_tokenizer(smoke_run, tmp_path / "run", file_tokenizer(tmp_path / "byte_files"))
    shutil.copytree(tmp_path / "byte_files", tmp_path / "copy")
    check_tokenizer(source, file_tokenizer(tmp_path / "copy"))             # compared by vocabulary, not path
    shutil.rmtree(tmp_path / "byte_files")
    with caplog.at_level(logging.WARNING, logger="llmtrain.pretrained"):
        check_tokenizer(source, file_tokenizer(tmp_path / "copy"))         # the source's is gone: a warning
    assert "cannot be loaded now" in caplog.text and "make sure that this run's tokenizer is the one" in caplog.text


def test_init_from_with_too_few_embedding_rows_names_the_source(tmp_path):
    random_qwen2(tmp_path / "qwen2")                                          # vocab_size 300, no tokenizer files
    with pytest.raises(ValueError, match=rf"model.vocab_size=300 \(from model.init_from={tmp_path / 'qwen2'}\) "
                                         r"is smaller than the tokenizer's vocabulary \(400 tokens, TokenizerFile"):
        check_tokenizer(tmp_path / "qwen2", file_tokenizer(bpe_folder(tmp_path / "bpe", vocab_size=400)))


def test_init_from_a_hf_folder_refuses_a_tokenizer_other_than_its_tokenizer_json(tmp_path):
    random_qwen2(tmp_path / "qwen2")                                          # vocab_size 300
    bpe = bpe_folder(tmp_path / "bpe")
    shutil.copy(bpe / "tokenizer.json", tmp_path / "qwen2")
    with pytest.raises(ValueError, match=rf"trained with tokenizer {tmp_path / 'qwen2' / 'tokenizer.json'}; this run "
                                         rf"uses ByteTokenizer, .*Set data/tokenizer=file data.tokenizer.path="):
        check_tokenizer(tmp_path / "qwen2", BYTE)
    check_tokenizer(tmp_path / "qwen2", file_tokenizer(bpe))


def test_init_from_with_another_tokenizer_fails_at_startup(smoke_run, tmp_path):
    bpe = bpe_folder(tmp_path / "bpe", vocab_size=264)              # fits the source's 264 embedding rows
    result = run_cli(*SMOKE, f"model.init_from={smoke_run}", "data/tokenizer=file", f"data.tokenizer.path={bpe}",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0 and not (tmp_path / "run" / "checkpoints").exists()
    assert f"model.init_from={smoke_run} was trained with tokenizer ByteTokenizer" in result.stderr


def test_a_failed_export_leaves_no_temporary_folder(tmp_path):
    cfg = compose_cfg("model=mla", "model.attention.norm_eps=1e-5", "model.vocab_size=264",
                      f"paths.output_dir={tmp_path}")
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="latent RMSNorms with eps 1e-06"):
        hf_io.export(build(cfg.model), ByteTokenizer(), tmp_path / "out" / "hf")
    assert list((tmp_path / "out").iterdir()) == []


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


def test_a_dpo_reference_from_a_folder_with_another_tokenizer_is_refused(tmp_path):
    """strategy.reference=<dir> loads weights as init_from does, so it gets the same tokenizer check."""
    from types import SimpleNamespace

    from llmtrain.data.bpe import TokenizerFile
    from llmtrain.strategies.dpo import FrozenReference
    random_qwen2(tmp_path / "qwen2")                                          # vocab_size 300
    bpe = bpe_folder(tmp_path / "bpe")
    shutil.copy(bpe / "tokenizer.json", tmp_path / "qwen2")
    policy = build(source_model_node(tmp_path / "qwen2"))
    with pytest.raises(ValueError, match=r"strategy.reference=.*qwen2 was trained with tokenizer .*this run uses "
                                         r"ByteTokenizer"):
        FrozenReference(path=tmp_path / "qwen2").setup(policy, SimpleNamespace(tokenizer=ByteTokenizer()))
    reference = FrozenReference(path=tmp_path / "qwen2")
    reference.setup(policy, SimpleNamespace(tokenizer=TokenizerFile(str(bpe))))
    assert reference.model is not None
