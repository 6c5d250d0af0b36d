"""The built-in task family: deterministic, correct, bilingual, with a disjoint held-out split."""

from __future__ import annotations

import re

import pytest

from llmtrain.data.synthetic import (DEFAULT_TASKS, LANGUAGES, PARITY_WORDS, TASKS, document, generate_examples,
                                     is_held_out, question, split_examples)


def test_same_seed_same_examples_other_seed_others():
    assert generate_examples(3, 300) == generate_examples(3, 300)
    assert generate_examples(3, 300) != generate_examples(4, 300)
    assert split_examples(3, 300, 20) == split_examples(3, 300, 20)


def test_held_out_prompts_never_occur_in_training():
    train, held_out = split_examples(0, 20_000, 500)
    assert len(train) == 20_000 and len(held_out) == 500
    prompts = {(e.task, e.lang, e.prompt) for e in held_out}
    assert len(prompts) == len(held_out)
    assert not prompts & {(e.task, e.lang, e.prompt) for e in train}
    assert all(map(is_held_out, held_out)) and not any(map(is_held_out, train))


def test_a_small_pool_gives_a_shorter_held_out_split():
    train, held_out = split_examples(0, 100, 500, tasks=["mul"], languages=["en"])
    assert len(train) == 100 and 0 < len(held_out) < 50       # 10 x 10 facts, 2 phrasings, 1 in 20


def test_every_task_appears_in_both_languages_in_both_splits():
    train, held_out = split_examples(0, 5000, 400, tasks=list(TASKS))
    everything = {(t, lang) for t in TASKS for lang in LANGUAGES}
    assert {(e.task, e.lang) for e in train} == everything
    assert {(e.task, e.lang) for e in held_out[:len(everything)]} == everything   # groups taken in turn


def test_choices_restrict_the_tasks_and_languages():
    assert {e.task for e in generate_examples(0, 500)} == set(DEFAULT_TASKS)
    examples = generate_examples(0, 200, tasks=["mul"], languages=["zh"])
    assert {(e.task, e.lang) for e in examples} == {("mul", "zh")}


ARITHMETIC = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
              "max": max, "next": lambda a: a + 1}


def expected_answer(task: str, lang: str, prompt: str) -> str:
    """The answer recomputed from the numbers or the word the prompt states."""
    numbers = [int(n) for n in re.findall(r"\d+", prompt)]
    word = re.search(r"'([a-z]+)'", prompt)
    if task in ARITHMETIC:
        return str(ARITHMETIC[task](*numbers))
    if task == "parity":
        return PARITY_WORDS[lang][numbers[0] % 2]
    return {"length": str(len(word.group(1))), "upper": word.group(1).upper(), "reverse": word.group(1)[::-1]}[task]


def test_answers_are_correct_and_wrong_answers_are_wrong():
    for e in generate_examples(1, 3000, tasks=list(TASKS)):
        assert e.answer == expected_answer(e.task, e.lang, e.prompt), e
        assert e.wrong != e.answer and e.wrong, e


def test_the_document_is_the_question_then_the_answer():
    e = next(e for e in generate_examples(0, 100) if e.lang == "zh")
    assert question(e).startswith(e.prompt) and question(e).endswith("答：")
    assert document(e) == question(e) + e.answer


@pytest.mark.parametrize("kwargs, match", [({"tasks": ["add", "poetry"]}, "poetry.*'add'"),
                                           ({"languages": ["fr"]}, "fr"), ({"tasks": []}, "at least one")])
def test_unknown_choices_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_examples(0, 10, **kwargs)
