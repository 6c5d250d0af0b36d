"""`llmtrain tokenizer train <files...> --vocab-size N --out <dir>`: train a byte-level BPE tokenizer.

The folder gets tokenizer.json and tokenizer_config.json; train with it through
`data/tokenizer=file data.tokenizer.path=<dir>`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from llmtrain.data.atomic import check_new_dir, new_dir
from llmtrain.data.bpe import (TRAIN_SUFFIXES, TokenizerFile, tokenizer_config, train_bpe, training_texts,
                               write_tokenizer_dir)
from llmtrain.data.tokenizer import SPECIAL_TOKENS
from llmtrain.tokenize_cli import check_corpus

# Checked after training, with a sample of the corpus: Chinese, English, emoji, spaces and newlines.
ROUND_TRIP_SAMPLE = "Hello, 世界! 23加45等于多少？答：68.\n\n  naïve café 🙂\tend "


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llmtrain tokenizer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="learn a byte-level BPE vocabulary from .txt/.jsonl/.parquet files")
    train.add_argument("files", nargs="+", help=".txt files (one document each), .jsonl or .parquet rows")
    train.add_argument("--vocab-size", type=int, required=True, help="total ids, special and byte tokens included")
    train.add_argument("--out", required=True, help="the folder to create; must not exist or be empty")
    train.add_argument("--special-tokens", nargs="+", default=list(SPECIAL_TOKENS),
                       help="ids 0..n-1 in this order; must include <eos> (default: %(default)s)")
    train.add_argument("--min-frequency", type=int, default=2, help="pairs seen fewer times are never merged")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    out, specials = Path(args.out), args.special_tokens
    try:
        if "<eos>" not in specials:
            raise ValueError(f"--special-tokens {' '.join(specials)}: <eos> is required (it ends every document)")
        check_new_dir(out)                         # before training, not after
        check_corpus("llmtrain tokenizer", args.files, lambda path: training_texts([path]), TRAIN_SUFFIXES,
                     "nothing to learn a vocabulary from")
        tokenizer = train_bpe(args.files, args.vocab_size, specials, args.min_frequency)
        config = tokenizer_config(tokenizer, bos="<bos>" if "<bos>" in specials else None, eos="<eos>",
                                  pad="<pad>" if "<pad>" in specials else None)
        with new_dir(out) as tmp:
            write_tokenizer_dir(tokenizer, config, tmp)
        loaded = TokenizerFile(str(out))
        sample = ROUND_TRIP_SAMPLE + next(training_texts([Path(args.files[0])]), "")[:2000]
        for name in specials:                      # typed-out special tokens are read as the token (bpe.py)
            sample = sample.replace(name, "")
    except (ValueError, OSError, ImportError) as error:
        print(f"llmtrain tokenizer: {error}", file=sys.stderr)
        return 2
    ids = loaded.encode(sample)
    ok = loaded.decode(ids) == sample
    print(f"wrote {out}/tokenizer.json and tokenizer_config.json: vocab size {loaded.vocab_size} "
          f"({len(specials)} special tokens, ids 0-{len(specials) - 1})")
    print(f"round trip {'ok' if ok else 'FAILED'}: {len(sample)} characters -> {len(ids)} tokens "
          f"({len(sample) / max(len(ids), 1):.2f} characters per token)")
    print(f"train with it: python run.py data/tokenizer=file data.tokenizer.path={out} ...")
    return 0 if ok else 1
