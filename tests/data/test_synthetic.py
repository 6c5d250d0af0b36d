"""The built-in task family: deterministic, correct, bilingual, with a disjoint held-out split."""

from __future__ import annotations

import re

import pytest

from llmtrain.data.synthetic import TASKS, generate_examples, is_held_out


def test_same_seed_same_examples_other_seed_others():
    assert generate_examples(3, 200, 20) == generate_examples(3, 200, 20)
    assert generate_examples(3, 200, 20) != generate_examples(4, 200, 20)


def test_held_out_prompts_never_occur_in_training():
    train, held_out = generate_examples(0, 20_000, 500)
    assert len(train) == 20_000 and len(held_out) == 500
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    assert all(is_held_out(e) for e in held_out) and not any(is_held_out(e) for e in train)
    assert len({e.prompt for e in held_out}) == len(held_out)


def test_every_task_appears_in_both_languages():
    train, _ = generate_examples(0, 5000, 10)
    assert {(e.task, e.lang) for e in train} == {(t, lang) for t in TASKS for lang in ("en", "zh")}


ARITHMETIC = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
              "max": max, "next": lambda a: a + 1}


def test_answers_are_correct_and_wrong_answers_are_wrong():
    train, _ = generate_examples(1, 3000, 10)
    for e in train:
        assert e.answer != e.wrong, e
        numbers = [int(n) for n in re.findall(r"\d+", e.prompt)]
        word = re.search(r"'([a-z]+)'", e.prompt)
        if e.task in ARITHMETIC:
            assert int(e.answer) == ARITHMETIC[e.task](*numbers), e
        elif e.task == "reverse":
            assert e.answer == word.group(1)[::-1]
        elif e.task == "length":
            assert int(e.answer) == len(word.group(1))
        elif e.task == "upper":
            assert e.answer == word.group(1).upper()


@pytest.mark.parametrize("kwargs, match", [({"tasks": ["add", "poetry"]}, "poetry"),
                                           ({"languages": ["fr"]}, "fr")])
def test_unknown_choices_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_examples(0, 10, 10, **kwargs)
