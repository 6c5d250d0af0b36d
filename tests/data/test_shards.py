"""Token shards stream exactly the tokens of the files they came from, in resumable batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmtrain import cli
from llmtrain.data.bpe import TokenizerFile, tokenizer_config, train_bpe, write_tokenizer_dir
from llmtrain.data.shards import ShardRows, TokenShards, open_shard, read_index, write_shards
from llmtrain.data.text import read_documents
from llmtrain.data.tokenizer import ByteTokenizer
from llmtrain.entry import train
from tests.conftest import SMOKE, compose_cfg

EN = "Shards hold the token stream of every document, cut into rows. "
ZH = "每个文档都以开始和结束标记包围。"


def write_corpus(folder):
    """A .txt document and a .jsonl of 40 short bilingual documents (about 3,600 bytes in all)."""
    (folder / "a.txt").write_text((EN + ZH) * 10, encoding="utf-8")
    rows = "".join(json.dumps({"text": f"{i}: {EN if i % 2 else ZH}"}, ensure_ascii=False) + "\n" for i in range(40))
    (folder / "b.jsonl").write_text(rows, encoding="utf-8")
    return [folder / "a.txt", folder / "b.jsonl"]


def expected_rows(paths, tokenizer, shard_tokens, seq_len):
    """The documents' token stream, cut into shards, each shard cut into whole rows (its tail dropped)."""
    stream = [t for p in paths for doc in read_documents(p) for t in tokenizer.encode(doc, bos=True, eos=True)]
    shards = [stream[i:i + shard_tokens] for i in range(0, len(stream), shard_tokens)]
    return [shard[i:i + seq_len] for shard in shards for i in range(0, len(shard) - seq_len + 1, seq_len)]


def split_rows(data):
    """The train rows and the held-out rows of a set-up TokenShards, each in storage order."""
    return data.train.rows_NT[:].tolist(), data.eval.rows_NT[:].tolist()


def all_rows(data):
    """Every row of a set-up TokenShards, train then eval, in storage order."""
    return torch.cat([data.train.rows_NT[:], data.eval.rows_NT[:]]).tolist()


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tokenizer = train_bpe(write_corpus(folder), vocab_size=300)
    write_tokenizer_dir(tokenizer, tokenizer_config(tokenizer, bos="<bos>", eos="<eos>", pad="<pad>"), folder)
    return TokenizerFile(str(folder))


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_shards_stream_the_tokens_of_their_files(kind, bpe, tmp_path):
    tokenizer = ByteTokenizer() if kind == "byte" else bpe
    paths = write_corpus(tmp_path)
    index = write_shards(paths, tmp_path / "shards", tokenizer, kind, shard_tokens=1000)
    data = TokenShards(str(tmp_path / "shards"), tokenizer, seq_len=32, batch_size=4, eval_fraction=0.1)
    data.setup("text")
    expected, train, held_out = expected_rows(paths, tokenizer, 1000, 32), *split_rows(data)
    assert train == expected[:len(train)] and held_out == expected[-len(held_out):]
    assert len(expected) - len(train) - len(held_out) <= len(held_out)
    between = train[-1][-1:] + [t for row in expected[len(train):-len(held_out)] for t in row]
    assert tokenizer.eos_id in between                  # no document has tokens on both sides
    assert len(index["shards"]) > 2 and all(s["tokens"] == 1000 for s in index["shards"][:-1])
    assert index["dtype"] == "uint16" and index["vocab_size"] == tokenizer.vocab_size
    assert [s["documents"] for s in index["sources"]] == [1, 40]
    assert index["total_tokens"] == sum(s["tokens"] for s in index["sources"])
    assert index["total_tokens"] == sum(s["tokens"] for s in index["shards"])


def test_train_and_eval_rows_partition_the_rows_and_batches_are_train_rows(tmp_path):
    rng = np.random.default_rng(0)                    # random text: every row's content is unique
    (tmp_path / "a.txt").write_text("".join(rng.choice(list("abcdefgh 中文")) for _ in range(4000)))
    write_shards([tmp_path / "a.txt"], tmp_path / "shards", ByteTokenizer(), "byte", shard_tokens=1000)
    data = TokenShards(str(tmp_path / "shards"), ByteTokenizer(), seq_len=32, batch_size=4, eval_fraction=0.1)
    data.setup("text")
    n_rows = len(data.train.rows_NT) + len(data.eval.rows_NT)
    assert len(data.eval.rows_NT) == int(np.ceil(n_rows * 0.1)) and n_rows == len(set(map(tuple, all_rows(data))))
    train_rows = {tuple(r) for r in data.train.rows_NT[:].tolist()}
    eval_rows = [tuple(r) for b in data.eval_batches() for r in b["input_ids"].tolist()]
    assert len(eval_rows) == len(data.eval.rows_NT) and len(train_rows) + len(eval_rows) == n_rows
    assert train_rows | set(eval_rows) == set(map(tuple, all_rows(data)))
    batches = list(data.train_batches(0))
    assert len(batches) == data.num_batches() == len(data.train.rows_NT) // 4
    assert all(b["input_ids"].dtype == torch.int64 and b["input_ids"].shape == (4, 32) for b in batches)
    assert all(b["labels"] is b["input_ids"] for b in batches)
    assert {tuple(r) for b in batches for r in b["input_ids"].tolist()} <= train_rows


