"""The row shapes of user chat and preference files (DESIGN 6), turned into message lists.

Chat rows (SFT), any of:
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
    {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}  (ShareGPT)
    {"prompt": ..., "response" | "answer" | "completion": ..., "system": ... (optional)}
Preference rows (DPO/IPO):
    {"prompt": ..., "chosen": ..., "rejected": ...}   each a string or a list of messages
    {"chosen": [...], "rejected": [...]}               whole conversations sharing all but the last turn
Prompt rows (GRPO): {"prompt": a string or a list of messages, "answer": str, "system": ... (optional)},
    the answer being what the reward functions compare against (the same keys also serve as a chat row).
Every error names the row's file:line (`where`). A field whose value is null counts as absent:
Parquet stores a value a row lacks as null (a `system` column null on the rows without one), and
JSONL writers emit `"system": null` for the same thing.
"""

from __future__ import annotations

from typing import Any

from llmtrain.data.chat import ROLES, Message
from llmtrain.data.records import RecordError

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
RESPONSE_KEYS = ("response", "answer", "completion")
CHAT_SHAPES = "{'messages'}, {'conversations'} or {'prompt', 'response'|'answer'|'completion'}"
PREFERENCE_SHAPES = "{'prompt', 'chosen', 'rejected'} or {'chosen', 'rejected'} as conversations"
PROMPT_SHAPES = "{'prompt', 'answer'}"


def present(row: dict[str, Any], *keys: str) -> bool:
    """Whether `row` has a non-null value for every one of `keys`."""
    return all(row.get(key) is not None for key in keys)


def row_format(row: dict[str, Any]) -> str | None:
    """"preference", "chat" or "text" by the row's non-null keys (None: none of them)."""
    if present(row, "chosen", "rejected"):
        return "preference"
    if present(row, "messages") or present(row, "conversations") or (
            present(row, "prompt") and any(present(row, k) for k in RESPONSE_KEYS)):
        return "chat"
    return "text" if present(row, "text") else None


def has_format(row: dict[str, Any], format: str) -> bool:
    """Whether `row` has one of the shapes of batch `format` ({'prompt', 'answer'} is chat and prompts)."""
    return present(row, "prompt", "answer") if format == "prompts" else row_format(row) == format


def prompt_messages(where: str, row: dict[str, Any]) -> tuple[list[Message], str]:
    """(prompt messages, reference answer) of a prompt row."""
    if not present(row, "prompt", "answer"):
        raise RecordError(where, f"not a prompt row: expected {PROMPT_SHAPES}, got keys {_keys(row)}")
    if not isinstance(row["prompt"], str):
        return _message_list(where, "prompt", row["prompt"]), _string(where, row, "answer")
    return [*_system(where, row), {"role": "user", "content": row["prompt"]}], _string(where, row, "answer")


def chat_messages(where: str, row: dict[str, Any]) -> list[Message]:
    """The conversation of a chat row; it must contain at least one assistant turn."""
    if present(row, "messages"):
        messages = _message_list(where, "messages", row["messages"])
    elif present(row, "conversations"):
        messages = _sharegpt(where, row["conversations"])
    elif present(row, "prompt") and (key := next((k for k in RESPONSE_KEYS if present(row, k)), None)):
        messages = [*_system(where, row), {"role": "user", "content": _string(where, row, "prompt")},
                    {"role": "assistant", "content": _string(where, row, key)}]
    else:
        raise RecordError(where, f"not a chat row: expected {CHAT_SHAPES}, got keys {_keys(row)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(where, "the conversation has no assistant turn, so nothing to learn from")
    return messages


def preference_messages(where: str, row: dict[str, Any]) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt, chosen, rejected) message lists of a preference row."""
    if not present(row, "chosen", "rejected"):
        raise RecordError(where, f"not a preference row: expected {PREFERENCE_SHAPES}, got keys {_keys(row)}")
    if present(row, "prompt"):
        prompt = row["prompt"]
        prompt = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                  else _message_list(where, "prompt", prompt))
        chosen, rejected = (_response(where, row, key) for key in ("chosen", "rejected"))
        return prompt, chosen, rejected
    chosen, rejected = (_message_list(where, key, row[key]) for key in ("chosen", "rejected"))
    if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise RecordError(where, "without 'prompt', 'chosen' and 'rejected' must be conversations that differ "
                                 "only in their last (assistant) message")
    return chosen[:-1], chosen[-1:], rejected[-1:]


def _response(where: str, row: dict[str, Any], key: str) -> list[Message]:
    value = row[key]
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = _message_list(where, key, value)
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(where, f"'{key}' has no assistant message")
    return messages


def _message_list(where: str, key: str, value: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RecordError(where, f"'{key}' must be a non-empty list of messages, got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RecordError(where, f"{key}[{i}] must be {{'role': ..., 'content': ...}}, got {message!r:.80}")
        if message["role"] not in ROLES:
            raise RecordError(where, f"{key}[{i}]: role {message['role']!r} is not one of {ROLES}")
        if not isinstance(message["content"], str):
            raise RecordError(where, f"{key}[{i}]: content must be a string, got {type(message['content']).__name__}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _sharegpt(where: str, value: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RecordError(where, f"'conversations' must be a non-empty list, got {type(value).__name__}")
    messages = []
    for i, turn in enumerate(value):
        if isinstance(turn, dict) and "role" in turn:
            messages += _message_list(where, f"conversations[{i}]", [turn])
            continue
        known = isinstance(turn, dict) and turn.get("from") in SHAREGPT_ROLES
        if not known or not isinstance(turn.get("value"), str):
            raise RecordError(where, f"conversations[{i}] must be {{'from': human|gpt|system, 'value': str}}, "
                                     f"got {turn!r:.80}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def _system(where: str, row: dict[str, Any]) -> list[Message]:
    """The optional system message of a {'prompt', ...} row, as a list of zero or one message."""
    return [{"role": "system", "content": _string(where, row, "system")}] if present(row, "system") else []


def _keys(row: dict[str, Any]) -> str:
    """The row's keys for an error message; null ones are marked, since they count as absent."""
    return str(sorted(k if v is not None else f"{k}=null" for k, v in row.items()))


def _string(where: str, row: dict[str, Any], key: str) -> str:
    if not isinstance(row[key], str):
        raise RecordError(where, f"'{key}' must be a string, got {type(row[key]).__name__}")
    return row[key]
