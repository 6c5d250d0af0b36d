"""Chat (SFT), preference (DPO/IPO) and prompt (GRPO) data from the user's .jsonl / .parquet files.

The strategy's batch format decides how rows are read (llmtrain.data.formats lists the shapes).
The first row is checked before anything is tokenized, so `strategy=dpo` on a chat file fails at
once with a message naming the file, the row's shape and what the strategy needs. Conversations go
through the chat template (llmtrain.data.chat) and are truncated to `seq_len` tokens; an example
whose response is cut away entirely is dropped with a warning (it would teach nothing, and a DPO pair
with an empty side has no log-prob to compare). A GRPO prompt is never cut (that would drop its
assistant marker): one with `seq_len` tokens or more is dropped the same way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from llmtrain.data.chat import IGNORE_INDEX, make_template
from llmtrain.data.formats import (CHAT_SHAPES, PREFERENCE_SHAPES, PROMPT_SHAPES, chat_messages, has_format,
                                   preference_messages, prompt_messages, row_format)
from llmtrain.data.padded import PaddedBatches
from llmtrain.data.records import RECORD_SUFFIXES, read_records
from llmtrain.data.splits import Splits, check_sizes, path_list

log = logging.getLogger(__name__)
NEEDS = {"chat": CHAT_SHAPES, "preference": PREFERENCE_SHAPES, "prompts": PROMPT_SHAPES}


class RecordFiles(Splits):
    """Conversations or preference pairs from files; the last `eval_fraction` is held out.

    Args:
        paths: .jsonl or .parquet files (relative to the launch directory).
        tokenizer: encodes the messages (its special tokens or chat template frame them).
        eval_paths: held-out files; when empty, the last `eval_fraction` of the examples.
        seq_len: tokens per sequence (prompt + response) after the template; longer ones are cut.
        chat_template: Jinja source (None: the tokenizer's own, else the special-token default).
    """

    formats = ("chat", "preference", "prompts")

    def __init__(self, paths: Sequence[str], tokenizer: Any, eval_paths: Sequence[str] = (), seq_len: int = 1024,
                 batch_size: int = 8, eval_batch_size: int = 32, eval_fraction: float = 0.05, seed: int = 0,
                 chat_template: str | None = None) -> None:
        if not paths:
            raise ValueError("data.paths is empty: give at least one .jsonl or .parquet file")
        self.paths, self.eval_paths = _check_paths("data.paths", paths), _check_paths("data.eval_paths", eval_paths)
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction={eval_fraction} must be in (0, 1)")
        check_sizes(seq_len, batch_size, eval_batch_size)
        self.tokenizer, self.template = tokenizer, make_template(tokenizer, chat_template)
        self.seq_len, self.batch_size, self.eval_batch_size = seq_len, batch_size, eval_batch_size
        self.eval_fraction, self.seed = eval_fraction, seed
        self.format = ""

    def setup(self, format: str) -> None:
        if format not in self.formats:
            raise ValueError(f"the strategy consumes '{format}' batches, but data=files ({type(self).__name__}) serves "
                             f"only {self.formats}; for pre-training text use data=text or data=shards")
        self.format = format
        self._check_first_row(self.paths[0])
        train = self._units(self.paths)
        if self.eval_paths:
            held_out = self._units(self.eval_paths)
        else:
            n_eval = max(1, math.ceil(len(train) * self.eval_fraction))
            train, held_out = train[:-n_eval], train[-n_eval:]
        if len(train) < self.batch_size:
            raise ValueError(f"data.paths hold {len(train)} training examples: fewer than one batch of "
                             f"data.batch_size={self.batch_size}")
        self.train = PaddedBatches(train, self.batch_size, self.seed, self.tokenizer.pad_id)
        self.eval = PaddedBatches(held_out, self.eval_batch_size, self.seed, self.tokenizer.pad_id)
        log.info("data: %d training and %d held-out %s examples", len(train), len(held_out), format)

    def _check_first_row(self, path: Path) -> None:
        for where, row in read_records(path):
            found = row_format(row)
            if not has_format(row, self.format):
                raise ValueError(f"{where}: the strategy consumes '{self.format}' rows ({NEEDS[self.format]}), but "
                                 f"this row is {'a ' + found if found else 'of no known'} shape (keys {sorted(row)})")
            return
        raise ValueError(f"{path} holds no rows")

    def _units(self, paths: Sequence[Path]) -> list[list[tuple[list[int], list[int]]]]:
        units, dropped = [], []
        for path in paths:
            for where, row in read_records(path):
                if self.format == "chat":
                    unit = [self._cut(self.template.encode(chat_messages(where, row)))]
                elif self.format == "prompts":
                    unit = self._prompt_unit(where, row)
                else:
                    prompt, chosen, rejected = preference_messages(where, row)
                    unit = [self._cut(self.template.encode(prompt + answer, first_target=len(prompt)))
                            for answer in (chosen, rejected)]
                if unit is None or (self.format != "prompts"      # prompt rows' labels only mark real tokens
                                    and any(all(t == IGNORE_INDEX for t in labels[1:]) for _, labels in unit)):
                    dropped.append(where)
                else:
                    units.append(unit)
        if dropped:
            log.warning("dropped %d example(s) whose response lies beyond data.seq_len=%d tokens, first at %s",
                        len(dropped), self.seq_len, dropped[0])
        if not units:
            raise ValueError(f"no usable examples in {[str(p) for p in paths]}")
        return units

    def _prompt_unit(self, where: str, row: dict[str, Any]) -> list[tuple[list[int], list[int]]] | None:
        """The prompt (up to the assistant marker) and the answer's tokens, labels marking every real token
        (llmtrain.strategies.rollout.split_prompts); None when the prompt leaves no room in `seq_len`."""
        messages, answer = prompt_messages(where, row)
        prompt, answer_ids = self.template.encode_prompt(messages), self.tokenizer.encode(answer)
        return [(prompt, prompt), (answer_ids, answer_ids)] if len(prompt) < self.seq_len else None

    def _cut(self, sequence: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
        ids, labels = sequence
        return ids[:self.seq_len], labels[:self.seq_len]

    def add_column(self, name: str, compute: Callable[[dict[str, Tensor]], Tensor]) -> None:
        self.train.add_column(name, compute)
        self.eval.add_column(name, compute)


def _check_paths(option: str, paths: str | Sequence[str]) -> list[Path]:
    checked = path_list(paths)
    for path in checked:
        if path.suffix not in RECORD_SUFFIXES:
            raise ValueError(f"{option}: {path} is not one of {RECORD_SUFFIXES}")
        if not path.is_file():
            raise ValueError(f"{option}: {path} does not exist")
    return checked
