"""``neva train``: pretraining (stage 1) and finetuning (stage 2) of a NeVA model from a config.

Wiring only: the LLM ``.nemo`` (any TP/layout), a CLIP vision encoder (open_clip or Hugging Face,
converted on the fly), a fresh or stage-1 projector, the data (annotation file or registry names), the
Lightning engine with megatron-core's parallel groups, dist checkpoints with resume, and at the end the
run's NeVA ``.nemo`` with ``loss.png`` beside the logs.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from neva_tools.errors import NevaError
from neva_tools.model.recompute import recompute_keys
from neva_tools.train.paths import resume_checkpoint, run_directory
from neva_tools.train.text import train_text

logger = logging.getLogger(__name__)

#: NeMo's ``trainer.precision`` values and the parameter dtype the engine trains in (``megatron_optim.PRECISIONS``).
#: Every 16-bit value trains 16-bit weights with fp32 master weights in megatron-core's optimizer (NeMo's
#: ``megatron_amp_O2``); fp16 adds dynamic loss scaling. Lightning itself always runs "32-true".
PRECISIONS = {"32": "32", "32-true": "32", "bf16": "bf16", "bf16-mixed": "bf16", "bf16-true": "bf16",
              "16": "fp16", "16-mixed": "fp16"}  # fmt: skip


def trainer_precision(value: Any, amp_o2: Any = True, *, notes: bool = True) -> str:
    """The engine precision (``32``, ``bf16``, ``fp16``) for ``trainer.precision`` and ``model.megatron_amp_O2``.

    ``bf16-true`` with ``megatron_amp_O2: false`` asks for bf16 weights without fp32 master weights, which the engine
    does not train: refused, naming what to use. Other 16-bit values with ``megatron_amp_O2: false`` (NeMo's O1) train
    with master weights anyway, with a logged note (``notes``).
    """
    key = str(value)
    if key not in PRECISIONS:
        raise NevaError(f"trainer.precision ({value}) is not one of {', '.join(PRECISIONS)}")
    precision = PRECISIONS[key]
    o2 = bool(amp_o2)
    if precision != "32" and not o2 and key == "bf16-true":
        raise NevaError(
            "trainer.precision bf16-true with model.megatron_amp_O2: false asks for bf16 weights without fp32 "
            "master weights, which this engine does not train: Adam updates below half a bf16 step (0.4% of a "
            "weight) would be lost, so at finetuning learning rates most weights would never change. Use "
            "trainer.precision=bf16 (bf16 weights with fp32 master weights; megatron_amp_O2 may stay false) or 32"
        )
    if notes and precision != "32" and not o2:
        logger.info("model.megatron_amp_O2 is false: trainer.precision %s still trains %s weights with fp32 master "
                    "weights (the engine has no O1 mode)", key, precision)  # fmt: skip
    elif notes and key == "bf16-true":
        logger.info("trainer.precision bf16-true trains bf16 weights with fp32 master weights (like bf16)")
    return precision


def engine_problems(cfg: DictConfig) -> list[str]:
    """Problems with the engine keys: precision (with megatron_amp_O2) and the optimizer's name and overlap options."""
    from neva_tools.train.megatron_optim import OPTIMIZER_NAMES

    problems = []
    try:
        trainer_precision(cfg.trainer.precision, cfg.model.megatron_amp_O2, notes=False)
    except NevaError as exc:
        problems.append(str(exc))
    o = cfg.model.optim
    name = str(o.name)
    if name not in OPTIMIZER_NAMES:
        problems.append(f"model.optim.name ({name}) is not one of {', '.join(OPTIMIZER_NAMES)}")
    elif bool(o.overlap_param_gather) and not OPTIMIZER_NAMES[name]:
        problems.append(f"model.optim.overlap_param_gather needs model.optim.name distributed_fused_adam (not {name})")
    return problems


def optim_settings(cfg: DictConfig, **parts: Any) -> Any:
    """``OptimSettings`` from ``model.optim`` (``parts``: the part learning rates of the NeVA job)."""
    from neva_tools.train.optim import OptimSettings

    o = cfg.model.optim
    return OptimSettings(lr=float(o.lr), weight_decay=float(o.weight_decay), betas=tuple(o.betas), name=str(o.name),
                         overlap_grad_reduce=bool(o.overlap_grad_reduce),
                         overlap_param_gather=bool(o.overlap_param_gather), **parts)  # fmt: skip


def llm_overrides(m: DictConfig) -> dict[str, float]:
    """The LLM config values ``model.*`` sets over the ``.nemo``'s (NeMo's dropout keys; null keeps the .nemo's)."""
    return {key: float(m[key]) for key in ("hidden_dropout", "attention_dropout") if m.get(key) is not None}


def loss_scale_settings(m: DictConfig) -> dict[str, Any]:
    """fp16's dynamic loss scaling from NeMo's keys (``TrainerSettings`` fields)."""
    return {"initial_loss_scale": float(m.native_amp_init_scale),
            "loss_scale_window": int(m.native_amp_growth_interval), "hysteresis": int(m.hysteresis)}  # fmt: skip


def processes_per_node(cfg: DictConfig) -> int:
    """The launcher's processes per node (LOCAL_WORLD_SIZE under torchrun, else world size / ``trainer.num_nodes``);
    raises ``NevaError`` when the launcher's node count is not ``trainer.num_nodes``."""
    import os

    from neva_tools.model.parallel import launch_env

    world, nodes = launch_env().world_size, int(cfg.trainer.num_nodes)
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0)
    if local and world // local != nodes:
        raise NevaError(f"trainer.num_nodes is {nodes} but the launcher runs {world} processes, {local} per node "
                        f"({world // local} nodes); set trainer.num_nodes={world // local}")  # fmt: skip
    if world % max(1, nodes):
        raise NevaError(f"trainer.num_nodes ({nodes}) does not divide the launcher's {world} processes")
    return local or max(1, world // max(1, nodes))


def _vision_source(vision: DictConfig) -> tuple[str, str | None]:
    """(source, pretrained) from ``vision_encoder.from_pretrained``: a directory, or ``name:checkpoint``."""
    source = vision.from_pretrained
    if source is None:
        raise NevaError("model.mm_cfg.vision_encoder.from_pretrained is not set (a CLIP directory or name:checkpoint)")
    if Path(source).exists() or ":" not in str(source):
        return str(source), None
    name, checkpoint = str(source).split(":", 1)
    return name, checkpoint


#: What the LLM probe of a NeVA ``.nemo`` is called (present iff the file stores the LLM).
_LLM_PROBE = "model.embedding.word_embeddings.weight"


def trained_tower(m: DictConfig, arch: Any, select: int) -> tuple[str, dict[str, Any]] | None:
    """(path, full ``CLIPViTModel`` tensors) of the trained vision tower this stage starts from, else None.

    A NeVA ``.nemo`` holding a tower (``neva_tools.checkpoint.nemo_vision``) as ``model.mm_cfg.pretrain_mm_mlp_adapter``
    (looked at first: the projector comes from it) or ``model.mm_cfg.llm.from_pretrained`` gives the tower's weights;
    ``vision_encoder.from_pretrained`` still gives the architecture (checked equal) and the image processing. A NeVA
    ``.nemo`` that trained its tower without storing it (written before towers were stored) is refused while
    ``vision_encoder.from_pretrained`` is the tower it started from; any other tower is taken as given.
    """
    from neva_tools.checkpoint import nemo_vision
    from neva_tools.checkpoint.nemo_archive import NemoArchive
    from neva_tools.checkpoint.nemo_tensors import model_config
    from neva_tools.model.projector_io import is_llava_file

    given = m.mm_cfg.vision_encoder.from_pretrained
    for key in ("pretrain_mm_mlp_adapter", "llm.from_pretrained"):
        path = OmegaConf.select(m.mm_cfg, key)
        if path is None or is_llava_file(path) or not Path(path).is_file():
            continue
        with NemoArchive(path) as archive:
            cfg = model_config(archive)
            if not isinstance(cfg.get("mm_cfg"), dict):
                continue  # an LLM .nemo
            names = set(archive.lazy_legacy(0, 0).keys()) if archive.layout == "legacy" else set()
            tower = nemo_vision.read_tower(archive)
        where = f"model.mm_cfg.{key} ({path})"
        if key == "pretrain_mm_mlp_adapter" and _LLM_PROBE in names and str(m.mm_cfg.llm.from_pretrained) != str(path):
            logger.warning("%s holds trained LLM weights, but the LLM comes from model.mm_cfg.llm.from_pretrained "
                           "(%s); set model.mm_cfg.llm.from_pretrained=%s to continue from them", where,
                           m.mm_cfg.llm.from_pretrained, path)  # fmt: skip
        started = (cfg["mm_cfg"].get("vision_encoder") or {}).get("from_pretrained")
        if tower is None:
            bypass = "set model.mm_cfg.vision_encoder.from_pretrained to the trained tower"
            nemo_vision.check_trained_tower(cfg, nemo_vision.holds_tower(names), where,
                                            bypass=bypass if str(started) == str(given) else None)  # fmt: skip
            continue
        if tower.arch != arch:
            raise NevaError(f"{where} stores a trained vision tower {tower.arch}, but model.mm_cfg.vision_encoder."
                            f"from_pretrained ({given}) is {arch}; set it to the tower {path} was trained from "
                            f"({started})")  # fmt: skip
        logger.info("vision tower weights from %s, where the tower was trained; model.mm_cfg.vision_encoder."
                    "from_pretrained (%s) gives its architecture and image processing", where, given)  # fmt: skip
        return str(path), tower.for_layer(select)
    return None


def _datasets(cfg: DictConfig) -> list[Any]:
    from neva_tools.data.registry import DatasetSpec, DatasetUse, load_registry, parse_dataset_list

    data = cfg.model.data
    if data.data_path is None:
        raise NevaError("model.data.data_path is not set (an annotation file or registry names like cc3m%50)")
    path = Path(str(data.data_path))
    if path.suffix in (".json", ".jsonl") or path.is_file():
        folder = Path(data.image_folder) if data.image_folder else None
        return [DatasetUse(DatasetSpec(path.stem, path, folder, data.conv_template))]
    return parse_dataset_list(str(data.data_path), load_registry(data.registry))


def data_precheck(cfg: DictConfig, tokenizer: Path) -> None:
    """The data check of ``neva_tools.train.data_check`` on global rank 0, for the vision tower's size read from its
    config: a bad record stops the job here, with the per-record report of ``neva data validate``.

    Only rank 0 reads the data: the other ranks go on loading, and when rank 0 stops with the report the launcher
    (``scripts/train.sh``'s torchrun, ``srun --kill-on-bad-exit``) stops them, so the report is printed once.
    """
    import sys

    from neva_tools.model.parallel import launch_env
    from neva_tools.train.data_check import precheck, vision_size

    size = vision_size(cfg)
    if size is None or launch_env().rank != 0:
        return
    precheck(cfg, *size, tokenizer, show_progress=sys.stderr.isatty() and bool(cfg.trainer.enable_progress_bar))


def save_run_config(cfg: DictConfig, run_dir: Path) -> None:
    """Keep the merged config as ``run_dir/config.yaml`` (global rank 0; what exports of unfinished runs read)."""
    from neva_tools.model.parallel import launch_env
    from neva_tools.utils.atomic import atomic_path

    if launch_env().rank != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / "config.yaml") as tmp:
        OmegaConf.save(cfg, tmp)


