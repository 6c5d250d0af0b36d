"""The built-in task family: short arithmetic and string questions in English and Chinese.

Every example carries its task, language, prompt, the correct answer and a plausible wrong one,
so one source serves pre-training text, chat (prompt/answer), preference (answer vs wrong) and
verifiable prompts. Generation is deterministic for a seed (a private `random.Random`, never the
global RNG). Each task has two phrasings per language. A held-out prompt never occurs in training,
but the same fact may occur in another phrasing or language: that is what makes the small `mul`
table answerable at all.

`DEFAULT_TASKS` spans difficulties so that the held-out accuracy of the tiny CPU model (0.8M
parameters, 16 x 128 tokens a step, 2 CPU threads) keeps climbing instead of saturating or staying
at zero: `length` is learnt within ~1200 steps, `next`, `max` and `parity` within ~2400; `mul`
(~65% at 2400 steps), `add` and `sub` (~20%) improve slowly, to 80-100% at 6000 steps. `upper` and
`reverse` are opt-in: they need a content-addressed copy of letters, which this model had not
learnt after 4800 steps (0%), so in the default mix they would only dilute the signal.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice, zip_longest

LANGUAGES = ("en", "zh")
ANSWER_PREFIX = {"en": "Answer: ", "zh": "答："}
EVAL_SHARE = 20                       # one prompt in 20 is held out


@dataclass(frozen=True)
class Example:
    """One question with its correct answer and a plausible wrong one."""

    task: str
    lang: str
    prompt: str
    answer: str
    wrong: str


Question = tuple[str, str, str]       # prompt, answer, wrong answer
Phrasings = dict[str, tuple[str, ...]]

ADD: Phrasings = {"en": ("What is {a} plus {b}?", "What is the sum of {a} and {b}?"),
                  "zh": ("{a}加{b}等于多少？", "{a}与{b}的和是多少？")}
SUB: Phrasings = {"en": ("What is {a} minus {b}?", "How much is {a} take away {b}?"),
                  "zh": ("{a}减{b}等于多少？", "{a}减去{b}是多少？")}
MUL: Phrasings = {"en": ("What is {a} times {b}?", "What is {a} multiplied by {b}?"),
                  "zh": ("{a}乘{b}等于多少？", "{a}乘以{b}是多少？")}
NEXT: Phrasings = {"en": ("What number comes after {a}?", "Which number follows {a}?"),
                   "zh": ("{a}的下一个数是多少？", "{a}后面的数是几？")}
MAX: Phrasings = {"en": ("Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?"),
                  "zh": ("{a}和{b}哪个更大？", "{a}和{b}中较大的数是几？")}
PARITY: Phrasings = {"en": ("Is {a} even or odd?", "Is {a} odd or even?"),
                     "zh": ("{a}是偶数还是奇数？", "{a}是奇数还是偶数？")}
LENGTH: Phrasings = {"en": ("How many letters are in '{w}'?", "What is the length of the word '{w}'?"),
                     "zh": ("'{w}'有几个字母？", "单词'{w}'的长度是多少？")}
UPPER: Phrasings = {"en": ("Write '{w}' in capital letters.", "What is '{w}' in uppercase?"),
                    "zh": ("把'{w}'写成大写字母。", "'{w}'的大写形式是什么？")}
REVERSE: Phrasings = {"en": ("Reverse the word '{w}'.", "What is '{w}' spelled backwards?"),
                      "zh": ("把单词'{w}'倒过来写。", "'{w}'倒过来是什么？")}
PARITY_WORDS = {"en": ("even", "odd"), "zh": ("偶数", "奇数")}   # indexed by n % 2


def _say(rng: random.Random, lang: str, phrasings: Phrasings, **values: object) -> str:
    return rng.choice(phrasings[lang]).format(**values)


def _number(rng: random.Random) -> int:
    """A 1- or 2-digit number, each length equally likely, so the small facts give an easy start."""
    return rng.randint(0, 9) if rng.random() < 0.5 else rng.randint(10, 99)


def _word(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(low, high)))


def _near_miss(rng: random.Random, value: int) -> str:
    """An off-by-a-little answer (the typical arithmetic slip), never negative."""
    offsets = [d for d in (-10, -2, -1, 1, 2, 10) if value + d >= 0]
    return str(value + rng.choice(offsets))


def add(rng: random.Random, lang: str) -> Question:
    a, b = _number(rng), _number(rng)
    return _say(rng, lang, ADD, a=a, b=b), str(a + b), _near_miss(rng, a + b)


def sub(rng: random.Random, lang: str) -> Question:
    b, a = sorted((_number(rng), _number(rng)))      # a >= b: answers stay non-negative
    return _say(rng, lang, SUB, a=a, b=b), str(a - b), _near_miss(rng, a - b)


def mul(rng: random.Random, lang: str) -> Question:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    # Adding instead of multiplying is the classic confusion; fall back where the two agree (2 x 2).
    wrong = str(a + b) if a + b != a * b else _near_miss(rng, a * b)
    return _say(rng, lang, MUL, a=a, b=b), str(a * b), wrong


def next_number(rng: random.Random, lang: str) -> Question:
    a = rng.randint(0, 98)
    return _say(rng, lang, NEXT, a=a), str(a + 1), _near_miss(rng, a + 1)


def larger(rng: random.Random, lang: str) -> Question:
    a, b = _number(rng), _number(rng)
    while a == b:
        b = _number(rng)
    return _say(rng, lang, MAX, a=a, b=b), str(max(a, b)), str(min(a, b))


def parity(rng: random.Random, lang: str) -> Question:
    # Up to 3 digits: too many numbers to memorise each one's parity, so only the last-digit
    # rule pays, and the held-out pool is large enough to measure it.
    a = rng.randint(0, 999)
    words = PARITY_WORDS[lang]
    return _say(rng, lang, PARITY, a=a), words[a % 2], words[1 - a % 2]


def length(rng: random.Random, lang: str) -> Question:
    w = _word(rng, 2, 9)
    return _say(rng, lang, LENGTH, w=w), str(len(w)), str(len(w) + rng.choice([-1, 1]))


def upper(rng: random.Random, lang: str) -> Question:
    w = _word(rng, 3, 5)
    return _say(rng, lang, UPPER, w=w), w.upper(), w                 # forgot to convert


def reverse(rng: random.Random, lang: str) -> Question:
    w = _word(rng, 3, 5)
    # The word itself is the natural slip; a palindrome ("aba") needs another one.
    wrong = w if w != w[::-1] else w[1:] + w[0] if len(set(w)) > 1 else w + w[0]
    return _say(rng, lang, REVERSE, w=w), w[::-1], wrong


TASKS: dict[str, Callable[[random.Random, str], Question]] = {
    "add": add, "sub": sub, "mul": mul, "next": next_number, "max": larger, "parity": parity,
    "length": length, "upper": upper, "reverse": reverse,
}
DEFAULT_TASKS = ("add", "sub", "mul", "next", "max", "parity", "length")


def check_choices(tasks: Sequence[str], languages: Sequence[str]) -> None:
    """Raise ValueError naming any unknown task or language, listing the valid ones."""
    if unknown := sorted(set(tasks) - set(TASKS)):
        raise ValueError(f"data.tasks: unknown {unknown}; the built-in tasks are {list(TASKS)}")
    if unknown := sorted(set(languages) - set(LANGUAGES)):
        raise ValueError(f"data.languages: unknown {unknown}; choose from {list(LANGUAGES)}")
    if not tasks or not languages:
        raise ValueError(f"data.tasks={list(tasks)} and data.languages={list(languages)} must each "
                         f"name at least one option")


def stream_examples(seed: int, tasks: Sequence[str] = DEFAULT_TASKS,
                    languages: Sequence[str] = LANGUAGES) -> Iterator[Example]:
    """An endless, seeded stream of examples; task and language are drawn uniformly per example."""
    check_choices(tasks, languages)
    rng = random.Random(seed)
    tasks, languages = list(tasks), list(languages)  # rng.choice needs indexable sequences
    while True:
        task, lang = rng.choice(tasks), rng.choice(languages)
        yield Example(task, lang, *TASKS[task](rng, lang))


def generate_examples(seed: int, n: int, tasks: Sequence[str] = DEFAULT_TASKS,
                      languages: Sequence[str] = LANGUAGES) -> list[Example]:
    """The first `n` examples of the seeded stream (both splits mixed; see `split_examples`)."""
    return list(islice(stream_examples(seed, tasks, languages), n))


def is_held_out(example: Example) -> bool:
    """Whether an example's prompt belongs to the held-out split.

    Decided by a hash of (task, lang, prompt) alone, not by the draw, so a held-out prompt can
    never occur in training, whatever the seed or the sizes.
    """
    key = f"{example.task}|{example.lang}|{example.prompt}".encode()
    return zlib.crc32(key) % EVAL_SHARE == 0


def split_examples(seed: int, n_train: int, n_eval: int, tasks: Sequence[str] = DEFAULT_TASKS,
                   languages: Sequence[str] = LANGUAGES) -> tuple[list[Example], list[Example]]:
    """`n_train` training examples and `n_eval` held-out ones with distinct prompts, from one stream.

    Training examples may repeat. Tasks with few distinct prompts (`mul`, `next`: about 10
    held-out prompts per language) stop contributing held-out examples once theirs are used up; if
    the tasks cannot fill `n_eval`, the held-out list is shorter. The draw stops after
    2 n_train + 100 n_eval examples, five times what an unlimited pool needs (1 in EVAL_SHARE is
    held out). The held-out list takes (task, language) groups in turn, so any prefix of it (the
    accuracy examples) is as balanced as those small pools allow.
    """
    train: list[Example] = []
    held_out: dict[tuple[str, str, str], Example] = {}   # keyed by prompt: the wrong answer may differ
    for example in islice(stream_examples(seed, tasks, languages), 2 * n_train + 100 * n_eval):
        if len(train) >= n_train and len(held_out) >= n_eval:
            break
        if not is_held_out(example):
            if len(train) < n_train:
                train.append(example)
        elif len(held_out) < n_eval:
            held_out.setdefault((example.task, example.lang, example.prompt), example)
    return train, _interleave(held_out.values())


def _interleave(examples: Iterable[Example]) -> list[Example]:
    """Round-robin over (task, lang) groups, in order of first appearance; order within a group kept."""
    groups: dict[tuple[str, str], list[Example]] = {}
    for e in examples:
        groups.setdefault((e.task, e.lang), []).append(e)
    rounds = zip_longest(*groups.values())
    return [e for row in rounds for e in row if e is not None]


def document(example: Example) -> str:
    """The pre-training text of an example: its question, then the answer."""
    return question(example) + example.answer


def question(example: Example) -> str:
    """What the model is given at evaluation; it must continue with the answer and <eos>."""
    return f"{example.prompt} {ANSWER_PREFIX[example.lang]}"
