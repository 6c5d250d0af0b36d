"""Chat templates, the user file shapes of DESIGN 6, file:line errors and the padded batch layout."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from llmtrain.data.chat import JinjaTemplate, SpecialTokenTemplate, make_template
from llmtrain.data.files import RecordFiles
from llmtrain.data.padded import PaddedBatches
from llmtrain.data.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "又一次？"},
        {"role": "assistant", "content": "还是4"}]


def targets(ids, labels) -> str:
    return TOKENIZER.decode([t for t, label in zip(ids, labels) if label != -100], skip_special=False)


def test_a_jinja_template_targets_the_assistant_turns_and_renders_like_the_whole_conversation():
    template = make_template(TOKENIZER, CHATML)
    assert isinstance(template, JinjaTemplate)
    ids, labels = template.encode(CHAT)
    assert TOKENIZER.decode(ids) == template.render(CHAT)
    assert targets(ids, labels) == "4<|im_end|>\n还是4<|im_end|>\n"
    _, labels_last_only = template.encode(CHAT, first_target=3)
    assert targets(ids, labels_last_only) == "还是4<|im_end|>\n"
    assert TOKENIZER.decode(template.encode_prompt(CHAT[:2])).endswith("2+2?<|im_end|>\n<|im_start|>assistant\n")


EOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_special_token_text_in_a_jinja_rendering_becomes_the_token_id_with_the_byte_tokenizer(caplog):
    """The byte tokenizer would spell "<eos>" as five bytes: the model would never learn to stop."""
    with caplog.at_level(logging.WARNING, logger="llmtrain.data.chat"):
        template = make_template(TOKENIZER, EOS_TEMPLATE)
    assert "does not end with the tokenizer's EOS" not in caplog.text
    ids, labels = template.encode(CHAT[1:3])
    special = TOKENIZER.special_tokens
    assert ids == [TOKENIZER.bos_id, special["<|user|>"], *TOKENIZER.encode("2+2?"), TOKENIZER.eos_id,
                   special["<|assistant|>"], *TOKENIZER.encode("4"), TOKENIZER.eos_id]
    assert [t for t, label in zip(ids, labels) if label != -100] == [*TOKENIZER.encode("4"), TOKENIZER.eos_id]
    assert template.encode_prompt(CHAT[1:2])[-1] == special["<|assistant|>"]
    # Same ids as the default template, which uses the special tokens directly.
    assert (ids, labels) == SpecialTokenTemplate(TOKENIZER).encode(CHAT[1:3])


def test_a_jinja_template_whose_turns_never_end_with_eos_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="llmtrain.data.chat"):
        make_template(TOKENIZER, CHATML)          # <|im_end|> is plain text to the byte tokenizer
    assert "does not end with the tokenizer's EOS token (<eos>, id 2)" in caplog.text


def test_the_default_template_is_the_special_token_one():
    template = make_template(TOKENIZER)
    assert isinstance(template, SpecialTokenTemplate)
    ids, labels = template.encode(CHAT)
    assert targets(ids, labels) == "4<eos>还是4<eos>"


def write_jsonl(path, rows) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n"
                            for row in rows))
    return str(path)


CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"conversations": [{"from": "human", "value": "1+1"}, {"from": "gpt", "value": "2"}]},
    {"prompt": "capital of France?", "response": "Paris"},
    {"prompt": "3*3", "answer": "9", "system": "math"},
    {"prompt": "x", "completion": "y"},
]


def test_every_chat_shape_becomes_a_conversation(tmp_path):
    data = RecordFiles([write_jsonl(tmp_path / "chats.jsonl", CHAT_ROWS)], TOKENIZER, batch_size=2, eval_fraction=0.2)
    data.setup("chat")
    answers = sorted(targets(*seq) for unit in _units(data.train) + _units(data.eval) for seq in [unit])
    assert answers == sorted(["hello<eos>", "2<eos>", "Paris<eos>", "9<eos>", "y<eos>"])
    held_out = next(data.eval_batches())
    assert TOKENIZER.decode(held_out["input_ids"][0].tolist(), skip_special=False) == \
        "<bos><|user|>x<eos><|assistant|>y<eos>"


def _units(batches: PaddedBatches):
    result = []
    for batch in batches.in_order():
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            result.append((ids, labels))
    return result


PREFERENCE_ROWS = [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
     "rejected": [{"role": "assistant", "content": "go away"}]},
    {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
     "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]},
]


def test_every_preference_shape_becomes_a_chosen_and_rejected_row(tmp_path):
    data = RecordFiles([write_jsonl(tmp_path / "pairs.jsonl", PREFERENCE_ROWS)], TOKENIZER, batch_size=3,
                       eval_paths=[write_jsonl(tmp_path / "held.jsonl", PREFERENCE_ROWS[:1])])
    data.setup("preference")
    batch = data.train.batch(torch.arange(3))
    rows = [targets(ids, labels) for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist())]
    assert rows == ["4<eos>", "hello<eos>", "good<eos>", "5<eos>", "go away<eos>", "bad<eos>"]
    prompts = [TOKENIZER.decode(ids, skip_special=False).split("<|assistant|>")[0]
               for ids in batch["input_ids"].tolist()]
    assert prompts[:3] == prompts[3:]                 # each pair shares its prompt
    assert prompts[2] == "<bos><|user|>q<eos>"


@pytest.mark.parametrize("rows, line, message", [
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": }'], 2, "not valid JSON"),
    ([{"prompt": "a", "response": "b"}, {"messages": [{"role": "robot", "content": "x"}]}], 2, "role 'robot'"),
    ([{"prompt": "a", "response": "b"}, {"messages": [{"role": "user", "content": "q"}]}], 2, "no assistant turn"),
    ([{"prompt": "a", "response": "b"}, "[1, 2]"], 2, "expected a JSON object"),
    ([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": 3}], 2, "'response' must be a string"),
    ([{"prompt": "a", "response": "b"}, {"text": "plain"}], 2, "not a chat row"),
])
def test_a_malformed_row_is_reported_with_file_and_line(tmp_path, rows, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    data = RecordFiles([path], TOKENIZER, batch_size=1)
    with pytest.raises(ValueError, match=message) as error:
        data.setup("chat")
    assert str(error.value).startswith(f"{path}:{line}:")


def test_a_strategy_given_the_wrong_shape_fails_at_once_naming_both(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", CHAT_ROWS)
    with pytest.raises(ValueError, match=r"chats.jsonl:1: the strategy consumes 'preference' rows .* a chat shape"):
        RecordFiles([path], TOKENIZER, batch_size=1).setup("preference")
    with pytest.raises(ValueError, match="the strategy consumes 'text' batches, but data=files"):
        RecordFiles([path], TOKENIZER, batch_size=1).setup("text")


def test_parquet_rows_are_read_and_located(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "chosen": ["x", "y", "z"], "rejected": ["u", "v", None]}),
                   path)
    with pytest.raises(ValueError, match=r"pairs.parquet:row 3: .*'rejected'"):
        RecordFiles([str(path)], TOKENIZER, batch_size=1).setup("preference")


def test_a_response_cut_away_by_seq_len_drops_the_example_with_a_warning(tmp_path, caplog):
    rows = [{"prompt": "short", "response": "ok"}] * 3 + [{"prompt": "x" * 100, "response": "lost"}]
    data = RecordFiles([write_jsonl(tmp_path / "c.jsonl", rows)], TOKENIZER, batch_size=1, seq_len=40,
                       eval_fraction=0.3)
    with caplog.at_level(logging.WARNING):
        data.setup("chat")
    assert data.train.num_units + data.eval.num_units == 3
    assert "c.jsonl:4" in caplog.text


def test_padded_batches_are_sequence_major_resumable_and_carry_columns():
    units = [[([1, 10 + i], [-100, 10 + i]), ([1, 20 + i, 21], [-100, 20 + i, 21])] for i in range(6)]
    batches = PaddedBatches(units, batch_size=2, seed=3, pad_id=0)
    full = list(batches.shuffled(epoch=1))
    assert len(full) == 3
    for a, b in zip(full[1:], batches.shuffled(epoch=1, start=1)):
        assert torch.equal(a["input_ids"], b["input_ids"])
    batch = batches.batch(torch.tensor([4, 1]))
    assert batch["input_ids"].tolist() == [[1, 14, 0], [1, 11, 0], [1, 24, 21], [1, 21, 21]]
    assert batch["labels"].tolist() == [[-100, 14, -100], [-100, 11, -100], [-100, 24, 21], [-100, 21, 21]]
    batches.add_column("score", lambda b: b["input_ids"][:, 1].float(), batch_size=4)
    assert batches.batch(torch.tensor([4, 1]))["score"].tolist() == [14.0, 11.0, 24.0, 21.0]


def test_a_tokenizer_folder_with_its_own_template_drives_the_chat_data(tmp_path):
    """A trained BPE tokenizer with ChatML special tokens and a chat_template in tokenizer_config.json."""
    from llmtrain.data.bpe import TokenizerFile, tokenizer_config, train_bpe, write_tokenizer_dir

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("capital of France? Paris. 法国的首都是巴黎。\n" * 50)
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    bpe = train_bpe([corpus], vocab_size=300, special_tokens=specials)
    config = tokenizer_config(bpe, bos=None, eos="<|im_end|>", pad="<pad>")
    config["chat_template"] = CHATML
    (tmp_path / "tok").mkdir()
    write_tokenizer_dir(bpe, config, tmp_path / "tok")
    tokenizer = TokenizerFile(str(tmp_path / "tok"))
    data = RecordFiles([write_jsonl(tmp_path / "c.jsonl", [{"prompt": "capital of France?", "response": "巴黎"}] * 4)],
                       tokenizer, batch_size=2, eval_fraction=0.25)
    data.setup("chat")
    assert isinstance(data.template, JinjaTemplate)
    batch = next(data.eval_batches())
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert tokenizer.decode([t for t, label in zip(ids, labels) if label != -100], skip_special=False) == \
        "巴黎<|im_end|>\n"
    assert ids[0] == tokenizer.special_tokens["<|im_start|>"]        # the template's markers are single tokens
