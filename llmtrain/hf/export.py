"""`llmtrain export hf <checkpoint or run dir> <new folder>`: a Hugging Face model folder.

The folder loads with `transformers.AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained`, no llmtrain needed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from llmtrain.hf import io as hf_io
from llmtrain.pretrained import load_checkpoint_model


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llmtrain export", description=__doc__.splitlines()[0])
    formats = parser.add_subparsers(dest="format", required=True)
    hf = formats.add_parser("hf", help="Hugging Face transformers folder (config.json, generation_config.json, "
                                       "model.safetensors, tokenizer)")
    hf.add_argument("checkpoint", help="a run directory (its checkpoints/latest) or a checkpoints/step_N folder")
    hf.add_argument("out_dir", help="the folder to create; must not exist")
    hf.add_argument("--drop-thinking", action="store_true",
                    help="export a model with HRPO thinking modules without them (plain-token decoding); "
                         "refused otherwise")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        model, tokenizer, _ = load_checkpoint_model(args.checkpoint)
        out = hf_io.export(model, tokenizer, args.out_dir, drop_thinking=args.drop_thinking)
    except (ValueError, FileExistsError) as error:
        print(f"llmtrain export: {error}", file=sys.stderr)
        return 2
    config = hf_io.read_config(out)
    if args.drop_thinking and getattr(model, "thinking", None) is not None:
        print("llmtrain export: warning: the HRPO thinking modules were dropped; the exported model decodes "
              "with plain token embeddings only", file=sys.stderr)
    print(f"wrote {config['architectures'][0]} to {out}")
    return 0
