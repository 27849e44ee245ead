"""``neva import hf-llava``: a Hugging Face LLaVA directory → a NeVA ``.nemo`` to finetune (command ``import``)."""

from __future__ import annotations

import argparse

from neva_tools.cli.common import positive_int
from neva_tools.convert.hf_to_nemo import DTYPES
from neva_tools.data.templates import TEMPLATE_NAMES
from neva_tools.tokenizer.vocab import DEFAULT_DIVISIBLE_BY


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Add ``neva import hf-llava``."""
    p = sub.add_parser("import", help="import models from other formats as NeVA .nemo files", parents=[parent])
    isub = p.add_subparsers(dest="import_command", required=True, metavar="FORMAT")
    h = isub.add_parser(
        "hf-llava",
        parents=[parent],
        help="Hugging Face LLaVA / LLaVA-NeXT / LLaVA-OneVision (llava-hf, lmms-lab, neva export) → NeVA .nemo",
        description="Convert a llava-hf directory (LlavaForConditionalGeneration, e.g. LLaVA-1.5 7B/13B; "
        "LlavaNextForConditionalGeneration, e.g. LLaVA-1.6; LlavaOnevisionForConditionalGeneration; LLaMA/Mistral/"
        "Qwen2 with a CLIP or SigLIP tower) to a NeVA .nemo holding the LLM (split for --tp), the projector (with "
        "image_newline), the vision tower and the AnyRes settings (image_aspect_ratio, image_grid_pinpoints, "
        "mm_patch_merge_type), ready for neva train (model.mm_cfg.llm.from_pretrained and "
        "model.mm_cfg.pretrain_mm_mlp_adapter), neva generate and neva export.",
    )
    h.add_argument("--input", required=True, help="the llava-hf directory or hub repo id (honours HF_HUB_OFFLINE)")
    h.add_argument("--output", required=True, help="the .nemo file to write")
    h.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size to split for (default 1)")
    h.add_argument("--template", choices=TEMPLATE_NAMES, help="conversation template (default: the one recorded "
                   "by neva export, else chatml for Qwen2, mistral for Mistral, vicuna_v1 as LLaVA-1.5)")  # fmt: skip
    h.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the checkpoint's)")
    h.add_argument("--vision-dir", help="also write the vision tower as a HF CLIPVisionModel/SiglipVisionModel "
                   "directory for model.mm_cfg.vision_encoder.from_pretrained")  # fmt: skip
    h.add_argument("--divisible-by", type=positive_int, default=DEFAULT_DIVISIBLE_BY,
                   help="make_vocab_size_divisible_by (default %(default)s)")  # fmt: skip
    h.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    h.set_defaults(func=run_hf_llava)


def run_hf_llava(args: argparse.Namespace) -> int:
    """``neva import hf-llava``."""
    from neva_tools.export.import_llava import import_hf_llava

    out = import_hf_llava(
        args.input,
        args.output,
        tp=args.tp,
        template=args.template,
        dtype=args.dtype,
        vision_dir=args.vision_dir,
        divisible_by=args.divisible_by,
        overwrite=args.overwrite,
    )
    print(f"Wrote {out}")
    return 0
