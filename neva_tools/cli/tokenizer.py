"""``neva tokenizer``: add special tokens, inspect, train a sentencepiece model."""

from __future__ import annotations

import argparse
import json

from neva_tools.cli.common import positive_int
from neva_tools.tokenizer.add_tokens import AddTokensReport, add_tokens
from neva_tools.tokenizer.inspect import inspect_tokenizer
from neva_tools.tokenizer.tokens import ADDABLE_TYPES, PRESETS, resolve_tokens
from neva_tools.tokenizer.train import read_lines, train_sentencepiece
from neva_tools.tokenizer.vocab import DEFAULT_DIVISIBLE_BY, padded_vocab_size


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Add ``neva tokenizer`` and its subcommands."""
    p = sub.add_parser("tokenizer", help="add special tokens to, inspect or train a tokenizer", parents=[parent])
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")

    add = tsub.add_parser(
        "add-tokens",
        parents=[parent],
        help="append special tokens to a sentencepiece model or a Hugging Face tokenizer",
        description="Append tokens at the end of the vocabulary (score 0.0), leaving every existing piece and "
        "spec untouched (NeMo's add_special_tokens_to_sentencepiece.py semantics, no protoc needed).",
    )
    add.add_argument("--input", required=True, help="tokenizer.model file, or a Hugging Face tokenizer directory")
    add.add_argument("--output", required=True, help="where to write the extended tokenizer")
    add.add_argument("--tokens", nargs="+", default=[], metavar="TOKEN", help="tokens to add, in order")
    add.add_argument("--preset", choices=sorted(PRESETS), help="add a preset token list (neva: <extra_id_0>..7)")
    add.add_argument(
        "--type",
        choices=ADDABLE_TYPES,
        default="user_defined",
        help="user_defined: matched inside text (default); control: only by id (sentencepiece only)",
    )
    add.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size for the padded vocab size")
    add.add_argument(
        "--divisible-by",
        type=positive_int,
        default=DEFAULT_DIVISIBLE_BY,
        help="make_vocab_size_divisible_by (default %(default)s)",
    )
    add.add_argument("--in-place", action="store_true", help="allow --output to be the same as --input")
    add.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    add.set_defaults(func=run_add_tokens)

    ins = tsub.add_parser("inspect", parents=[parent], help="vocabulary, special pieces and a sample encoding")
    ins.add_argument("path", help="tokenizer.model file or Hugging Face tokenizer directory")
    ins.add_argument("--text", help="sample text to encode (default: the added tokens and a short dialogue)")
    ins.add_argument("--json", action="store_true", help="print the summary as JSON")
    ins.set_defaults(func=run_inspect)

    tr = tsub.add_parser("train", parents=[parent], help="train a LLaMA-style sentencepiece model on text files")
    tr.add_argument("--input", nargs="+", required=True, help="text files, one sentence per line")
    tr.add_argument("--output", required=True, help="the .model file to write")
    tr.add_argument("--vocab-size", type=positive_int, required=True)
    tr.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    tr.set_defaults(func=run_train)


def report_lines(report: AddTokensReport, tp: int = 1, divisible_by: int = DEFAULT_DIVISIBLE_BY) -> list[str]:
    """The human-readable result of ``add_tokens``, one line per token then sizes and the output path."""
    lines = []
    for r in report.results:
        if r.created:
            lines.append(f"Created token '{r.token}' at ID {r.id}")
        else:
            lines.append(f"Token '{r.token}' already present at ID {r.id}; left as it is")
    if not report.created:
        lines.append("Nothing to add: every token is already present with the requested type")
    lines.append(f"New tokenizer vocab size: {report.vocab_size}")
    padded = padded_vocab_size(report.vocab_size, tp, divisible_by)
    lines.append(f"Padded vocab size for TP={tp} (multiple of {divisible_by}x{tp}): {padded}")
    lines.append(f"Created new tokenizer at: {report.output}")
    return lines


def run_add_tokens(args: argparse.Namespace) -> int:
    """``neva tokenizer add-tokens``."""
    tokens = resolve_tokens(args.tokens, args.preset)
    report = add_tokens(args.input, args.output, tokens, args.type, in_place=args.in_place, overwrite=args.overwrite)
    print("\n".join(report_lines(report, args.tp, args.divisible_by)))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """``neva tokenizer inspect``."""
    info = inspect_tokenizer(args.path, args.text)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    print(f"{info['kind']} tokenizer at {info['path']}")
    print(f"vocab size: {info['vocab_size']}")
    if "counts" in info:
        print("pieces by type: " + ", ".join(f"{k}={v}" for k, v in info["counts"].items()))
    print("special ids: " + ", ".join(f"{k}={v}" for k, v in info["special_ids"].items()))
    for key in ("control", "user_defined", "added_tokens"):
        if info.get(key):
            print(f"{key}: " + ", ".join(f"{e['piece']}={e['id']}" for e in info[key]))
    sample = info["sample"]
    print(f"sample: {sample['text']!r}")
    print("  ids:    " + " ".join(map(str, sample["ids"])))
    print("  pieces: " + " ".join(sample["pieces"]))
    return 0


def run_train(args: argparse.Namespace) -> int:
    """``neva tokenizer train``."""
    path = train_sentencepiece(
        read_lines(args.input), args.output, args.vocab_size, model_type=args.model_type, overwrite=args.overwrite
    )
    print(f"Trained sentencepiece model at: {path}")
    return 0
