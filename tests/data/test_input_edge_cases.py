"""User input at the edges: tokenizers without <bos>, bad UTF-8, a BOM, corrupt Parquet, null fields,
and exported tokenizers that must frame text in transformers as the model was trained."""

from __future__ import annotations

import json

import pytest

from llmtrain.data.bpe import TokenizerFile, tokenizer_config, train_bpe, training_texts, write_tokenizer_dir
from llmtrain.data.chat import IGNORE_INDEX, SpecialTokenTemplate
from llmtrain.data.files import RecordFiles
from llmtrain.data.formats import chat_messages, preference_messages, prompt_messages, row_format
from llmtrain.data.records import RecordError, read_records
from llmtrain.data.text import read_documents
from llmtrain.data.tokenizer import ByteTokenizer
from llmtrain.hf.tokenizer import write_tokenizer_files

CORPUS = "hello world, 你好世界. The model learns from text.\n" * 40
NO_BOS_SPECIALS = ["<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "a.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def no_bos_dir(corpus, tmp_path_factory):
    """What `llmtrain tokenizer train --special-tokens ...` without <bos> writes."""
    folder = tmp_path_factory.mktemp("no_bos")
    tokenizer = train_bpe([corpus], vocab_size=300, special_tokens=NO_BOS_SPECIALS)
    write_tokenizer_dir(tokenizer, tokenizer_config(tokenizer, bos=None, eos="<eos>", pad="<pad>"), folder)
    return folder


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# 1. A tokenizer without <bos> and the default chat template.

def test_the_default_chat_template_leaves_out_bos_when_the_tokenizer_has_none(no_bos_dir):
    tok = TokenizerFile(str(no_bos_dir))
    assert tok.bos_id is None
    template = SpecialTokenTemplate(tok)
    ids, labels = template.encode(CHAT)
    user, assistant = tok.special_tokens["<|user|>"], tok.special_tokens["<|assistant|>"]
    assert ids == [user, *tok.encode("2+2?"), tok.eos_id, assistant, *tok.encode("4"), tok.eos_id]
    assert [t for t, label in zip(ids, labels) if label != IGNORE_INDEX] == [*tok.encode("4"), tok.eos_id]
    assert template.encode_prompt(CHAT[:1]) == [user, *tok.encode("2+2?"), tok.eos_id, assistant]


@pytest.mark.parametrize("format, row", [("chat", {"prompt": "2+2?", "response": "4"}),
                                         ("preference", {"prompt": "2+2?", "chosen": "4", "rejected": "5"})])
def test_sft_and_dpo_batches_build_with_a_tokenizer_without_bos(no_bos_dir, tmp_path, format, row):
    data = RecordFiles([str(write_jsonl(tmp_path / "rows.jsonl", [row] * 4))], TokenizerFile(str(no_bos_dir)),
                       batch_size=2, eval_fraction=0.25)
    data.setup(format)
    first_tokens = next(data.train_batches(epoch=0))["input_ids"][:, 0]
    assert (first_tokens == data.tokenizer.special_tokens["<|user|>"]).all()


# 2. Invalid UTF-8 and corrupt Parquet name the file and line.

LATIN1 = "caf\u00e9".encode("latin-1")           # b"caf\xe9": not UTF-8


@pytest.mark.parametrize("suffix, read", [
    (".jsonl", lambda p: list(read_records(p))),
    (".jsonl", lambda p: list(training_texts([p]))),
    (".txt", lambda p: list(read_documents(p))),
    (".txt", lambda p: list(training_texts([p]))),
])
def test_invalid_utf8_is_reported_with_file_line_and_column(tmp_path, suffix, read):
    path = tmp_path / f"latin1{suffix}"
    line_2 = b'{"text": "' + LATIN1 + b'"}' if suffix == ".jsonl" else LATIN1
    path.write_bytes(b'{"text": "ok"}\n' + line_2 + b"\n")
    column = 14 if suffix == ".jsonl" else 4
    with pytest.raises(RecordError, match=rf"latin1\{suffix}:2: not valid UTF-8 \(byte 0xe9 at column {column}\)"):
        read(path)


def test_bpe_training_on_invalid_utf8_raises_the_record_error(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine\n" * 3 + LATIN1)
    with pytest.raises(RecordError, match=r"bad\.txt:4: not valid UTF-8"):
        train_bpe([tmp_path / "bad.txt"], vocab_size=300)


def test_a_corrupt_parquet_file_is_named(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "not.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(RecordError, match=r"not\.parquet: cannot read it as Parquet \(.*magic bytes"):
        list(read_records(tmp_path / "not.parquet"))
    pq.write_table(pa.table({"text": [f"row {i} " * 8 for i in range(4000)]}), tmp_path / "good.parquet",
                   row_group_size=1000, compression="snappy")
    data = bytearray((tmp_path / "good.parquet").read_bytes())
    data[200:5200] = bytes(5000)                 # zeroes over the first pages: a corrupt page, intact footer
    (tmp_path / "corrupt.parquet").write_bytes(bytes(data))
    with pytest.raises(RecordError, match=r"corrupt\.parquet(:row \d+)?: cannot read it as Parquet"):
        list(read_records(tmp_path / "corrupt.parquet"))


# 3. A null field is an absent field (Parquet stores "this row has none" as null).

def test_a_null_system_or_response_counts_as_absent():
    assert chat_messages("w", {"prompt": "p", "response": "r", "system": None}) == \
        [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]
    assert chat_messages("w", {"prompt": "p", "response": None, "answer": "a"})[-1]["content"] == "a"
    assert chat_messages("w", {"messages": None, "conversations": [{"from": "human", "value": "q"},
                                                                   {"from": "gpt", "value": "a"}]})[-1]["content"] == "a"
    assert prompt_messages("w", {"prompt": "p", "answer": "a", "system": None}) == \
        ([{"role": "user", "content": "p"}], "a")
    rejected = [CHAT[0], {"role": "assistant", "content": "5"}]
    assert preference_messages("w", {"prompt": None, "chosen": CHAT, "rejected": rejected})[0] == CHAT[:1]
    assert row_format({"prompt": "p", "response": None, "text": "t"}) == "text"
    with pytest.raises(RecordError, match=r"w: not a chat row: .* got keys \['prompt', 'response=null'\]"):
        chat_messages("w", {"prompt": "p", "response": None})


def test_a_chat_parquet_whose_system_column_is_null_on_some_rows_loads(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"prompt": f"q{i}", "response": f"a{i}", "system": "be brief" if i % 2 else None} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    data = RecordFiles([str(tmp_path / "chat.parquet")], ByteTokenizer(), batch_size=2, eval_fraction=0.2)
    data.setup("chat")
    assert len(data.train) == 2


# 4. A UTF-8 byte-order mark is not text.

def test_a_leading_bom_is_dropped_from_jsonl_and_txt(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes('\ufeff{"text": "hi"}\n{"text": "there"}\n'.encode())
    (tmp_path / "bom.txt").write_bytes("\ufeffhello\r\nworld".encode())
    assert [row for _, row in read_records(tmp_path / "bom.jsonl")] == [{"text": "hi"}, {"text": "there"}]
    assert list(read_documents(tmp_path / "bom.txt")) == ["hello\nworld"]      # newlines still translated
    assert list(training_texts([tmp_path / "bom.txt"])) == ["hello\nworld"]


# 5. Exported tokenizers give transformers the ids the model was trained on: <bos> first.

def test_exported_tokenizers_start_with_bos_in_transformers_and_keep_our_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    byte = ByteTokenizer()
    for folder in ("byte", "src", "bpe"):
        (tmp_path / folder).mkdir()
    write_tokenizer_files(byte, tmp_path / "byte")
    bpe = train_bpe([write_jsonl(tmp_path / "c.jsonl", [{"text": CORPUS}])], vocab_size=320)
    bpe.save(str(tmp_path / "src" / "tokenizer.json"))    # a folder written before: no post-processor, flag off
    stale = tokenizer_config(bpe, bos="<bos>", eos="<eos>", pad="<pad>") | {"add_bos_token": False}
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps(stale))
    source = TokenizerFile(str(tmp_path / "src"))
    write_tokenizer_files(source, tmp_path / "bpe")
    for ours, folder in ((byte, "byte"), (source, "bpe")):
        hf = transformers.AutoTokenizer.from_pretrained(tmp_path / folder)
        config = json.loads((tmp_path / folder / "tokenizer_config.json").read_text())
        assert config["add_bos_token"] is True
        for text in ("hello world", "你好 🙂\n", ""):
            assert hf(text)["input_ids"] == [ours.bos_id, *ours.encode(text)]
            assert TokenizerFile(str(tmp_path / folder)).encode(text, bos=True, eos=True) == \
                ours.encode(text, bos=True, eos=True)


def test_a_tokenizer_without_bos_exports_without_one(no_bos_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    source = TokenizerFile(str(no_bos_dir))
    write_tokenizer_files(source, tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["add_bos_token"] is False
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf("hello world")["input_ids"] == source.encode("hello world")
