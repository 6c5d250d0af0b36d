"""The built-in data's disk cache: a warm start gives exactly the fresh data, every input is in the key,
and a damaged or unwritable cache never fails a run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from llmtrain.data import builtin
from llmtrain.data.bpe import TokenizerFile, tokenizer_config, train_bpe, write_tokenizer_dir
from llmtrain.data.builtin import BuiltinTask
from llmtrain.data.cache import Cache, cache_root
from llmtrain.data.tokenizer import ByteTokenizer

SMALL = dict(seed=3, n_train=300, n_eval=40, seq_len=32, batch_size=4, eval_batch_size=8)
JINJA = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}" \
        "{% if add_generation_prompt %}[assistant] {% endif %}"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "builtin"


def built(format: str, tokenizer=None, **kwargs) -> BuiltinTask:
    task = BuiltinTask(tokenizer or ByteTokenizer(), **{**SMALL, **kwargs})
    task.setup(format)
    return task


def assert_same_data(a: BuiltinTask, b: BuiltinTask) -> None:
    """Same examples, same stored tensors (values and dtypes), same batches in every order."""
    assert a.eval_examples == b.eval_examples and a.train_examples == b.train_examples
    for split in ("train", "eval"):
        for name in a._state_names():
            x, y = getattr(getattr(a, split), name), getattr(getattr(b, split), name)
            assert x.dtype == y.dtype and torch.equal(x, y), (split, name)
    pairs = [*zip(a.train_batches(1, start=2), b.train_batches(1, start=2)), *zip(a.eval_batches(), b.eval_batches())]
    assert len(pairs) == a.num_batches() - 2 + len(list(a.eval_batches())) and a.num_batches() == b.num_batches()
    for x, y in pairs:
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def no_generation(*args, **kwargs):
    raise AssertionError("a warm start must not generate examples")


@pytest.mark.parametrize("format", BuiltinTask.formats)
def test_a_warm_start_reads_exactly_the_fresh_data(format, cache_dir, monkeypatch):
    fresh = built(format, cache=False)
    assert not cache_dir.exists()
    built(format)                                                   # cold: generates and writes
    assert len(list(cache_dir.glob(f"*-{format}.safetensors"))) == 1
    monkeypatch.setattr(builtin, "split_examples", no_generation)
    assert_same_data(fresh, built(format))


def test_a_file_tokenizer_and_jinja_template_are_cached_exactly(tmp_path, cache_dir, monkeypatch):
    tokenizer = file_tokenizer(tmp_path / "tok")
    fresh = built("chat", tokenizer, chat_template=JINJA, cache=False)
    built("chat", tokenizer, chat_template=JINJA)
    monkeypatch.setattr(builtin, "split_examples", no_generation)
    assert_same_data(fresh, built("chat", tokenizer, chat_template=JINJA))


def file_tokenizer(folder, corpus: str = "What is 3 plus 4? Answer: 7\n3加4等于多少？答：7\n") -> TokenizerFile:
    folder.mkdir()
    (folder / "corpus.txt").write_text(corpus * 50, encoding="utf-8")
    tokenizer = train_bpe([folder / "corpus.txt"], vocab_size=300)
    write_tokenizer_dir(tokenizer, tokenizer_config(tokenizer, bos="<bos>", eos="<eos>", pad="<pad>"), folder)
    return TokenizerFile(str(folder))


@pytest.mark.parametrize("change", [{"seed": 4}, {"n_train": 301}, {"n_eval": 41}, {"tasks": ["add"]},
                                    {"languages": ["en"]}, {"seq_len": 33}])
def test_every_argument_of_the_data_is_in_the_key(change):
    assert named("text", **change) != named("text")


def test_format_template_tokenizer_and_code_are_in_the_key(tmp_path, monkeypatch):
    tokenizers = file_tokenizer(tmp_path / "a"), file_tokenizer(tmp_path / "b", corpus="Which is larger?")
    names = {named("text"), named("chat"), named("preference"), named("chat", chat_template=JINJA),
             named("text", tokenizers[0]), named("text", tokenizers[1])}
    assert len(names) == 6
    for constant, value in (("EXAMPLES_CODE", "edited"), ("ENCODING_CODE", {"text": "edited", "chat": "edited"})):
        with monkeypatch.context() as patch:
            patch.setattr(builtin, constant, value)
            assert named("text") not in names and named("chat") not in names


def named(format: str, tokenizer=None, **kwargs) -> str:
    task = BuiltinTask(tokenizer or ByteTokenizer(), **{**SMALL, **kwargs})
    task.format = format
    return task._batches_name()


def test_a_tokenizer_it_cannot_identify_is_not_cached(cache_dir):
    class Custom(ByteTokenizer):
        pass

    built("text", Custom())
    assert not list(cache_dir.glob("*.safetensors"))


def test_damaged_entries_are_logged_and_rebuilt(cache_dir, caplog):
    fresh = built("chat")
    for path in cache_dir.iterdir():
        path.write_bytes(path.read_bytes()[:100])                   # truncated, as by a full disk
    with caplog.at_level(logging.DEBUG, logger="llmtrain.data.cache"):
        assert_same_data(fresh, built("chat"))
    assert "unreadable cache entry" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="llmtrain.data.cache"):
        built("chat")
    assert not caplog.text                                          # rewritten whole


def test_an_unwritable_cache_runs_without_one(tmp_path, monkeypatch, caplog):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("LLMTRAIN_CACHE", str(tmp_path / "a_file"))  # its builtin/ folder cannot be made
    with caplog.at_level(logging.DEBUG, logger="llmtrain.data.cache"):
        assert_same_data(built("text", cache=False), built("text"))
    assert "not caching" in caplog.text


def test_a_failed_write_leaves_neither_the_entry_nor_a_temporary_file(tmp_path, monkeypatch):
    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", crash)
    Cache(tmp_path).write("entry.json", b"{}")
    assert list(tmp_path.iterdir()) == []


def test_past_max_bytes_the_least_recently_used_entries_go(tmp_path):
    cache = Cache(tmp_path, max_bytes=30)
    for name in ("a", "b", "c"):
        cache.write(name, b"x" * 10)
        os.utime(tmp_path / name, (0, {"a": 1, "b": 2, "c": 3}[name]))   # written in this order
    assert cache.read("a", Path.read_bytes) == b"x" * 10                   # a read makes "a" the newest
    cache.write("d", b"x" * 10)                                            # 40 bytes: "b" goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c", "d"]


def test_cache_false_writes_nothing(cache_dir):
    built("text", cache=False)
    assert not cache_dir.exists()


def test_the_cache_folder_is_the_variable_then_xdg_then_home(tmp_path, monkeypatch):
    assert cache_root() == tmp_path / "cache"
    monkeypatch.delenv("LLMTRAIN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "llmtrain"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "llmtrain"
