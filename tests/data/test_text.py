"""TextFiles: .txt, .jsonl and .parquet documents packed into rows; malformed rows name file:line."""

from __future__ import annotations

import json

import pytest

from llmtrain.data.packing import pack_documents
from llmtrain.data.text import TextFiles
from llmtrain.data.tokenizer import ByteTokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

DOCS = [f"document {i}: 文档 {i} is here. " * 3 for i in range(30)]


def test_parquet_jsonl_and_txt_documents_are_packed_in_file_order(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[1:10]))
    pq.write_table(pa.table({"text": DOCS[10:], "id": list(range(10, 30))}), tmp_path / "c.parquet")
    tok = ByteTokenizer()
    data = TextFiles([str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.parquet")], tok, seq_len=32, batch_size=4)
    data.setup("text")
    documents = [tok.encode(d, bos=True, eos=True) for d in DOCS]
    rows_NT = pack_documents(documents, 32)
    n_train, n_eval = len(data.train.rows_NT), len(data.eval.rows_NT)
    assert data.train.rows_NT.tolist() == rows_NT[:n_train].tolist()
    assert data.eval.rows_NT.tolist() == rows_NT[-n_eval:].tolist()
    # which document each packed token belongs to: none may be both trained on and held out
    owner_NT = pack_documents([[i] * len(doc) for i, doc in enumerate(documents)], 32)
    assert not set(owner_NT[:n_train].flatten().tolist()) & set(owner_NT[-n_eval:].flatten().tolist())
    assert len(rows_NT) - n_train - n_eval < n_eval        # at most the held-out count is left unused


def test_one_document_across_the_split_keeps_the_plain_row_split_with_a_warning(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("one long document " * 200, encoding="utf-8")
    data = TextFiles([str(tmp_path / "a.txt")], ByteTokenizer(), seq_len=32, batch_size=4)
    with caplog.at_level("WARNING"):
        data.setup("text")
    assert len(data.train.rows_NT) + len(data.eval.rows_NT) == len(pack_documents(
        [ByteTokenizer().encode("one long document " * 200, bos=True, eos=True)], 32))
    assert "a document runs across the train/eval split" in caplog.text


def test_a_malformed_row_is_named_with_its_file_and_line(tmp_path):
    pq.write_table(pa.table({"text": ["fine", None]}), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=r"c\.parquet:row 2: 'text' must be a string"):
        TextFiles([str(tmp_path / "c.parquet")], ByteTokenizer()).setup("text")
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: missing 'text'"):
        TextFiles([str(tmp_path / "b.jsonl")], ByteTokenizer()).setup("text")
    with pytest.raises(ValueError, match=r"is not one of \('.txt', '.jsonl', '.parquet'\)"):
        TextFiles([str(tmp_path / "d.csv")], ByteTokenizer())
