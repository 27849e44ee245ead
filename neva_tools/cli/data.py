"""``neva data``: validate LLaVA datasets, plan packing, preprocess text to mmap, count tokens, plan mixtures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neva_tools.cli.common import positive_int
from neva_tools.data.megatron_flags import add_preprocess_flags
from neva_tools.data.mixture import FORMAT_HELP
from neva_tools.errors import NevaError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from neva_tools.data.anyres import ImageLayout
    from neva_tools.data.mmap import PreprocessSummary, TokenCount
    from neva_tools.data.validate import Report


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Add ``neva data`` and its actions."""
    p = sub.add_parser("data", help="validate, pack and preprocess training data", parents=[parent])
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    val = dsub.add_parser("validate", parents=[parent], help="check every record of a LLaVA JSON/JSONL dataset",
                          description="Report every problem with file, line/index, record id, what is wrong and "
                          "what was found. Exit status 1 when any record is invalid. With --config and no files: "
                          "the datasets the training config trains on, checked as neva train checks them before it "
                          "builds the model (its templates, tokenizer, max_seq_length, vision tower and image "
                          "layout; the flags override them).")  # fmt: skip
    val.add_argument("annotations", nargs="*", help="LLaVA JSON (list) or JSONL files (none with --config: the "
                     "datasets it trains on)")  # fmt: skip
    val.add_argument("--image-folder", help="folder that relative image/video paths resolve against")
    _tokenization_args(val, required=False)
    val.add_argument("--workers", type=positive_int, default=1, help="processes for image decoding/tokenization")
    val.add_argument("--no-decode", action="store_true", help="check that images exist without decoding them")
    val.add_argument("--allow-outside", action="store_true",
                     help="accept image paths outside --image-folder (absolute, or with ..); without a folder any "
                     "path is accepted")  # fmt: skip
    val.add_argument("--json", action="store_true", help="print the full report as JSON")
    _video_args(val)
    val.set_defaults(func=run_validate)

    pack = dsub.add_parser("pack", parents=[parent], help="plan sequence packing (first-fit-decreasing) of a dataset")
    pack.add_argument("annotations", help="LLaVA JSON or JSONL file")
    pack.add_argument("--image-folder", help="folder that relative image paths resolve against")
    _tokenization_args(pack, required=True)
    pack.add_argument("--truncate", action="store_true", help="truncate text-only samples longer than a bin")
    pack.add_argument("--output", help="write the plan (bins of record indices) as JSON here")
    pack.add_argument("--overwrite", action="store_true", help="replace an existing --output plan")
    pack.set_defaults(func=run_pack)

    pre = dsub.add_parser("preprocess", parents=[parent], help="tokenize a JSONL text corpus into megatron mmap files",
                          description="Tokenize loose JSONL (one document per line) into Megatron's mmap "
                          ".bin/.idx pair. Megatron-LM's tools/preprocess_data.py flags are accepted too "
                          "(--tokenizer-type/--tokenizer-model, --json-keys, ...); scripts/preprocess_data.py takes "
                          "the same command line as that tool.")  # fmt: skip
    add_preprocess_flags(pre, dropin=False)
    pre.set_defaults(func=run_preprocess)

    cnt = dsub.add_parser("count-tokens", parents=[parent], help="documents and tokens of a megatron mmap dataset")
    cnt.add_argument("prefix", nargs="?", help="path prefix of the .bin/.idx pair (e.g. corpus_text_document)")
    cnt.add_argument("--mmap_path", "--mmap-path", dest="mmap_path",
                     help="the prefix or its .bin, as NEO's count_mmap_token.py takes it")  # fmt: skip
    cnt.set_defaults(func=run_count_tokens)

    mix = dsub.add_parser("mixture", parents=[parent], help="DATA_PATH blend and TRAIN_ITERS from a mixture YAML",
                          description=FORMAT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    mix.add_argument("config", help="the mixture YAML (format above)")
    mix.add_argument("--json", action="store_true", help="print the plan as JSON")
    mix.set_defaults(func=run_mixture)


def _tokenization_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--tokenizer", required=required, help="sentencepiece .model or HF tokenizer directory")
    p.add_argument("--template", required=required, help="conversation template (plain, vicuna_v1, llama_2, …)")
    p.add_argument("--max-seq-length", type=positive_int, required=required, help="tokens after image expansion")
    p.add_argument("--image-tokens", type=positive_int, help="embeddings per image (default: from image/patch size)")
    p.add_argument("--image-size", type=positive_int,
                   help="vision encoder input size (default: --config's or --vision's tower, else 336)")  # fmt: skip
    p.add_argument("--patch-size", type=positive_int,
                   help="vision encoder patch size (default: --config's or --vision's tower, else 14)")  # fmt: skip
    p.add_argument("--image-aspect-ratio",
                   help="model.data.image_aspect_ratio: pad, square, anyres or anyres_max_N (default: --config's, "
                   "else pad)")  # fmt: skip
    p.add_argument("--image-grid-pinpoints",
                   help="model.data.image_grid_pinpoints for anyres: \"(1x1),...,(3x3)\" or \"[[336,672],...]\" "
                   "([height, width] px; default: --config's)")  # fmt: skip
    p.add_argument("--mm-patch-merge-type",
                   help="model.mm_cfg.mm_patch_merge_type: flat, spatial or spatial_unpad (default: --config's, else "
                   "flat)")  # fmt: skip
    tower = p.add_mutually_exclusive_group()
    tower.add_argument("--config", metavar="RECIPE",
                       help="a training config (recipe YAML over conf/neva_config.yaml): the vision tower's image and "
                       "patch size (model.mm_cfg.vision_encoder.from_pretrained's config, no weights read), the image "
                       "layout keys and use_im_start_end as training uses them")  # fmt: skip
    tower.add_argument("--vision", metavar="ENCODER",
                       help="the vision encoder (CLIP/SigLIP directory or open_clip NAME:CHECKPOINT): its image and "
                       "patch size")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="config_overrides",
                   help="an override of --config's keys, as neva train takes them (repeatable)")  # fmt: skip