def train(cfg: DictConfig) -> Path | None:
    """Run the training job described by ``cfg``; return the final ``.nemo`` (on global rank 0).

    A launched rank dies with its launcher; global rank 0 holds the run directory's lock for the whole job (a
    second job on the same ``exp_manager.exp_dir/name`` stops at once on every rank, see ``train.supervision``).
    """
    from neva_tools.train.supervision import claim_run_dir, die_with_launcher
    from neva_tools.utils.atomic import NEMO_FILE, check_output_kind

    die_with_launcher()
    run_dir = run_directory(cfg)
    check_output_kind(run_dir / f"{cfg.name}.nemo", NEMO_FILE)  # the final model's path: refuse before training
    with claim_run_dir(run_dir):
        if OmegaConf.select(cfg, "model.text_pretrain.enabled", default=False):
            return train_text(cfg)  # LLM-only continued pretraining on mmap text
        return _train_neva(cfg)


def _train_neva(cfg: DictConfig) -> Path | None:
    """The NeVA (vision-language) job of ``train``."""
    from megatron.core import parallel_state
    from torch.utils.data import DataLoader

    from neva_tools.checkpoint.nemo_vision import arch_record
    from neva_tools.data.anyres import ImageLayout
    from neva_tools.data.dataset import NevaDataset, PackedNevaDataset, collate
    from neva_tools.data.images import ImageProcessor
    from neva_tools.data.templates import image_wrap
    from neva_tools.mappings.siglip import vision_model_type
    from neva_tools.model import neva_io
    from neva_tools.model.added_vocab import plan_notes, vocab_plan
    from neva_tools.model.neva import freeze
    from neva_tools.model.vision import (
        read_clip_vision,
        vision_state_to_mcore,
    )
    from neva_tools.model.vocab_mask import mask_padded_vocab
    from neva_tools.tokenizer.text import TextTokenizer
    from neva_tools.train.fit import (
        PeriodicCheckpoint,
        TrainerSettings,
        consumed_samples,
        fit,
        loader_workers,
        make_trainer,
    )
    from neva_tools.train.module import NevaModule, ScheduleSettings
    from neva_tools.train.sampler import ModalityGroupedSampler, ResumableSampler, grouped_epoch_size
    from neva_tools.train.steps import run_length
    from neva_tools.train.summary import run_info
    from neva_tools.train.validate import advisories, check_config

    for note in advisories(cfg):
        logger.warning("%s", note)
    problems = check_config(cfg, offline=False, devices=processes_per_node(cfg))  # PP, the LLM, tokenizer, lengths…
    if problems:
        listed = "\n  ".join(problems)
        raise NevaError(f"the config has {len(problems)} problem(s); fix them (neva config validate lists them too):"
                        f"\n  {listed}")  # fmt: skip
    m = cfg.model
    tp = int(m.tensor_model_parallel_size)
    llm_path = m.mm_cfg.llm.from_pretrained
    run_dir = run_directory(cfg)
    save_run_config(cfg, run_dir)
    llm_cfg, vocab = neva_io.llm_config(llm_path)
    llm_cfg = {**llm_cfg, **llm_overrides(m)}
    tokenizer = (
        Path(m.tokenizer.model) if m.tokenizer.model else neva_io.extract_tokenizer(llm_path, neva_io.scratch_dir())
    )
    data_precheck(cfg, tokenizer)  # every record, before any weight is read
    source, pretrained = _vision_source(m.mm_cfg.vision_encoder)
    select = int(m.mm_cfg.vision_encoder.vision_select_layer)
    state, arch, kind = read_clip_vision(source, pretrained=pretrained)  # CLIP or SigLIP
    vision_full = vision_state_to_mcore(state, arch, kind, select_layer=select)
    del state
    tower_from = trained_tower(m, arch, select)  # a NeVA .nemo this stage starts from may hold a trained tower
    if tower_from is not None:
        vision_full = tower_from[1]
    image_tokens = (arch.image_size // arch.patch_size) ** 2
    layout = ImageLayout.from_config(m.data, m.mm_cfg, arch.image_size, arch.patch_size)  # AnyRes, patch merge
    processor = ImageProcessor.for_encoder(vision_model_type(arch), arch.image_size, m.data.image_aspect_ratio,
                                           layout=layout)  # fmt: skip
    from neva_tools.data.video import VideoSampling

    dataset = NevaDataset(_datasets(cfg), tokenizer, processor,
                          template=m.data.conv_template, seed=int(m.seed), max_seq_length=int(m.data.max_seq_length),
                          image_tokens=image_tokens, im_start_end=image_wrap(m.mm_cfg) or False,
                          allow_outside=bool(m.data.get("allow_outside_image_folder", False)),
                          video=VideoSampling.from_config(m.data),
                          video_folder=m.data.get("video_folder") or None)  # fmt: skip
    if m.data.packing:
        dataset = PackedNevaDataset(dataset, int(m.data.max_seq_length))
        logger.info("packed %d samples into %d rows of %d tokens (%.0f%% full)", len(dataset.base), len(dataset),
                    dataset.plan.capacity, 100 * dataset.plan.fill_ratio)  # fmt: skip
    grouped = bool(OmegaConf.select(m, "data.group_by_modality_length", default=False))  # not with packing
    images, lengths = dataset.modality_lengths() if grouped else ([], [])
    samples, what = len(dataset), "packed rows" if m.data.packing else "samples"
    if grouped:  # an epoch: each modality's samples filled up to whole global batches
        samples, what = grouped_epoch_size(images, int(m.global_batch_size)), "samples, per modality whole batches"
    length = run_length(cfg, samples, what=what)  # epochs, warmup
    projector = str(m.mm_cfg.mm_mlp_adapter_type)
    freeze_llm, freeze_vision = bool(m.mm_cfg.llm.freeze), bool(m.mm_cfg.vision_encoder.freeze)
    freeze_projector = bool(OmegaConf.select(m, "mm_cfg.freeze_mm_mlp_adapter", default=False))
    text_tokenizer = TextTokenizer(tokenizer)
    plan = vocab_plan(llm_cfg, vocab, text_tokenizer.vocab_size, tp)  # added tokens take (or grow) padded rows
    for note in plan_notes(plan, llm_frozen=freeze_llm):
        logger.info("%s", note)

    def build() -> list[Any]:  # this rank's pipeline stage, or its interleaved chunks
        adapter = m.mm_cfg.pretrain_mm_mlp_adapter
        vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
        chunks = [neva_io.build_neva(llm_path, llm_cfg, vocab, arch, vision_full, select_layer=select,
                                     projector_type=projector, projector_from=adapter,
                                     recompute=recompute_keys(m), vocab_size=plan.vocab, image_layout=layout,
                                     vp_stage=stage) for stage in ([None] if vpp is None else range(vpp))]  # fmt: skip
        for model in chunks:
            if model._language_is_pipeline_parallel:  # stages exchange [max_seq_length, micro batch, h] activations
                limit = min(model._language_max_sequence_length, int(m.data.max_seq_length))  # samples fit (checked)
                model._language_max_sequence_length = limit
            if model.language_model.post_process:  # the model's vocabulary's loss, at any TP
                mask_padded_vocab(model.language_model.output_layer, plan.vocab)
            freeze(model, llm=freeze_llm, vision=freeze_vision, projector=freeze_projector)
        return chunks

    settings = TrainerSettings(
        max_steps=length.max_steps, tensor_model_parallel_size=tp, micro_batch_size=int(m.micro_batch_size),
        pipeline_model_parallel_size=int(m.pipeline_model_parallel_size),
        virtual_pipeline_model_parallel_size=OmegaConf.select(m, "virtual_pipeline_model_parallel_size", default=None),
        global_batch_size=int(m.global_batch_size),
        precision=trainer_precision(cfg.trainer.precision, m.megatron_amp_O2),
        gradient_clip_val=float(cfg.trainer.gradient_clip_val), log_every_n_steps=int(cfg.trainer.log_every_n_steps),
        num_nodes=int(cfg.trainer.num_nodes), seed=int(m.seed), progress=bool(cfg.trainer.enable_progress_bar),
        tf32=bool(m.tf32), **loss_scale_settings(m),
    )  # fmt: skip
    resume = resume_checkpoint(cfg, run_dir)
    consumed = consumed_samples(resume, settings.global_batch_size)
    pad_id = text_tokenizer.pad_id

    def loader() -> DataLoader:
        dp = {"dp_rank": parallel_state.get_data_parallel_rank(),
              "dp_size": parallel_state.get_data_parallel_world_size()}  # fmt: skip
        if grouped:  # LLaVA's --group_by_modality_length: one modality per global batch
            sampler: ResumableSampler = ModalityGroupedSampler(
                images, lengths, micro_batch_size=settings.micro_batch_size,
                global_batch_size=settings.global_batch_size, seed=int(m.seed), consumed_samples=consumed, **dp,
            )  # fmt: skip
        else:
            sampler = ResumableSampler(len(dataset), seed=int(m.seed), consumed_samples=consumed, **dp)
        return DataLoader(dataset, batch_size=settings.micro_batch_size, sampler=sampler,
                          collate_fn=functools.partial(collate, pad_id=pad_id),
                          **loader_workers(int(m.data.num_workers)))  # fmt: skip

    o = m.optim
    optim = optim_settings(cfg, projector_lr=o.mm_projector_lr, vision_lr=o.vision_tower_lr)
    sched = ScheduleSettings(max_steps=settings.max_steps, warmup_steps=length.warmup_steps,
                             constant_steps=int(o.sched.constant_steps), min_lr=float(o.sched.min_lr))  # fmt: skip
    module = NevaModule(build, optim, sched, loader=loader)
    vision_info = {"image_size": arch.image_size, "patch_size": arch.patch_size, "source": str(source),
                   "arch": arch_record(arch)}  # fmt: skip
    if tower_from is not None:
        vision_info["weights_from"] = tower_from[0]
    trained_in = {"32": 32, "bf16": "bf16", "fp16": 16}[settings.precision]  # the dtype of the saved weights (NeMo)
    # vocab_size: the model's vocabulary, added tokens included (what every reader of the .nemo loads)
    final_cfg = {**llm_cfg, "mm_cfg": OmegaConf.to_container(m.mm_cfg), "data": OmegaConf.to_container(m.data),
                 "vision": vision_info, "precision": trained_in, "vocab_size": plan.vocab}  # fmt: skip
    # The tower is stored when it trained here or came trained from a .nemo: readers never fall back to the original.
    final = FinalNemo(run_dir / f"{cfg.name}.nemo", final_cfg, include_llm=not freeze_llm, projector=projector,
                      tokenizer=tokenizer, include_vision=not freeze_vision or tower_from is not None)  # fmt: skip
    every = int(cfg.exp_manager.checkpoint_every_n_steps)
    keep = int(OmegaConf.select(cfg, "exp_manager.save_top_k", default=-1))
    callbacks = [PeriodicCheckpoint(run_dir / "checkpoints", every, keep=keep, protect=resume), final]
    trainer = make_trainer(settings, run_dir / "logs", callbacks=callbacks, run=run_info(cfg, plan.vocab))
    return fit(trainer, module, resume, consumed, final, run_dir / "logs")


class FinalNemo(pl.Callback):
    """Writes the run's NeVA ``.nemo`` when training ends (while the parallel groups still exist)."""

    def __init__(self, path: Path, config: dict[str, Any], *, include_llm: bool, projector: str,
                 tokenizer: Path, include_vision: bool = False) -> None:  # fmt: skip
        self.path, self.config, self.include_llm = path, config, include_llm
        self.projector, self.tokenizer, self.include_vision = projector, tokenizer, include_vision
        self.output: Path | None = None

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        from neva_tools.model import neva_io

        module.gather_weights()  # the weights of the last step (overlap_param_gather)
        self.output = neva_io.save_neva_nemo(module.model, self.path, self.config, include_llm=self.include_llm,
                                             projector_type=self.projector, tokenizer=self.tokenizer,
                                             include_vision=self.include_vision)  # fmt: skip
