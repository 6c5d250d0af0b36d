"""Bad values fail in the first second, naming the value, before any data is read or scored."""

from __future__ import annotations

import pytest

from llmtrain.data.builtin import BuiltinTask
from llmtrain.data.text import TextFiles
from llmtrain.entry import train
from tests.conftest import SMOKE, compose_cfg


@pytest.fixture
def no_setup(monkeypatch):
    """Data setup (generation, tokenisation) fails loudly: an early error must come before it."""
    def setup(self, format):
        raise AssertionError("the data was set up before the bad value was refused")

    for cls in (BuiltinTask, TextFiles):
        monkeypatch.setattr(cls, "setup", setup)


@pytest.mark.parametrize("overrides, message", [
    (["data.seq_len=4096"], r"data.seq_len=4096 is longer than the model's max_seq_len=2048"),
    (["model.max_seq_len=32"], r"data.seq_len=64 is longer than the model's max_seq_len=32"),
    (["strategy=grpo", "strategy.max_new_tokens=5000"], r"strategy.max_new_tokens=5000 leaves no room"),
    (["data.seq_len=1"], r"data.seq_len=1 must be >= 2"),
    (["optimizer.betas=[0.9]"], r"optimizer.betas=\[0.9\] must be two values in \[0, 1\)"),
    (["optimizer.betas=[0.9,1.5]"], r"optimizer.betas=\[0.9, 1.5\] must be two values"),
    (["scheduler.min_rate=1.5"], r"scheduler.min_rate=1.5 must be in \[0, 1\)"),
    (["callbacks.checkpoint.keep_last=0"], r"keep_last=0 must be >= 1"),
    (["hardware=ddp", "hardware.nprocs=0"], r"hardware.nprocs=0 must be >= 1"),
    (["data=text", "data.paths=[{corpus}]", "data.batch_size=0"], r"data.batch_size=0 must be >= 1"),
    (["data=text", "data.paths=[{corpus}]", "data.seq_len=0"], r"data.seq_len=0 must be >= 2"),
    (["trainer.eval_batches=0"], r"trainer.eval_batches=0 must be >= 1 or null"),
    (["trainer.accumulation_steps=0"], r"trainer.accumulation_steps=0 must be >= 1"),
    (["trainer.nonfinite=ignore"], r"trainer.nonfinite='ignore' must be one of"),
    (["trainer.max_steps=0"], r"trainer.max_steps=0 must be >= 1 or null"),
    (["trainer.max_steps=null", "trainer.epochs=null"], r"trainer.max_steps and trainer.epochs are both null"),
], ids=lambda x: x if isinstance(x, str) else "-".join(x))
def test_a_bad_value_fails_before_the_data_is_set_up(overrides, message, no_setup, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text " * 200)
    with pytest.raises(Exception, match=message):
        train(compose_cfg(*SMOKE, *(o.format(corpus=corpus) for o in overrides),
                          f"paths.output_dir={tmp_path / 'run'}"))


def test_one_path_given_without_brackets_is_a_list_of_one(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text to pack into rows " * 400)
    metrics, built = train(compose_cfg(*SMOKE, "data=text", f"data.paths={corpus}", "trainer.max_steps=1",
                                       f"paths.output_dir={tmp_path / 'run'}"))
    assert built["data"].paths == [corpus] and metrics["loss"] == metrics["loss"]


def test_model_overrides_are_refused_where_the_architecture_comes_from_elsewhere(tmp_path):
    source = tmp_path / "source"
    train(compose_cfg(*SMOKE, "trainer.max_steps=1", f"paths.output_dir={source}"))
    with pytest.raises(ValueError, match=r"model.dim=64: with model.init_from=.* the architecture comes from there"):
        train(compose_cfg(*SMOKE, "trainer.max_steps=1", f"model.init_from={source}", "model.dim=64",
                          f"paths.output_dir={tmp_path / 'stage2'}"))
    with pytest.raises(ValueError, match=r"model.dim=64: a resumed run keeps the architecture of"):
        train(compose_cfg(*SMOKE, "trainer.max_steps=2", f"resume={source}", "model.dim=64",
                          f"paths.output_dir={source}"))
    metrics, _ = train(compose_cfg(*SMOKE, "trainer.max_steps=1", f"model.init_from={source}",
                                   "model/thinking=hrpo", f"paths.output_dir={tmp_path / 'stage3'}"))
    assert metrics["loss"] == metrics["loss"]                  # this run's own thinking module is allowed