def _training_config(args: argparse.Namespace) -> DictConfig | None:
    """The training config of ``--config`` (with ``--set`` overrides), or None."""
    if args.config is None:
        if args.config_overrides:
            raise NevaError("--set overrides the keys of --config; give --config RECIPE too")
        return None
    from neva_tools.config.load import load_config

    return load_config(args.config, args.config_overrides)


def _tower_and_layout(args: argparse.Namespace, cfg: DictConfig | None) -> None:
    """Fill ``args.image_size``/``patch_size`` and the layout flags not given: from ``--vision``'s or ``--config``'s
    vision tower (its config, no weights) and ``--config``'s layout keys, else 336 px / patch 14, pad, flat."""
    source, where = args.vision, f"--vision {args.vision}"
    if cfg is not None:
        source = cfg.model.mm_cfg.vision_encoder.from_pretrained
        where = f"--config {args.config} (model.mm_cfg.vision_encoder.from_pretrained {source})"
        if source is None and (args.image_size is None or args.patch_size is None):
            raise NevaError(f"--config {args.config} sets no model.mm_cfg.vision_encoder.from_pretrained, so the "
                            "vision tower's size is unknown; set it (--set) or give --image-size and "
                            "--patch-size")  # fmt: skip
    if source is not None and (args.image_size is None or args.patch_size is None):
        from neva_tools.train.vision_arch import vision_arch

        try:
            arch = vision_arch(str(source))
        except NevaError as exc:
            raise NevaError(f"{where}: {exc}") from None
        if arch is None:
            raise NevaError(f"{where} is not a local vision encoder (a CLIP/SigLIP directory with config.json or "
                            "open_clip_config.json) nor an open_clip NAME:CHECKPOINT")  # fmt: skip
        args.image_size = args.image_size or arch.image_size
        args.patch_size = args.patch_size or arch.patch_size
    args.image_size, args.patch_size = args.image_size or 336, args.patch_size or 14
    import yaml
    from omegaconf import OmegaConf

    data, mm = (cfg.model.data, cfg.model.mm_cfg) if cfg is not None else ({}, {})
    args.image_aspect_ratio = args.image_aspect_ratio or data.get("image_aspect_ratio") or "pad"
    pinpoints = args.image_grid_pinpoints
    if isinstance(pinpoints, str) and pinpoints.strip().startswith("[["):
        args.image_grid_pinpoints = yaml.safe_load(pinpoints)  # [height, width] pairs; "(1x1),...": as given
    elif pinpoints is None and data.get("image_grid_pinpoints") is not None:
        pinpoints = data.get("image_grid_pinpoints")
        args.image_grid_pinpoints = pinpoints if isinstance(pinpoints, str) else OmegaConf.to_container(pinpoints)
    args.mm_patch_merge_type = args.mm_patch_merge_type or mm.get("mm_patch_merge_type") or "flat"


def _image_tokens(args: argparse.Namespace) -> int:
    from neva_tools.data.images import image_token_count

    return args.image_tokens or image_token_count(args.image_size, args.patch_size)


