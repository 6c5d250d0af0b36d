"""Chat templates: a conversation -> token ids plus SFT labels that cover only assistant tokens.

A message is `{"role": "system" | "user" | "assistant", "content": str}`. Labels are aligned with
the ids (the strategy shifts them): an assistant turn's content and its closing token are targets,
everything else (<bos>, role markers, system and user turns, padding) is IGNORE_INDEX (SPECS 4.2).

- `SpecialTokenTemplate` (the default) needs no template text: it uses the tokenizer's special
  tokens, `<bos>` then `<|role|>content<eos>` per message; a prompt for generation ends with
  `<|assistant|>`. A tokenizer without a bos token (`llmtrain tokenizer train` requires only
  <eos>) gets no `<bos>`, in training and in prompts alike.
- `JinjaTemplate` renders a Hugging Face `chat_template` (e.g. from a tokenizer directory's
  tokenizer_config.json). The assistant spans are found by rendering growing prefixes of the
  conversation: the text a message adds is the difference between two renderings, so any template
  whose rendering of a prefix is a prefix of the whole works (the common ones do; one that is not
  is refused with the message index). Special-token text in the rendering (`{{ eos_token }}`,
  `<|im_end|>` when the tokenizer has it) becomes that token's id whatever the tokenizer, as in
  Hugging Face tokenizers; the byte tokenizer alone would spell "<eos>" out as five bytes, and a
  model that never sees the real EOS as a target never stops generating.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, Protocol

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
Message = dict[str, str]


class ChatTemplate(Protocol):
    def encode(self, messages: Sequence[Message], first_target: int = 0) -> tuple[list[int], list[int]]:
        """(ids, labels) of a conversation; assistant turns at index >= `first_target` are targets."""

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Ids of a conversation followed by the opening of an assistant turn (for generation)."""


class SpecialTokenTemplate:
    """`<bos><|user|>question<eos><|assistant|>answer<eos>`: role markers are single special tokens.

    The leading `<bos>` is left out when `tokenizer.bos_id` is None; `encode_prompt` builds on
    `encode`, so a prompt starts exactly as the training conversations did.
    """

    def __init__(self, tokenizer: Any) -> None:
        missing = [f"<|{role}|>" for role in ROLES if f"<|{role}|>" not in tokenizer.special_tokens]
        if missing:
            raise ValueError(f"the tokenizer has no special tokens {missing} for the default chat template; "
                             "add them when training it, or set data.chat_template to a Jinja template")
        self.tokenizer = tokenizer
        self.role_ids = {role: tokenizer.special_tokens[f"<|{role}|>"] for role in ROLES}

    def encode(self, messages: Sequence[Message], first_target: int = 0) -> tuple[list[int], list[int]]:
        ids = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        labels = [IGNORE_INDEX] * len(ids)
        for i, message in enumerate(messages):
            content = self.tokenizer.encode(message["content"]) + [self.tokenizer.eos_id]
            ids += [self.role_ids[message["role"]], *content]
            target = message["role"] == "assistant" and i >= first_target
            labels += [IGNORE_INDEX, *(content if target else [IGNORE_INDEX] * len(content))]
        return ids, labels

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        ids, _ = self.encode(messages)
        return ids + [self.role_ids["assistant"]]


class JinjaTemplate:
    """A Hugging Face chat template (Jinja source), rendered in a sandbox."""

    def __init__(self, tokenizer: Any, source: str) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(source)
        self.tokenizer = tokenizer
        names = {i: token for token, i in tokenizer.special_tokens.items()}
        self.specials = {"bos_token": names.get(tokenizer.bos_id, ""), "eos_token": names.get(tokenizer.eos_id, "")}
        longest_first = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if longest_first else None
        self._warn_without_eos()

    def _warn_without_eos(self) -> None:
        """Generation stops at the tokenizer's EOS id; a template whose assistant turn never ends with
        it trains a model that runs on to max_new_tokens (and scores 0 on exact-match evaluation)."""
        probe = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]
        try:
            ids, labels = self.encode(probe)
        except Exception:           # templates that need other roles or fields: nothing to check here
            return
        if self.tokenizer.eos_id not in [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]:
            log.warning("data.chat_template: an assistant turn does not end with the tokenizer's EOS token "
                        "(%s, id %d), so a model trained on it never learns to stop; end the turn with "
                        "{{ eos_token }} or use a tokenizer whose EOS is the template's end-of-turn marker",
                        self.specials["eos_token"] or "unnamed", self.tokenizer.eos_id)

    def _encode(self, text: str) -> list[int]:
        """Ids of rendered text: special-token strings as their ids, the text between by the tokenizer."""
        if self._special_re is None:
            return self.tokenizer.encode(text)
        ids: list[int] = []
        for i, piece in enumerate(self._special_re.split(text)):
            if i % 2:
                ids.append(self.tokenizer.special_tokens[piece])
            elif piece:
                ids += self.tokenizer.encode(piece)
        return ids

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        return self.template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                    **self.specials)

    def encode(self, messages: Sequence[Message], first_target: int = 0) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        rendered = ""
        for i, message in enumerate(messages):
            target = message["role"] == "assistant" and i >= first_target
            opening = self.render(messages[:i], add_generation_prompt=True) if target else rendered
            upto = self.render(messages[:i + 1])
            for text, is_target in ((opening, False), (upto, target)):
                if not text.startswith(rendered):
                    raise ValueError(f"chat template: rendering messages[:{i + 1}] does not extend the rendering "
                                     "of the messages before it, so assistant tokens cannot be located")
                piece = self._encode(text[len(rendered):])
                ids += piece
                labels += piece if is_target else [IGNORE_INDEX] * len(piece)
                rendered = text
        return ids, labels

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        return self._encode(self.render(messages, add_generation_prompt=True))


def make_template(tokenizer: Any, source: str | None = None) -> ChatTemplate:
    """`source` (Jinja text), else the tokenizer's own `chat_template`, else the special-token default."""
    source = source or getattr(tokenizer, "chat_template", None)
    return JinjaTemplate(tokenizer, source) if source else SpecialTokenTemplate(tokenizer)


def _raise(message: str) -> None:
    raise ValueError(f"chat template: {message}")
