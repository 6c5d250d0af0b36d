"""Byte-level BPE: training, exact Chinese/English round trips, TokenizerFile loading, the CLI."""

from __future__ import annotations

import json

import pytest
from tokenizers import processors

from llmtrain import cli
from llmtrain.data.bpe import TokenizerFile, tokenizer_config, train_bpe, training_texts, write_tokenizer_dir
from llmtrain.data.records import RecordError
from llmtrain.data.tokenizer import SPECIAL_TOKENS, ByteTokenizer
from llmtrain.hf.tokenizer import write_tokenizer_files

EN = "The quick brown fox jumps over the lazy dog. Language models learn from plenty of text.\n"
ZH = "今天天气很好，我们去公园散步。语言模型需要大量的数据来训练。\n"
MIXED = ["  Mixed 中文 and English:\n\n\tthe 模型 learns 🙂🎉 naïve café ", "한국어 and 日本語 were never seen",
         "x", ""]


def write_corpus(folder):
    """A .txt document and a .jsonl of text, chat and preference rows, all bilingual."""
    (folder / "a.txt").write_text((EN + ZH) * 30, encoding="utf-8")
    rows = [{"text": f"Document {i}: {EN}{ZH}"} for i in range(20)]
    rows += [{"messages": [{"role": "user", "content": "你好 hello"}, {"role": "assistant", "content": "hi 你好"}]},
             {"conversations": [{"from": "human", "value": "weather 天气"}]},
             {"prompt": "2+2?", "chosen": "4 四", "rejected": [{"role": "assistant", "content": "5 五"}]}]
    (folder / "b.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return [folder / "a.txt", folder / "b.jsonl"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A trained tokenizer saved as tokenizer.json + tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("bpe")
    tokenizer = train_bpe(write_corpus(folder), vocab_size=400)
    write_tokenizer_dir(tokenizer, tokenizer_config(tokenizer, bos="<bos>", eos="<eos>", pad="<pad>"), folder)
    return folder


def test_trained_bpe_round_trips_mixed_chinese_and_english_exactly(tok_dir):
    tok = TokenizerFile(str(tok_dir))
    for text in MIXED + [EN + ZH]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(EN + ZH)) < len((EN + ZH).encode("utf-8")) / 2     # it did learn merges
    ids = tok.encode(ZH, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids) == ZH
    assert tok.decode(ids, skip_special=False) == f"<bos>{ZH}<eos>"


def test_special_tokens_take_ids_zero_to_seven_in_order(tok_dir):
    tok = TokenizerFile(str(tok_dir / "tokenizer.json"))
    assert tok.special_tokens == {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 400)
    assert tok.chat_template is None


def test_file_and_folder_load_the_same_tokenizer(tok_dir):
    by_folder, by_file = TokenizerFile(str(tok_dir)), TokenizerFile(str(tok_dir / "tokenizer.json"))
    assert by_folder.encode(MIXED[0]) == by_file.encode(MIXED[0])
    assert by_folder.special_tokens == by_file.special_tokens


def test_tokenizer_config_names_bos_eos_pad_and_the_chat_template(tok_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    config = {"bos_token": {"content": "<think>"}, "eos_token": "</think>", "pad_token": None,
              "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = TokenizerFile(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (6, 7, 0)          # pad: null falls back to <pad>
    assert tok.chat_template == template
    assert tok.encode("hi", bos=True, eos=True) == [6, *tok.encode("hi"), 7]


def test_encode_adds_only_the_requested_specials_not_the_post_processor(tok_dir, tmp_path):
    tok = TokenizerFile(str(tok_dir))
    tok.hf.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 1),
                                                                                                    ("<eos>", 2)])
    tok.hf.save(str(tmp_path / "tokenizer.json"))
    tok = TokenizerFile(str(tmp_path / "tokenizer.json"))
    plain = tok.encode("hello 你好")
    assert 1 not in plain and 2 not in plain
    assert tok.encode("hello 你好", bos=True) == [1, *plain] and tok.encode("hello 你好", eos=True) == [*plain, 2]