def test_start_skips_to_the_same_batches_and_the_order_depends_on_seed_and_epoch(tmp_path):
    write_shards(write_corpus(tmp_path), tmp_path / "shards", ByteTokenizer(), "byte", shard_tokens=1000)
    data = TokenShards(str(tmp_path / "shards"), ByteTokenizer(), seq_len=32, batch_size=4, seed=3)
    data.setup("text")
    epoch_1 = [b["input_ids"] for b in data.train_batches(1)]
    assert all(torch.equal(a["input_ids"], b) for a, b in zip(data.train_batches(1, start=5), epoch_1[5:], strict=True))
    assert all(torch.equal(a["input_ids"], b) for a, b in zip(data.train_batches(1), epoch_1, strict=True))
    assert not torch.equal(next(data.train_batches(2))["input_ids"], epoch_1[0])


def test_rows_are_read_from_memory_maps_across_shards(tmp_path):
    write_shards(write_corpus(tmp_path), tmp_path / "shards", ByteTokenizer(), "byte", shard_tokens=100)
    index = read_index(tmp_path / "shards")
    shards = [open_shard(tmp_path / "shards" / s["file"], index["dtype"], s["tokens"]) for s in index["shards"]]
    assert all(isinstance(s, np.memmap) for s in shards)
    rows = ShardRows(shards, seq_len=30)                     # 3 rows per 100-token shard, 10 tokens unused
    assert len(rows) == sum(s["tokens"] // 30 for s in index["shards"])
    assert rows.index_select(0, torch.tensor([4])).tolist() == [shards[1][30:60].tolist()]
    second_shard_rows = [shards[1][30:60].tolist(), shards[1][60:90].tolist()]
    assert rows.range(3, 9)[1:3].tolist() == rows[4:6].tolist() == second_shard_rows


def test_vocabularies_over_65536_are_stored_as_uint32(tmp_path):
    class Wide(ByteTokenizer):
        vocab_size, bos_id, eos_id = 70_000, 69_998, 69_999

    (tmp_path / "a.txt").write_text("ab" * 40)
    index = write_shards([tmp_path / "a.txt"], tmp_path / "shards", Wide(), "wide")
    data = TokenShards(str(tmp_path / "shards"), Wide(), seq_len=9, batch_size=2, eval_fraction=0.2)
    data.setup("text")
    assert index["dtype"] == "uint32" and all_rows(data)[0][0] == 69_998


def test_malformed_jsonl_is_named_with_file_and_line_and_nothing_is_left(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: 'text' must be a string"):
        write_shards([tmp_path / "bad.jsonl"], tmp_path / "shards", ByteTokenizer(), "byte")
    (tmp_path / "worse.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    assert cli.main(["tokenize", str(tmp_path / "worse.jsonl"), "--out", str(tmp_path / "shards")]) == 2
    assert "worse.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "worse.jsonl"]


def test_a_different_tokenizer_is_refused_naming_both(bpe, tmp_path):
    write_shards(write_corpus(tmp_path), tmp_path / "shards", bpe, str(bpe.path))
    with pytest.raises(ValueError, match=r"ByteTokenizer: vocab_size, bos_id, eos_id = \(264, 1, 2\).*"
                                         r"index\.json was written with .*tok.*\(300, 1, 2\)"):
        TokenShards(str(tmp_path / "shards"), ByteTokenizer())
    with pytest.raises(ValueError, match="serves only"):
        TokenShards(str(tmp_path / "shards"), bpe).setup("chat")
    with pytest.raises(ValueError, match="no index.json"):
        TokenShards(str(tmp_path), bpe)


def test_cli_writes_shards_and_refuses_an_existing_folder(tmp_path, capsys):
    paths = [str(p) for p in write_corpus(tmp_path)]
    out = str(tmp_path / "shards")
    assert cli.main(["tokenize", *paths, "--out", out, "--shard-tokens", "2000"]) == 0
    assert f"python run.py data=shards data.path={out}" in capsys.readouterr().out
    assert read_index(tmp_path / "shards")["tokenizer"] == "byte"
    assert cli.main(["tokenize", *paths, "--out", out]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_refuses_a_corpus_without_text_and_warns_about_an_empty_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    empty = [str(tmp_path / "empty.txt"), str(tmp_path / "blank.jsonl")]
    assert cli.main(["tokenize", *empty, "--out", str(tmp_path / "s1")]) == 2
    assert f"no text in {', '.join(empty)}: nothing to tokenize" in capsys.readouterr().err
    assert not (tmp_path / "s1").exists()
    paths = [str(p) for p in write_corpus(tmp_path)]
    assert cli.main(["tokenize", empty[0], *paths, "--out", str(tmp_path / "s2")]) == 0
    assert f"warning: no text in {empty[0]}\n" in capsys.readouterr().err


def test_data_shards_trains_three_steps(tmp_path):
    write_shards(write_corpus(tmp_path), tmp_path / "shards", ByteTokenizer(), "byte")
    cfg = compose_cfg("data=shards", f"data.path={tmp_path / 'shards'}", *SMOKE, "trainer.max_steps=3",
                      f"paths.output_dir={tmp_path / 'run'}")
    metrics, built = train(cfg)
    assert metrics["step"] == 3 and np.isfinite(metrics["eval/loss"])
    assert isinstance(built["data"], TokenShards)
