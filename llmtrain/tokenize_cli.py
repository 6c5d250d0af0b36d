"""`llmtrain tokenize <files...> --out <dir>`: tokenize pre-training text once, into token shards.

Train on the folder with `python run.py data=shards data.path=<dir>` (plus the same tokenizer,
`data/tokenizer=file data.tokenizer.path=...`, when it is not the byte-level default).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from llmtrain.data.bpe import TokenizerFile
from llmtrain.data.shards import write_shards
from llmtrain.data.text import SUFFIXES, read_documents
from llmtrain.data.tokenizer import ByteTokenizer


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llmtrain tokenize", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help=".txt files (one document each), .jsonl or .parquet ({\"text\"})")
    parser.add_argument("--out", required=True, help="the shard folder to create; must not exist or be empty")
    parser.add_argument("--tokenizer", default="byte",
                        help="'byte' (default) or a tokenizer.json / Hugging Face tokenizer folder")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    return parser.parse_args(argv)


def check_corpus(command: str, files: Sequence[str], texts: Callable[[Path], Iterable[str]],
                 suffixes: Sequence[str], nothing: str) -> None:
    """Refuse a corpus in which no file has text (ValueError); warn on stderr about the files without
    text of one that has some. Each file is read up to its first non-blank text; missing files and
    unknown suffixes are left to the command's own checks, which name them.
    """
    paths = [Path(f) for f in files]
    empty = [p for p in paths if p.is_file() and p.suffix in suffixes and not any(t.strip() for t in texts(p))]
    names = ", ".join(map(str, empty))
    if empty and len(empty) == len(paths):
        raise ValueError(f"no text in {names}: {nothing}")
    if empty:
        print(f"{command}: warning: no text in {names}", file=sys.stderr)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        check_corpus("llmtrain tokenize", args.files, read_documents, SUFFIXES, "nothing to tokenize")
        if args.tokenizer == "byte":
            tokenizer, spec = ByteTokenizer(), "byte"
        else:
            tokenizer, spec = TokenizerFile(args.tokenizer), str(Path(args.tokenizer).resolve())
        index = write_shards(args.files, args.out, tokenizer, spec, args.shard_tokens)
    except (ValueError, OSError, ImportError) as error:
        print(f"llmtrain tokenize: {error}", file=sys.stderr)
        return 2
    for source in index["sources"]:
        print(f"{source['path']}: {source['documents']:,} documents, {source['tokens']:,} tokens")
    print(f"wrote {index['total_tokens']:,} {index['dtype']} tokens in {len(index['shards'])} shard(s) to {args.out}")
    tokenizer_args = "" if spec == "byte" else f" data/tokenizer=file data.tokenizer.path={spec}"
    print(f"train on it: python run.py data=shards data.path={args.out}{tokenizer_args}")
    return 0
