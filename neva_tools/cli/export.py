"""``neva export hf-llava``: a NeVA model (or every checkpoint of a run) → Hugging Face LLaVA directories."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from neva_tools.convert.hf_to_nemo import DTYPES
from neva_tools.data.templates import TEMPLATE_NAMES
from neva_tools.mappings.llava_hf import FORMAT_CHOICES

if TYPE_CHECKING:
    from neva_tools.export.run_dir import StepResult


def add_run_options(p: argparse.ArgumentParser) -> None:
    """``--config``/``--set``: the training config describing a run's checkpoints (when it has no final .nemo)."""
    p.add_argument("--config", help="with --all-checkpoints: the recipe YAML the run was trained with (default: "
                   "the run's final .nemo describes the model)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="with --all-checkpoints: a training config override, repeatable")  # fmt: skip


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Add ``neva export hf-llava``."""
    p = sub.add_parser("export", help="export NeVA models to other formats", parents=[parent])
    esub = p.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    h = esub.add_parser(
        "hf-llava",
        parents=[parent],
        help="NeVA .nemo (any TP) → Hugging Face LLaVA / LLaVA-NeXT / LLaVA-OneVision + processor",
        description="Write a complete Hugging Face directory (CLIP or SigLIP vision tower, projector, LLM, config, "
        "tokenizer with <image>, image processor and a chat template reproducing the training template), loadable "
        "with AutoModelForImageTextToText and AutoProcessor. The class follows from the model's config: "
        "LlavaForConditionalGeneration (one view per image), LlavaNextForConditionalGeneration (image_aspect_ratio "
        "anyres, mm_patch_merge_type spatial_unpad) or LlavaOnevisionForConditionalGeneration (anyres_max_N, "
        "spatial_unpad). --all-checkpoints converts every checkpoint of a run into OUTPUT/step=N, skipping steps "
        "already converted.",
    )
    source = h.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="the NeVA .nemo (from neva train or neva import)")
    source.add_argument("--all-checkpoints", metavar="RUN_DIR", help="a training run directory (runs/NAME)")
    h.add_argument("--output", required=True, help="the directory to write (with --all-checkpoints: its parent)")
    h.add_argument("--vision", help="the CLIP/SigLIP tower (HF or open_clip directory, or name:checkpoint); "
                   "default: the tower stored in the .nemo, else mm_cfg.vision_encoder.from_pretrained")  # fmt: skip
    h.add_argument("--format", choices=FORMAT_CHOICES, default="auto", dest="hf_format",
                   help="the Hugging Face class; auto (default) picks the one the model's config calls for, another "
                   "value is refused unless it is that class")  # fmt: skip
    h.add_argument("--llm", help="the LLM .nemo of a stage-1 .nemo that does not store it (default: "
                   "mm_cfg.llm.from_pretrained)")  # fmt: skip
    h.add_argument("--template", choices=TEMPLATE_NAMES, help="conversation template (default: the training one)")
    h.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the model's precision)")
    h.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default %(default)s)")
    add_run_options(h)
    h.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    h.set_defaults(func=run_hf_llava)


def run_hf_llava(args: argparse.Namespace) -> int:
    """``neva export hf-llava``."""
    from neva_tools.errors import NevaError
    from neva_tools.export.hf_llava import export_hf_llava, write_llava
    from neva_tools.export.run_dir import convert_all

    options = {"vision": args.vision, "template": args.template, "dtype": args.dtype,
               "max_shard_size": args.max_shard_size, "overwrite": args.overwrite,
               "hf_format": args.hf_format}  # fmt: skip
    if args.input is not None:
        if args.config or args.overrides:
            raise NevaError("--config and --set describe a run's checkpoints; use them with --all-checkpoints")
        print(f"Wrote {export_hf_llava(args.input, args.output, llm=args.llm, **options)}")
        return 0
    if args.llm is not None:
        raise NevaError("--llm applies to --input; a run's checkpoints hold the LLM")
    results = convert_all(args.all_checkpoints, args.output, lambda src, out: write_llava(src, out, **options),
                          config=args.config, overrides=args.overrides, overwrite=args.overwrite)  # fmt: skip
    print_steps(results)
    return 0


def print_steps(results: list[StepResult]) -> None:
    """One line per checkpoint of an ``--all-checkpoints`` conversion."""
    for r in results:
        print(f"{r.checkpoint.name}: {'wrote' if r.converted else 'already converted, kept'} {r.output}")