def test_missing_eos_and_missing_bos_name_the_file(tmp_path):
    (tmp_path / "a.txt").write_text(EN * 5)
    no_eos = train_bpe([tmp_path / "a.txt"], vocab_size=300, special_tokens=["<pad>"])
    no_eos.save(str(tmp_path / "no_eos.json"))
    with pytest.raises(ValueError, match=r"no_eos\.json: no end-of-sequence token"):
        TokenizerFile(str(tmp_path / "no_eos.json"))
    no_bos = train_bpe([tmp_path / "a.txt"], vocab_size=300, special_tokens=["<eos>"])
    no_bos.save(str(tmp_path / "no_bos.json"))
    tok = TokenizerFile(str(tmp_path / "no_bos.json"))
    assert tok.bos_id is None and tok.pad_id == tok.eos_id == 0
    assert tok.encode("a", eos=True)[-1] == 0
    with pytest.raises(ValueError, match=r"no_bos\.json has no beginning-of-sequence token"):
        tok.encode("a", bos=True)
    with pytest.raises(ValueError, match="does not exist"):
        TokenizerFile(str(tmp_path / "missing"))


def test_training_text_comes_from_text_chat_and_preference_fields(tmp_path):
    paths = write_corpus(tmp_path)
    texts = list(training_texts(paths))
    assert texts[0] == (EN + ZH) * 30
    assert {"你好 hello", "hi 你好", "weather 天气", "2+2?", "4 四", "5 五"} <= set(texts)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"label": 3}\n')
    with pytest.raises(RecordError, match=r"bad\.jsonl:3: no text"):
        list(training_texts([tmp_path / "bad.jsonl"]))
    with pytest.raises(ValueError, match="vocab_size=100 is below 264"):
        train_bpe(paths, vocab_size=100)


def test_save_keeps_ids_names_and_template_and_export_uses_it(tok_dir, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (tmp_path / "src" / "chat_template.jinja").write_text("{{ messages }}")
    (tmp_path / "out").mkdir()
    write_tokenizer_files(TokenizerFile(str(tmp_path / "src")), tmp_path / "out")
    saved = TokenizerFile(str(tmp_path / "out"))
    assert saved.encode(MIXED[0], bos=True) == TokenizerFile(str(tok_dir)).encode(MIXED[0], bos=True)
    assert saved.chat_template == "{{ messages }}"
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["eos_token"] == "<eos>"


def test_the_exported_byte_tokenizer_loads_with_the_same_ids(tmp_path):
    write_tokenizer_files(ByteTokenizer(), tmp_path)
    tok, byte = TokenizerFile(str(tmp_path)), ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (264, 0, 1, 2)
    assert tok.encode(MIXED[0], bos=True, eos=True) == byte.encode(MIXED[0], bos=True, eos=True)


def test_cli_trains_loadable_files_and_refuses_an_existing_folder(tmp_path, capsys):
    paths = [str(p) for p in write_corpus(tmp_path)]
    out = tmp_path / "tok"
    assert cli.main(["tokenizer", "train", *paths, "--vocab-size", "350", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vocab size 350" in printed and "round trip ok" in printed
    tok = TokenizerFile(str(out))
    assert tok.vocab_size == 350 and tok.decode(tok.encode(MIXED[0])) == MIXED[0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []    # no temporary left
    assert cli.main(["tokenizer", "train", *paths, "--vocab-size", "350", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["tokenizer", "train", *paths, "--vocab-size", "350", "--out", str(tmp_path / "t2"),
                     "--special-tokens", "<pad>"]) == 2
    assert "<eos> is required" in capsys.readouterr().err


def test_cli_refuses_a_corpus_without_text_and_warns_about_an_empty_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"messages": [{"role": "user", "content": " "}]}\n')
    empty = [str(tmp_path / "empty.txt"), str(tmp_path / "blank.jsonl")]
    assert cli.main(["tokenizer", "train", *empty, "--vocab-size", "300", "--out", str(tmp_path / "t1")]) == 2
    assert f"no text in {', '.join(empty)}: nothing to learn a vocabulary from" in capsys.readouterr().err
    assert not (tmp_path / "t1").exists()
    paths = [str(p) for p in write_corpus(tmp_path)]
    assert cli.main(["tokenizer", "train", empty[0], *paths, "--vocab-size", "300", "--out", str(tmp_path / "t2")]) == 0
    assert f"warning: no text in {empty[0]}\n" in capsys.readouterr().err
