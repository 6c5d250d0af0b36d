"""The byte-level tokenizer."""

from __future__ import annotations

from llmtrain.data.tokenizer import ByteTokenizer


def test_mixed_chinese_and_english_round_trip_exactly():
    tok = ByteTokenizer()
    text = "What is 23 plus 45? 23加45等于多少？答：68 — naïve café 🙂"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text


def test_special_tokens_and_vocabulary():
    tok = ByteTokenizer()
    assert tok.vocab_size == 264 and tok.special_tokens["<pad>"] == tok.pad_id == 0
    assert max(tok.encode("\xff\x00" + chr(0x10FFFF))) < tok.vocab_size
    assert tok.decode([tok.bos_id, *tok.encode("ab"), tok.eos_id], skip_special=False) == "<bos>ab<eos>"


def test_a_cut_multibyte_character_decodes_as_replacement():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("中")[:2]) == "\ufffd"
