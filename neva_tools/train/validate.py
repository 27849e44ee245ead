"""``neva config validate``: everything about a training config that can be checked without GPUs.

Offline rules read no referenced file: batch sizes (and, given the processes per node, divisibility by
micro × data-parallel size), schedule, names of templates/projectors/precisions/optimizers/aspect modes, the image
start/end tokens, ``group_by_modality_length`` without packing, and the vision encoder when it is an open_clip model
name (its config ships with open_clip). ``neva train`` runs every rule before it starts; :func:`advisories` lists
valid but unusual settings (notes, not errors). With ``offline=False`` the referenced files are read too: the LLM
``.nemo`` (TP divides its heads, query groups and FFN; ``max_seq_length`` fits its ``encoder_seq_length``), the
tokenizer (it holds every template's special tokens, EOS and, with ``mm_cfg.use_im_start_end``, the two
``mm_cfg.im_start_end_tokens``; tokens beyond the LLM's vocabulary get rows of their own), the vision encoder's
config (TP divides its heads and FFN, ``vision_select_layer`` is in range, an image's tokens, with the two around it
under ``use_im_start_end``, fit ``max_seq_length``), the stage-1 projector (its sizes match both models) and the data
(annotation files and image folders exist). Every problem names the key and the values involved.
``model.text_pretrain.enabled`` configs get the text rules of ``neva_tools.train.text_validate`` instead of the
NeVA-only ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from neva_tools.config import derived
from neva_tools.data.anyres import ASPECTS, ImageLayout, parse_aspect
from neva_tools.data.template_aliases import ALIASES
from neva_tools.data.templates import TEMPLATE_NAMES, get_template, image_wrap
from neva_tools.errors import NevaError
from neva_tools.model.neva import PROJECTOR_TYPES
from neva_tools.model.recompute import recompute_settings
from neva_tools.train.run import engine_problems
from neva_tools.train.steps import step_problems


def check_config(cfg: DictConfig, *, offline: bool = True, devices: int | None = None) -> list[str]:
    """All problems found in ``cfg`` (an empty list when it is valid).

    ``devices`` is the number of processes per node (``scripts/train.sh N``); with it the global batch is
    checked against micro batch × data-parallel size, DP = ``devices × trainer.num_nodes / TP``.
    """
    from neva_tools.train import validate_files as files
    from neva_tools.train.text_validate import text_problems

    problems, devices = devices_problems(cfg, devices)
    problems += _general(cfg, devices)
    llm_path = OmegaConf.select(cfg, "model.mm_cfg.llm.from_pretrained", default=None)
    if not offline and int(cfg.model.pipeline_model_parallel_size) > 1 and llm_path and Path(llm_path).is_file():
        from neva_tools.model.neva_io import llm_config

        problems += pipeline_problems(cfg, int(llm_config(Path(llm_path))[0]["num_layers"]))
    if OmegaConf.select(cfg, "model.text_pretrain.enabled", default=False):
        problems += text_problems(cfg, offline=offline)
        llm = cfg.model.mm_cfg.llm.from_pretrained
        if not offline and llm is not None and Path(llm).is_file():  # text_problems reports a missing one
            problems += files.llm_problems(cfg, templates=[], neva=False)
        return problems
    problems += _neva(cfg)
    arch = None
    source = cfg.model.mm_cfg.vision_encoder.from_pretrained
    if offline and source is not None and not Path(str(source)).exists():
        arch, found = files.vision_arch_problems(str(source))  # an open_clip name: its config ships with open_clip
        problems += found
    if not offline:
        arch, found = files.vision_problems(cfg)
        uses, found_data = files.data_problems(cfg)
        problems += found + found_data + files.llm_problems(cfg, templates=files.templates_used(cfg, uses))
        problems += files.projector_problems(cfg, arch)
    if arch is not None:
        problems += _vision_rules(cfg, arch) + derived.vision_problems(cfg, arch)
    else:
        problems += derived.from_hf_problems(cfg)
    return problems


def devices_problems(cfg: DictConfig, devices: int | None) -> tuple[list[str], int | None]:
    """(problems, processes per node): ``trainer.devices`` (NeMo's key; null/auto/-1: the launcher's) must agree
    with ``devices`` (``--devices`` or the launcher's count) when both are known."""
    value = OmegaConf.select(cfg, "trainer.devices", default=None)
    if value is None or str(value).lower() == "auto" or value == -1:
        return [], devices
    try:
        wanted = int(value)
    except (TypeError, ValueError):
        return [f"trainer.devices ({value}) must be a number of processes per node, auto or null"], devices
    if wanted < 1:
        return [f"trainer.devices ({value}) must be a positive number of processes per node, auto or null"], devices
    if devices is not None and devices != wanted:
        return [f"trainer.devices is {wanted} but the launcher runs {devices} processes per node (scripts/train.sh "
                f"{devices} / --devices {devices}); make them agree or set trainer.devices=null"], devices  # fmt: skip
    return [], wanted


def _general(cfg: DictConfig, devices: int | None) -> list[str]:
    """Batch sizes, parallelism, precision, optimizer and schedule."""
    from neva_tools.train.fit import TrainerSettings, accumulation

    problems: list[str] = []
    m = cfg.model
    tp, pp = int(m.tensor_model_parallel_size), int(m.pipeline_model_parallel_size)
    micro, glob = int(m.micro_batch_size), int(m.global_batch_size)
    if tp < 1 or pp < 1 or micro < 1 or glob < 1:
        problems.append(f"model sizes must be positive: TP {tp}, PP {pp}, micro_batch_size {micro}, "
                        f"global_batch_size {glob}")  # fmt: skip
    elif glob % micro:
        problems.append(f"model.global_batch_size ({glob}) must be a multiple of model.micro_batch_size ({micro})")
    elif devices is not None:
        nodes = int(cfg.trainer.num_nodes)
        world = devices * nodes
        settings = TrainerSettings(max_steps=1, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                   micro_batch_size=micro, global_batch_size=glob, num_nodes=nodes)  # fmt: skip
        try:
            accumulation(settings, world)  # the engine's own rule
        except NevaError as exc:
            problems.append(f"{exc} (world size {world} = {devices} processes per node × trainer.num_nodes "
                            f"{nodes}; model.tensor_model_parallel_size {tp})")  # fmt: skip
    problems += pipeline_problems(cfg)
    problems += engine_problems(cfg)  # precision (with megatron_amp_O2), optim.name, overlap options
    sched = m.optim.sched
    problems += step_problems(cfg)  # max_steps / max_epochs, warmup_steps / warmup_ratio
    try:  # values only: the layer count is checked against the model when it is built
        recompute_settings(m, num_layers=1 << 30)
    except NevaError as exc:
        problems.append(str(exc))
    if float(sched.min_lr) > float(m.optim.lr):
        problems.append(f"model.optim.sched.min_lr ({sched.min_lr}) is larger than model.optim.lr ({m.optim.lr})")
    return problems


def pipeline_problems(cfg: DictConfig, num_layers: int | None = None) -> list[str]:
    """Pipeline settings: ``virtual_pipeline_model_parallel_size`` needs PP > 1; given the LLM's ``num_layers``
    (read from its ``.nemo`` when files are checked), PP (× virtual stages) must divide it."""
    from neva_tools.model.gpt import virtual_pipeline_size

    m = cfg.model
    pp = int(m.pipeline_model_parallel_size)
    try:
        vpp = virtual_pipeline_size({"pipeline_model_parallel_size": pp,
                                     "virtual_pipeline_model_parallel_size": OmegaConf.select(
                                         m, "virtual_pipeline_model_parallel_size", default=None)})  # fmt: skip
    except NevaError as exc:
        return [str(exc)]
    stages = pp * (vpp or 1)
    if num_layers is not None and pp > 1 and num_layers % stages:
        what = f"pipeline_model_parallel_size ({pp})" if vpp is None else f"PP × virtual stages ({pp} × {vpp})"
        return [f"model.{what} must divide the LLM's num_layers ({num_layers})"]
    return []


def _neva(cfg: DictConfig) -> list[str]:
    """Names of templates, projector and aspect mode."""
    m, problems = cfg.model, []
    name = str(m.data.conv_template)  # ${model.mm_cfg.llm.model_type} unless set
    try:
        get_template(name)  # ours or another project's name for one of ours (LLaVA's --version, NeMo's)
    except NevaError as exc:
        if "unknown conversation template" in str(exc):
            problems.append(f"model.data.conv_template ({name}) is not one of {', '.join(TEMPLATE_NAMES)} nor "
                            f"LLaVA's/NeMo's names for them ({', '.join(ALIASES)})")  # fmt: skip
        else:
            problems.append(f"model.data.conv_template: {exc}")
    mm = m.mm_cfg
    if mm.llm.freeze and mm.vision_encoder.freeze and OmegaConf.select(mm, "freeze_mm_mlp_adapter", default=False):
        problems.append("model.mm_cfg.llm.freeze, model.mm_cfg.vision_encoder.freeze and "
                        "model.mm_cfg.freeze_mm_mlp_adapter are all true: nothing would train; unfreeze the part to "
                        "train (stage 1: freeze_mm_mlp_adapter=false; stage 2: also llm.freeze=false)")  # fmt: skip
    if str(m.mm_cfg.mm_mlp_adapter_type) not in PROJECTOR_TYPES:
        problems.append(f"model.mm_cfg.mm_mlp_adapter_type ({m.mm_cfg.mm_mlp_adapter_type}) is not one of "
                        f"{', '.join(PROJECTOR_TYPES)}")  # fmt: skip
    try:
        parse_aspect(str(m.data.image_aspect_ratio))
    except NevaError:
        problems.append(f"model.data.image_aspect_ratio ({m.data.image_aspect_ratio}) is not one of "
                        f"{', '.join(ASPECTS)} (N: a positive integer)")  # fmt: skip
    else:
        problems += _layout(m, 1, 1)[1]  # pinpoints' form, merge type, their combination (sizes: _vision_rules)
    try:
        from neva_tools.data.video import VideoSampling

        VideoSampling.from_config(m.data)  # frame bounds, frames_upbound against video_max_frames, pixel limits
    except NevaError as exc:
        problems.append(str(exc))
    if OmegaConf.select(m, "data.group_by_modality_length", default=False) and m.data.packing:
        problems.append("model.data.group_by_modality_length and model.data.packing are both true: a packed row "
                        "already mixes image and text-only samples, so batches cannot hold one modality; set one of "
                        "them to false")  # fmt: skip
    try:
        image_wrap(mm)  # im_start_end_tokens: two distinct tokens
    except NevaError as exc:
        problems.append(str(exc))
    return problems


def advisories(cfg: DictConfig) -> list[str]:
    """Settings that are valid but usually a mistake (``neva config validate`` prints them as notes)."""
    m, notes = cfg.model, []
    if OmegaConf.select(cfg, "model.text_pretrain.enabled", default=False):
        return notes
    if not m.mm_cfg.llm.freeze and m.mm_cfg.pretrain_mm_mlp_adapter is None:
        notes.append("stage 2 (model.mm_cfg.llm.freeze: false) without model.mm_cfg.pretrain_mm_mlp_adapter: "
                     "the projector starts from scratch (single-stage training); for LLaVA's stage 2 point it at "
                     "the stage-1 .nemo")  # fmt: skip
    return notes


def _layout(m: DictConfig, image_size: int, patch_size: int) -> tuple[ImageLayout | None, list[str]]:
    """The AnyRes / patch-merge layout of ``model`` for an encoder's sizes, or None and the problem."""
    try:
        return ImageLayout.from_config(m.data, m.mm_cfg, image_size, patch_size), []
    except NevaError as exc:
        return None, [str(exc)]


def _vision_rules(cfg: DictConfig, arch: Any) -> list[str]:
    """TP divides the vision heads and FFN; the selected layer exists; an image fits the sequence (with AnyRes: the
    largest an image can become, :meth:`neva_tools.data.anyres.ImageLayout.max_tokens`)."""
    from neva_tools.checkpoint import tp as tp_rules

    m, problems = cfg.model, []
    tp = int(m.tensor_model_parallel_size)
    try:
        tp_rules.check_divisible(tp, **{"the vision num_attention_heads": arch.num_heads,
                                        "the vision ffn_hidden_size": arch.ffn_hidden_size})  # fmt: skip
    except NevaError as exc:
        problems.append(str(exc))
    select = int(m.mm_cfg.vision_encoder.vision_select_layer)
    try:
        arch.kept_layers(select)
    except NevaError as exc:
        problems.append(f"model.mm_cfg.vision_encoder.vision_select_layer: {exc}")
    seq = int(m.data.max_seq_length)
    wrapped = 2 if OmegaConf.select(m, "mm_cfg.use_im_start_end", default=False) else 0  # <extra_id_4/5> around it
    layout, found = _layout(m, arch.image_size, arch.patch_size)
    if not _layout(m, 1, 1)[1]:  # else _neva reported it already
        problems += found
    most = arch.num_patches if layout is None else layout.max_tokens()
    extra = " + 2 (model.mm_cfg.use_im_start_end)" if wrapped else ""
    if most + wrapped >= seq and most == arch.num_patches:
        problems.append(f"an image becomes {arch.num_patches + wrapped} tokens ((image_size {arch.image_size} / patch "
                        f"{arch.patch_size})²{extra}), not less than model.data.max_seq_length ({seq})")  # fmt: skip
    elif most + wrapped >= seq and layout is not None:
        largest = max(layout.pinpoints, key=lambda p: p[0] * p[1], default=None) if layout.tiled else None
        canvas = f", canvases up to {list(largest)} px" if largest else ""
        problems.append(f"an image can become {most + wrapped} tokens (model.data.image_aspect_ratio {layout.aspect}"
                        f"{canvas}, model.mm_cfg.mm_patch_merge_type {layout.merge}{extra}), not less than "
                        f"model.data.max_seq_length ({seq}); raise max_seq_length, use smaller pinpoints or "
                        "anyres_max_N (shrinks large grids with spatial_unpad)")  # fmt: skip
    return problems
