"""``neva convert``: Hugging Face ↔ ``.nemo`` for LLaMA-style LLMs."""

from __future__ import annotations

import argparse
import json

from neva_tools.cli.common import positive_int
from neva_tools.cli.export import add_run_options, print_steps
from neva_tools.convert.hf_to_nemo import DTYPES, ConvertSummary, convert_hf_to_nemo
from neva_tools.convert.nemo_to_hf import convert_nemo_to_hf
from neva_tools.errors import NevaError
from neva_tools.tokenizer.vocab import DEFAULT_DIVISIBLE_BY
from neva_tools.utils.resources import human_bytes


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Add ``neva convert hf-to-nemo`` and ``neva convert nemo-to-hf``."""
    p = sub.add_parser("convert", help="convert LLM checkpoints between Hugging Face and .nemo", parents=[parent])
    csub = p.add_subparsers(dest="convert_command", required=True, metavar="DIRECTION")

    h2n = csub.add_parser(
        "hf-to-nemo",
        parents=[parent],
        help="Hugging Face LLaMA/Mistral/Qwen2 → .nemo (megatron-core names), streaming",
        description="Convert a Hugging Face LLaMA-2/3/3.1, Vicuna, Mistral or Qwen2/2.5 checkpoint to a NeMo-1 "
        ".nemo with megatron-core parameter names, one tensor at a time. No YAML edits needed.",
    )
    h2n.add_argument("--input", required=True, help="HF model directory or hub repo id (honours HF_HUB_OFFLINE)")
    h2n.add_argument("--output", required=True, help="the .nemo file to write")
    h2n.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the checkpoint's torch_dtype)")
    h2n.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size to split for (default 1)")
    h2n.add_argument("--format", choices=("legacy", "dist"), default="legacy", dest="fmt",
                     help="legacy: model_weights.ckpt per rank; dist: torch_dist model_weights/")  # fmt: skip
    h2n.add_argument("--revision", help="hub revision (branch, tag or commit) when --input is a repo id")
    h2n.add_argument("--divisible-by", type=positive_int, default=DEFAULT_DIVISIBLE_BY,
                     help="make_vocab_size_divisible_by (default %(default)s)")  # fmt: skip
    h2n.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    h2n.add_argument("--json", action="store_true", help="print the summary as JSON")
    h2n.set_defaults(func=run_hf_to_nemo)

    n2h = csub.add_parser(
        "nemo-to-hf",
        parents=[parent],
        help=".nemo (any TP, legacy or dist) → Hugging Face safetensors + config + tokenizer",
    )
    source = n2h.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="the .nemo file (or extracted directory)")
    source.add_argument("--all-checkpoints", metavar="RUN_DIR",
                        help="convert the LLM of every checkpoint of a training run (NeVA or text pretraining) into "
                        "OUTPUT/step=N, skipping steps already converted")  # fmt: skip
    n2h.add_argument("--output", required=True, help="the Hugging Face directory to write")
    n2h.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the .nemo's precision)")
    n2h.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default %(default)s)")
    add_run_options(n2h)
    n2h.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    n2h.add_argument("--json", action="store_true", help="print the summary as JSON")
    n2h.set_defaults(func=run_nemo_to_hf)


def print_summary(summary: ConvertSummary, as_json: bool) -> None:
    """One summary block (or JSON) at the end of a conversion."""
    if as_json:
        print(json.dumps({k: str(v) if k == "output" else v for k, v in summary.__dict__.items()}))
        return
    print(
        f"Wrote {summary.output}: {summary.parameters:,} parameters, {human_bytes(summary.bytes_written)} "
        f"in {summary.seconds:.1f} s (read {human_bytes(summary.bytes_read)}, peak RSS {human_bytes(summary.peak_rss)})"
    )


def run_hf_to_nemo(args: argparse.Namespace) -> int:
    """``neva convert hf-to-nemo``."""
    summary = convert_hf_to_nemo(
        args.input,
        args.output,
        dtype=args.dtype,
        tp=args.tp,
        fmt=args.fmt,
        revision=args.revision,
        overwrite=args.overwrite,
        divisible_by=args.divisible_by,
    )
    print_summary(summary, args.json)
    return 0


def run_nemo_to_hf(args: argparse.Namespace) -> int:
    """``neva convert nemo-to-hf``."""
    if args.all_checkpoints is not None:
        from neva_tools.export.run_dir import convert_all, write_llm

        options = {"dtype": args.dtype, "max_shard_size": args.max_shard_size, "overwrite": args.overwrite}
        results = convert_all(args.all_checkpoints, args.output, lambda src, out: write_llm(src, out, **options),
                              config=args.config, overrides=args.overrides, overwrite=args.overwrite)  # fmt: skip
        print_steps(results)
        return 0
    if args.config or args.overrides:
        raise NevaError("--config and --set describe a run's checkpoints; use them with --all-checkpoints")
    summary = convert_nemo_to_hf(
        args.input, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite
    )
    print_summary(summary, args.json)
    return 0
