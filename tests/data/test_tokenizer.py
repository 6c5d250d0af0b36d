"""The byte-level tokenizer: exact round trips, special tokens, broken UTF-8."""

from __future__ import annotations

import pytest

from llmtrain.data.tokenizer import ByteTokenizer


def test_mixed_chinese_and_english_round_trip_exactly():
    tok = ByteTokenizer()
    text = "What is 23 plus 45? 23加45等于多少？答：68 - naïve café 🙂"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text


def test_ids_are_bytes_after_the_special_tokens():
    tok = ByteTokenizer()
    assert tok.vocab_size == 264 and len(tok.special_tokens) == 8
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) == tuple(
        tok.special_tokens[t] for t in ("<pad>", "<bos>", "<eos>"))
    assert tok.encode("A\x00\xff") == [8 + 65, 8, 8 + 0xC3, 8 + 0xBF]
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_special_tokens_are_skipped_or_named():
    tok = ByteTokenizer()
    ids = [tok.bos_id, *tok.encode("中a"), tok.special_tokens["<|user|>"], *tok.encode("b"), tok.eos_id]
    assert tok.decode(ids) == "中ab"
    assert tok.decode(ids, skip_special=False) == "<bos>中a<|user|>b<eos>"


def test_a_cut_multibyte_character_decodes_as_replacement():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("中")[:2]) == "\ufffd"


def test_an_id_outside_the_vocabulary_is_named():
    with pytest.raises(ValueError, match="264"):
        ByteTokenizer().decode([5, 264])


def test_sampled_ids_past_the_vocabulary_have_no_text():
    from llmtrain.data.tokenizer import decode_sampled
    tok = ByteTokenizer()
    ids = tok.encode("héllo", bos=True) + [tok.vocab_size, tok.vocab_size + 35]     # padding rows of a model
    with pytest.raises(ValueError, match="token ids must be in"):
        tok.decode(ids)                               # in data they mean a tokenizer mismatch
    assert decode_sampled(tok, ids) == "héllo"
    assert decode_sampled(tok, ids, skip_special=False) == "<bos>héllo"
