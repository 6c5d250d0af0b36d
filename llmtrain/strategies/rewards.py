"""Reward functions for GRPO (SPECS 4.4.1): verifiable checks of a completion's text or length.

A reward function is any callable

    fn(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]

called once per rollout with one entry per completion (B prompts x G completions, the G copies of
a prompt contiguous; prompts and answers repeated to match). The texts are decoded from token ids:
the prompt without special tokens, the completion cut at its first EOS with <pad>/<bos>/<eos>
removed but other special tokens written as their names (the byte tokenizer's <think> and
</think> are special tokens), the reference answer as the data gave it. A function that also takes
a keyword `completion_ids` (or `**kwargs`) receives each completion's token ids as well, a list of
lists cut after the first EOS, EOS included (what TRL passes under that name); `wants_completion_ids`
reads the signature once, when the rollouts are built.

Each is a `_target_` in the `strategy.rewards` list; its metric is `rewards/<name>`, where the
name is the callable's `name` attribute, else its `__name__` (a function with `_partial_: true`):

    rewards:
      - _target_: llmtrain.strategies.rewards.Accuracy
      - _target_: my_package.my_rewards.brevity        # def brevity(prompts, completions, answers)
        _partial_: true
      - _target_: llmtrain.strategies.rewards.OverlongPenalty   # DAPO's soft overlong punishment
        max_length: ${strategy.max_new_tokens}
        cache_length: 4
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence

RewardFn = Callable[..., Sequence[float]]     # (prompts, completions, answers[, completion_ids=...])
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


class OverlongPenalty:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13; TRL's
    get_soft_overlong_punishment), on a completion's token count |y| (EOS included):

        R(y) = 0                                 |y| <= L_max - L_cache
             = ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
             = -1                                L_max < |y|

    Args:
        max_length: L_max; usually the strategy's max_new_tokens (`${strategy.max_new_tokens}`), so
            a completion cut there without EOS gets -1 and the penalty ramps over the last
            `cache_length` tokens before it.
        cache_length: L_cache, the length of the ramp; 0 < cache_length < max_length.
    """

    name = "overlong"

    def __init__(self, max_length: int, cache_length: int) -> None:
        if not 0 < cache_length < max_length:
            raise ValueError(f"OverlongPenalty needs 0 < cache_length < max_length; got cache_length={cache_length}, "
                             f"max_length={max_length}")
        self.max_length, self.cache_length = max_length, cache_length

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str],
                 completion_ids: list[list[int]]) -> list[float]:
        return [self.penalty(len(ids)) for ids in completion_ids]

    def penalty(self, length: int) -> float:
        free = self.max_length - self.cache_length
        if length <= free:
            return 0.0
        return (free - length) / self.cache_length if length <= self.max_length else -1.0


def wants_completion_ids(fn: RewardFn) -> bool:
    """Whether `fn` takes a keyword `completion_ids` or `**kwargs` (False where it has no signature)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any((p.name == "completion_ids" and p.kind in keyword) or p.kind is inspect.Parameter.VAR_KEYWORD
               for p in parameters)


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