def _layout(args: argparse.Namespace) -> ImageLayout | None:
    """The image layout the flags describe (each image's embeddings as training counts them); None with
    ``--image-tokens`` (a fixed count per image)."""
    import yaml

    from neva_tools.data.anyres import ImageLayout

    pinpoints = args.image_grid_pinpoints
    if isinstance(pinpoints, str) and pinpoints.strip().startswith("[["):
        pinpoints = yaml.safe_load(pinpoints)
    data = {"image_aspect_ratio": args.image_aspect_ratio, "image_grid_pinpoints": pinpoints}
    layout = ImageLayout.from_config(data, {"mm_patch_merge_type": args.mm_patch_merge_type}, args.image_size,
                                     args.patch_size)  # fmt: skip
    plain = not layout.tiled and layout.merge == "flat"
    if args.image_tokens and not plain:
        raise NevaError(f"--image-tokens fixes every image's embeddings; --image-aspect-ratio {layout.aspect} with "
                        f"--mm-patch-merge-type {layout.merge} counts them per image: drop --image-tokens")  # fmt: skip
    return None if args.image_tokens else layout


def _video_args(p: argparse.ArgumentParser) -> None:
    """The frame sampling of video records (``model.data``'s video keys; defaults: the config's, else Qwen-VL's)."""
    p.add_argument("--video-folder", help="folder that relative video paths resolve against (default: --image-folder)")
    p.add_argument("--base-interval", type=float, help="seconds between sampled frames (default 2)")
    p.add_argument("--video-min-frames", type=positive_int, help="fewest frames; shorter clips are invalid (default 4)")
    p.add_argument("--video-max-frames", "--frames-upbound", type=positive_int, dest="video_max_frames",
                   help="most frames, spread uniformly over longer clips (default 8)")  # fmt: skip


def _video_sampling(args: argparse.Namespace, cfg: DictConfig | None) -> Any:
    """The ``VideoSampling`` of the config's ``model.data`` with the flags given."""
    from neva_tools.data.video import VideoSampling

    data = dict(cfg.model.data) if cfg is not None else {}
    flags = {"base_interval": args.base_interval, "video_min_frames": args.video_min_frames,
             "video_max_frames": args.video_max_frames}  # fmt: skip
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.video_max_frames is not None:
        data["frames_upbound"] = 0  # the flag names the one value
    return VideoSampling.from_config(data)


def run_validate(args: argparse.Namespace) -> int:
    """``neva data validate``."""
    from neva_tools.data.templates import image_wrap
    from neva_tools.data.validate import Settings, format_report, validate

    cfg = _training_config(args)
    _tower_and_layout(args, cfg)
    if not args.annotations:
        if cfg is None:
            raise NevaError("give the annotation files to check, or --config RECIPE to check the datasets it trains on")
        report = _validate_training_data(args, cfg)
    else:
        settings = Settings(
            image_folder=args.image_folder,
            tokenizer=args.tokenizer,
            template=args.template,
            max_seq_length=args.max_seq_length,
            image_tokens=_image_tokens(args),
            decode_images=not args.no_decode,
            layout=_layout(args),
            allow_outside=args.allow_outside,
            im_start_end=(image_wrap(cfg.model.mm_cfg) or False) if cfg is not None else False,
            video=_video_sampling(args, cfg),
            video_folder=args.video_folder,
        )
        report = validate(args.annotations, settings, workers=args.workers)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0 if report.ok else 1


def _validate_training_data(args: argparse.Namespace, cfg: DictConfig) -> Report:
    """The datasets of ``cfg`` checked as ``neva train`` checks them, the flags given overriding the config's keys."""
    from omegaconf import OmegaConf

    from neva_tools.train.data_check import check_data, tokenizer_path

    if args.image_tokens:
        raise NevaError("--image-tokens does not go with --config: the vision tower and the image layout give each "
                        "image's count")  # fmt: skip
    m = cfg.model
    flags = {"data.image_folder": args.image_folder, "data.conv_template": args.template,
             "data.max_seq_length": args.max_seq_length, "data.image_aspect_ratio": args.image_aspect_ratio,
             "data.image_grid_pinpoints": args.image_grid_pinpoints,
             "mm_cfg.mm_patch_merge_type": args.mm_patch_merge_type, "data.video_folder": args.video_folder,
             "data.base_interval": args.base_interval, "data.video_min_frames": args.video_min_frames,
             "data.video_max_frames": args.video_max_frames}  # fmt: skip
    if args.video_max_frames is not None:
        flags["data.frames_upbound"] = 0  # the flag names the one value
    if args.allow_outside:
        flags["data.allow_outside_image_folder"] = True
    for key, value in flags.items():
        if value is not None:
            OmegaConf.update(m, key, value)
    _layout(args)  # the layout keys' problems, named as flags
    tokenizer = args.tokenizer
    if tokenizer is None:
        llm = m.mm_cfg.llm.from_pretrained
        if not m.tokenizer.model and (llm is None or not Path(llm).is_file()):
            raise NevaError(f"--config {args.config} has no tokenizer to count tokens with: model.tokenizer.model is "
                            f"not set and model.mm_cfg.llm.from_pretrained ({llm}) is no file; give "
                            "--tokenizer")  # fmt: skip
        tokenizer = tokenizer_path(cfg)
    return check_data(cfg, args.image_size, args.patch_size, tokenizer, workers=args.workers, show_progress=True,
                      decode_images=not args.no_decode)  # fmt: skip


