"""The built-in task family: short arithmetic and string questions in English and Chinese.

Every example has a prompt, the correct answer and a plausible wrong one, so the same source
serves pre-training text, chat (prompt/answer), preference (answer vs wrong) and verifiable
prompts. Generation is deterministic for a seed (a private `random.Random`, never the global RNG).

The tasks span difficulties on purpose, so that held-out accuracy of a tiny model climbs over a
run instead of saturating at once: `next` and `upper` are learnt in a few hundred steps, `add`
and `mul` take thousands.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

LANGUAGES = ("en", "zh")
ANSWER_PREFIX = {"en": "Answer: ", "zh": "答："}


@dataclass(frozen=True)
class Example:
    task: str
    lang: str
    prompt: str
    answer: str
    wrong: str


Question = tuple[str, str, str]          # prompt, answer, wrong answer


def _near_miss(rng: random.Random, value: int) -> str:
    return str(value + rng.choice([-10, -2, -1, 1, 2, 10]))


def _word(rng: random.Random, low: int = 3, high: int = 6) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(low, high)))


def _add(rng: random.Random, lang: str) -> Question:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    prompt = f"What is {a} plus {b}?" if lang == "en" else f"{a}加{b}等于多少？"
    return prompt, str(a + b), _near_miss(rng, a + b)


def _sub(rng: random.Random, lang: str) -> Question:
    a = rng.randint(0, 99)
    b = rng.randint(0, a)
    prompt = f"What is {a} minus {b}?" if lang == "en" else f"{a}减{b}等于多少？"
    return prompt, str(a - b), _near_miss(rng, a - b)


def _mul(rng: random.Random, lang: str) -> Question:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    prompt = f"What is {a} times {b}?" if lang == "en" else f"{a}乘{b}等于多少？"
    return prompt, str(a * b), _near_miss(rng, a * b)


def _next(rng: random.Random, lang: str) -> Question:
    a = rng.randint(0, 99)
    prompt = f"What number comes after {a}?" if lang == "en" else f"{a}的下一个数是多少？"
    return prompt, str(a + 1), str(a + rng.choice([2, 10, -1]))


def _max(rng: random.Random, lang: str) -> Question:
    a, b = rng.sample(range(100), 2)
    prompt = f"Which is larger, {a} or {b}?" if lang == "en" else f"{a}和{b}哪个更大？"
    return prompt, str(max(a, b)), str(min(a, b))


def _reverse(rng: random.Random, lang: str) -> Question:
    word = _word(rng, 3, 5)
    prompt = f"Reverse the word '{word}'." if lang == "en" else f"把单词'{word}'倒过来写。"
    return prompt, word[::-1], word if word != word[::-1] else word + word[0]


def _length(rng: random.Random, lang: str) -> Question:
    word = _word(rng, 2, 9)
    prompt = f"How many letters are in '{word}'?" if lang == "en" else f"'{word}'有几个字母？"
    return prompt, str(len(word)), str(len(word) + rng.choice([-1, 1]))


def _upper(rng: random.Random, lang: str) -> Question:
    word = _word(rng)
    prompt = f"Write '{word}' in capital letters." if lang == "en" else f"把'{word}'写成大写字母。"
    return prompt, word.upper(), word


TASKS: dict[str, Callable[[random.Random, str], Question]] = {
    "add": _add, "sub": _sub, "mul": _mul, "next": _next, "max": _max,
    "reverse": _reverse, "length": _length, "upper": _upper,
}


def check_choices(tasks: Sequence[str], languages: Sequence[str]) -> None:
    if unknown := sorted(set(tasks) - set(TASKS)):
        raise ValueError(f"data.tasks: unknown {unknown}; the built-in tasks are {sorted(TASKS)}")
    if unknown := sorted(set(languages) - set(LANGUAGES)):
        raise ValueError(f"data.languages: unknown {unknown}; choose from {list(LANGUAGES)}")
    if not tasks or not languages:
        raise ValueError("data.tasks and data.languages must each name at least one option")


def is_held_out(example: Example, eval_share: int = 20) -> bool:
    """Whether a prompt belongs to the held-out split: decided by its text, so splits never overlap."""
    return zlib.crc32(f"{example.task}|{example.lang}|{example.prompt}".encode()) % eval_share == 0


def generate_examples(seed: int, n_train: int, n_eval: int, tasks: Sequence[str] = tuple(TASKS),
                      languages: Sequence[str] = LANGUAGES) -> tuple[list[Example], list[Example]]:
    """Train and held-out examples; held-out prompts are distinct and never occur in training.

    Tasks with few distinct prompts (e.g. `mul`) may contribute fewer held-out examples than their
    share; the draw stops after 50 x (n_train + n_eval) attempts.
    """
    check_choices(tasks, languages)
    rng = random.Random(seed)
    train: list[Example] = []
    held_out: dict[str, Example] = {}
    for _ in range(50 * (n_train + n_eval)):
        if len(train) >= n_train and len(held_out) >= n_eval:
            break
        task, lang = rng.choice(tasks), rng.choice(languages)
        example = Example(task, lang, *TASKS[task](rng, lang))
        if not is_held_out(example):
            if len(train) < n_train:
                train.append(example)
        elif len(held_out) < n_eval:
            held_out.setdefault(f"{task}|{lang}|{example.prompt}", example)
    return train, list(held_out.values())


def document(example: Example) -> str:
    """The pre-training text of an example: the question, then the answer after a language tag."""
    return f"{example.prompt} {ANSWER_PREFIX[example.lang]}{example.answer}"


def question(example: Example) -> str:
    """What the model is given at evaluation; it must continue with the answer and <eos>."""
    return f"{example.prompt} {ANSWER_PREFIX[example.lang]}"
