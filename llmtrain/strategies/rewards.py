"""Reward functions for GRPO (SPECS 4.4.1): verifiable checks of a completion's text.

A reward function is any callable

    fn(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]

called once per rollout with one entry per completion (B prompts x G completions, the G copies of
a prompt contiguous; prompts and answers repeated to match). The texts are decoded from token ids:
the prompt without special tokens, the completion cut at its first EOS with <pad>/<bos>/<eos>
removed but other special tokens written as their names (the byte tokenizer's <think> and
</think> are special tokens), the reference answer as the data gave it.

Each is a `_target_` in the `strategy.rewards` list; its metric is `rewards/<name>`, where the
name is the callable's `name` attribute, else its `__name__` (a function with `_partial_: true`):

    rewards:
      - _target_: llmtrain.strategies.rewards.Accuracy
      - _target_: my_package.my_rewards.brevity        # def brevity(prompts, completions, answers)
        _partial_: true
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

RewardFn = Callable[[list[str], list[str], list[str]], Sequence[float]]
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class Accuracy:
    """1.0 when the completion equals the reference answer (both stripped), else 0.0.

    A completion with an `<answer>...</answer>` tag is judged by the tag's content (R1-V's
    accuracy reward), so the check combines with the Format reward.
    """

    name = "accuracy"

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
        return [float(extract_answer(c) == a.strip()) for c, a in zip(completions, answers)]


class Format:
    """1.0 when the whole stripped completion matches `pattern` (DOTALL), else 0.0.

    Args:
        pattern: R1-V's think-then-answer format by default.
    """

    name = "format"

    def __init__(self, pattern: str = r"<think>.*?</think>\s*<answer>.*?</answer>") -> None:
        self.pattern = re.compile(pattern, re.DOTALL)

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
        return [float(self.pattern.fullmatch(c.strip()) is not None) for c in completions]


def extract_answer(completion: str) -> str:
    """The stripped content of the first <answer> tag, else the whole stripped completion."""
    tagged = ANSWER_TAG.search(completion)
    return (tagged.group(1) if tagged else completion).strip()


def reward_name(fn: RewardFn) -> str:
    """The name in `rewards/<name>`: `fn.name`, `fn.__name__`, or the wrapped function's (a partial)."""
    for candidate in (fn, getattr(fn, "func", None)):
        for attribute in ("name", "__name__"):
            if isinstance(name := getattr(candidate, attribute, None), str):
                return name
    return type(fn).__name__
