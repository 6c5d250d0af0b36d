"""The `llmtrain` console command: tools around runs (training itself is `python run.py`).

    llmtrain generate <checkpoint> --prompt "..."     sample from a checkpoint (llmtrain.generate)
    llmtrain export hf <checkpoint> <dir>             write a Hugging Face model folder (llmtrain.hf.export)
    llmtrain tokenizer train <files> --vocab-size N --out <dir>   train a BPE tokenizer (llmtrain.tokenizer_cli)
    llmtrain tokenize <files> --out <dir>             tokenize text once into token shards (llmtrain.tokenize_cli)
    llmtrain reproduce <run dir> [key=value ...]      re-run from the snapshot, compare metrics (llmtrain.reproduce)
    llmtrain summarize <sweep dir>                    rebuild a sweep's summary files (llmtrain.sweep)

Each subcommand owns its argument parser; this module only dispatches on the first word, so a
subcommand's imports (torch, transformers-free HF writers) load only when it runs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module with `main(argv) -> int`, one-line help)
COMMANDS = {
    "generate": ("llmtrain.generate", "sample completions from a checkpoint with the KV-cache generator"),
    "export": ("llmtrain.hf.export", "export a checkpoint to another format (`export hf <checkpoint> <dir>`)"),
    "tokenizer": ("llmtrain.tokenizer_cli", "train a byte-level BPE tokenizer (`tokenizer train <files> ...`)"),
    "tokenize": ("llmtrain.tokenize_cli", "tokenize text files once into memory-mapped token shards (data=shards)"),
    "reproduce": ("llmtrain.reproduce", "re-run a finished run from its snapshot and check the metrics match"),
    "summarize": ("llmtrain.sweep", "rebuild a sweep directory's summary.csv/.md/.png (`summarize <sweep dir>`)"),
}


def usage() -> str:
    lines = ["usage: llmtrain <command> [args]   (training: python run.py)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`llmtrain <command> --help` describes a command's arguments."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"llmtrain: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