def run_pack(args: argparse.Namespace) -> int:
    """``neva data pack``."""
    from neva_tools.data.dataset import NevaDataset
    from neva_tools.data.images import ImageProcessor
    from neva_tools.data.packing import first_fit_decreasing
    from neva_tools.data.registry import DatasetSpec, DatasetUse
    from neva_tools.data.templates import image_wrap
    from neva_tools.utils.atomic import PACK_PLAN, atomic_path, check_output_path
    from neva_tools.utils.log import progress

    if args.output:
        check_output_path(Path(args.output), args.overwrite, PACK_PLAN)
    cfg = _training_config(args)
    _tower_and_layout(args, cfg)
    folder = Path(args.image_folder) if args.image_folder else None
    use = DatasetUse(DatasetSpec("dataset", Path(args.annotations), folder, args.template))
    layout = _layout(args)
    aspect = layout.aspect if layout is not None else "pad"
    wrap = (image_wrap(cfg.model.mm_cfg) or False) if cfg is not None else False
    ds = NevaDataset([use], args.tokenizer, ImageProcessor(args.image_size, aspect, layout=layout),
                     image_tokens=_image_tokens(args), im_start_end=wrap)  # fmt: skip
    lengths = [ds.length(i) for i in progress(range(len(ds)), desc="tokenize", unit="record")]
    names = [item.record.where() for item in ds.items]
    plan = first_fit_decreasing(lengths, args.max_seq_length, truncate=args.truncate, names=names)
    truncated = f", {len(plan.truncated)} truncated" if plan.truncated else ""
    print(f"{len(lengths)} samples, {sum(lengths)} tokens → {len(plan.bins)} sequences of {args.max_seq_length}: "
          f"fill ratio {plan.fill_ratio:.4f}{truncated}")  # fmt: skip
    if args.output:
        out = {"max_seq_length": args.max_seq_length, "fill_ratio": plan.fill_ratio, "bins": plan.bins,
               "truncated": plan.truncated}  # fmt: skip
        with atomic_path(args.output, kind=PACK_PLAN, overwrite=args.overwrite) as tmp:
            tmp.write_text(json.dumps(out) + "\n")
        print(f"Wrote the packing plan to {args.output}")
    return 0


def run_preprocess(args: argparse.Namespace) -> int:
    """``neva data preprocess``."""
    from neva_tools.data.megatron_flags import preprocess_job, run_preprocess_job

    for summary in run_preprocess_job(preprocess_job(args), overwrite=args.overwrite):
        print(preprocess_line(summary))
    return 0


def preprocess_line(summary: PreprocessSummary) -> str:
    """The one-line report of a ``preprocess_jsonl`` run."""
    return (f"Wrote {summary.bin_path} and {summary.idx_path}: {summary.documents:,} documents, {summary.tokens:,} "
            f"tokens ({summary.dtype}) in {summary.seconds:.1f} s")  # fmt: skip


def count_prefix(prefix: str | None, mmap_path: str | None) -> str:
    """The dataset prefix from the positional argument or ``--mmap_path`` (exactly one of them)."""
    if (prefix is None) == (mmap_path is None):
        found = f"both {prefix} and --mmap_path {mmap_path}" if prefix else "neither"
        raise NevaError(f"give the dataset prefix either as an argument or as --mmap_path, found {found}")
    return prefix if prefix is not None else mmap_path


def count_line(count: TokenCount) -> str:
    """The one-line report of ``count_tokens``."""
    return f"{count.prefix}: {count.documents:,} documents, {count.sequences:,} sequences, {count.tokens:,} tokens"


def run_count_tokens(args: argparse.Namespace) -> int:
    """``neva data count-tokens``."""
    from neva_tools.data.mmap import count_tokens

    print(count_line(count_tokens(count_prefix(args.prefix, args.mmap_path))))
    return 0


def run_mixture(args: argparse.Namespace) -> int:
    """``neva data mixture``."""
    from neva_tools.data.mixture import format_plan, plan_mixture, plan_to_dict

    plan = plan_mixture(args.config)
    print(json.dumps(plan_to_dict(plan), indent=2) if args.json else format_plan(plan))
    return 0
