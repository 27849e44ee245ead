"""The data check ``neva train`` runs before it builds the model, and ``neva config validate`` when the files are there.

Every record of every dataset the config trains on (``model.data.data_path``: a file or registry names) is checked
as ``neva data validate`` checks it (:mod:`neva_tools.data.validate`): its structure, ``<image>`` placeholders
against its images, its image files present, and its length after image expansion against
``model.data.max_seq_length``, tokenized with the dataset's template and the image start/end tokens
(``model.mm_cfg.use_im_start_end``) and counting each image's embeddings for the real vision tower and image layout
(:func:`neva_tools.data.anyres.sample_image_tokens`, the count the training dataset uses; AnyRes reads an image's
size from its header, nothing is decoded). A bad record therefore stops the job with the per-record report before
a model is loaded, not from a DataLoader worker later.

It is cheap: no dataset object is built and no image decoded; each record is checked and only its problems, counts
and length are kept; above :data:`POOL_BYTES` of annotations a process pool shares the records. Only global rank 0
runs it in ``neva train``. ``benchmarks/data_check.py`` times it on a 100k-record dataset with image files (the
figures are in the README).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from neva_tools.data.validate import Problem, Report, Settings, format_report, validate
from neva_tools.errors import NevaError

logger = logging.getLogger(__name__)


def tokenizer_path(cfg: DictConfig) -> Path:
    """The tokenizer the job trains with: ``model.tokenizer.model``, else the one stored in the LLM ``.nemo``."""
    from neva_tools.model import neva_io

    m = cfg.model
    if m.tokenizer.model:
        return Path(m.tokenizer.model)
    return neva_io.extract_tokenizer(m.mm_cfg.llm.from_pretrained, neva_io.scratch_dir())


def data_settings(cfg: DictConfig, image_size: int, patch_size: int, tokenizer: str | Path, *,
                  decode_images: bool = False) -> list[tuple[Path, Settings]]:  # fmt: skip
    """(annotation file, settings) of each distinct dataset of ``cfg`` for a vision tower of ``image_size`` px and
    ``patch_size`` px patches, as training renders and counts its records (``decode_images``: decode every image,
    as ``neva data validate`` does by default; else only AnyRes reads image headers)."""
    from neva_tools.data.anyres import ImageLayout
    from neva_tools.data.templates import image_wrap
    from neva_tools.data.video import VideoSampling
    from neva_tools.train.run import _datasets

    m = cfg.model
    layout = ImageLayout.from_config(m.data, m.mm_cfg, image_size, patch_size)
    wrap = image_wrap(m.mm_cfg) or False
    videos = str(m.data.video_folder) if m.data.get("video_folder") else None
    jobs: dict[tuple[Path, Path | None, str], Settings] = {}
    for use in _datasets(cfg):
        spec = use.spec
        template = str(spec.template or m.data.conv_template)
        key = (Path(spec.annotation_path), spec.data_path, template)
        jobs[key] = Settings(image_folder=str(spec.data_path) if spec.data_path is not None else None,
                             tokenizer=str(tokenizer), template=template, max_seq_length=int(m.data.max_seq_length),
                             image_tokens=layout.tokens(tiled=False), decode_images=decode_images, layout=layout,
                             im_start_end=wrap, video=VideoSampling.from_config(m.data), video_folder=videos,
                             allow_outside=bool(m.data.get("allow_outside_image_folder", False)))  # fmt: skip
    return [(path, settings) for (path, _, _), settings in jobs.items()]


def check_data(cfg: DictConfig, image_size: int, patch_size: int, tokenizer: str | Path, *, workers: int = 1,
               show_progress: bool = False, decode_images: bool = False) -> Report:  # fmt: skip
    """One report over every dataset of ``cfg`` (see the module docstring)."""
    report = Report()
    for path, settings in data_settings(cfg, image_size, patch_size, tokenizer, decode_images=decode_images):
        validate([path], settings, workers=workers, report=report, show_progress=show_progress)
    return report


#: Problems ``neva data validate`` reports that training goes on with: an empty message trains as one. Every other
#: kind would stop training at its record (or, ``too_long``, would have to be cut).
TRAINABLE = ("empty_turn",)
COMMAND = "neva data validate --config CONFIG"


def blocking(report: Report) -> list[Problem]:
    """The problems of ``report`` that training cannot go on with (all but :data:`TRAINABLE`)."""
    return [p for p in report.problems if p.kind not in TRAINABLE]


def data_failure(report: Report, command: str = COMMAND) -> str:
    """The message that stops a job on invalid data: the per-record report of ``neva data validate``."""
    records = len({(p.file, p.location) for p in blocking(report)})
    return (f"the training data has {records} record(s) training cannot use, of {report.records}; it would stop at "
            f"the first of them. Fix or remove them (`{command}` lists them all):\n"
            f"{format_report(report)}")  # fmt: skip


def trainable_note(report: Report, command: str = COMMAND) -> str:
    """The note on problems training goes on with (empty turns)."""
    kinds = ", ".join(f"{n} {kind}" for kind, n in report.by_kind().items())
    return f"the training data has {kinds} (of {report.records} records); training goes on with them (`{command}`)"


#: Annotation bytes above which the check runs in a process pool (about 10k LLaVA records).
POOL_BYTES = 8_000_000


def check_workers(paths: list[Path]) -> int:
    """Processes for the check: one for small data; for more than :data:`POOL_BYTES` of annotations the CPUs this
    process may use, shared with the other ranks of its node (``LOCAL_WORLD_SIZE``), at most 8."""
    size = sum(p.stat().st_size for p in paths if p.is_file())
    if size <= POOL_BYTES:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, min(8, cpus // max(1, local)))


def precheck(cfg: DictConfig, image_size: int, patch_size: int, tokenizer: str | Path, *,
             show_progress: bool = False, workers: int | None = None) -> Report:  # fmt: skip
    """``neva train``'s data check: raises ``NevaError`` with the per-record report when a record is invalid, else
    logs one line with the counts, the token lengths and the time it took (``workers``: processes, default
    :func:`check_workers`)."""
    start = time.perf_counter()
    if workers is None:
        workers = check_workers([path for path, _ in data_settings(cfg, image_size, patch_size, tokenizer)])
    report = check_data(cfg, image_size, patch_size, tokenizer, show_progress=show_progress, workers=workers)
    seconds = time.perf_counter() - start
    if blocking(report):
        raise NevaError(data_failure(report))
    if not report.ok:
        logger.warning("%s", trainable_note(report))
    lengths = report.length_stats()
    tokens = f"; tokens p50 {lengths['p50']}, p95 {lengths['p95']}, max {lengths['max']}" if lengths else ""
    procs = f" in {workers} processes" if workers > 1 else ""
    logger.info("data check: %d records fit (%d images, %d text-only)%s, max_seq_length %d; %.1f s%s",
                report.records, report.images, report.text_only, tokens, int(cfg.model.data.max_seq_length),
                seconds, procs)  # fmt: skip
    return report


def vision_size(cfg: DictConfig) -> tuple[int, int] | None:
    """(image size, patch size) of ``model.mm_cfg.vision_encoder.from_pretrained`` from its config (no weights), or
    None when it cannot be read (the config check reports why)."""
    from neva_tools.train.vision_arch import vision_arch

    source = cfg.model.mm_cfg.vision_encoder.from_pretrained
    if source is None:
        return None
    try:
        arch: Any = vision_arch(str(source))
    except NevaError:
        return None
    return None if arch is None else (int(arch.image_size), int(arch.patch_size))


def config_data_check(cfg: DictConfig, *, offline: bool) -> tuple[Report | None, str]:
    """``neva config validate``'s data check: (the report, "") when it ran, else (None, why it could not run).

    It runs on a config whose other checks passed (its files are there); text pretraining has no records to check.
    """
    from omegaconf import OmegaConf

    if OmegaConf.select(cfg, "model.text_pretrain.enabled", default=False):
        return None, ""
    if offline:
        return None, "--offline"
    size = vision_size(cfg)
    if size is None:
        return None, "the vision encoder's config cannot be read"
    try:
        tokenizer = tokenizer_path(cfg)
    except NevaError as exc:
        return None, f"no tokenizer ({exc})"
    paths = [path for path, _ in data_settings(cfg, *size, tokenizer)]
    return check_data(cfg, *size, tokenizer, workers=check_workers(paths)), ""
