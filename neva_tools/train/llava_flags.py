"""LLaVA's training command line as ``neva train`` overrides (``scripts/llava_train.py``).

Reads the flags of LLaVA / LLaVA-NeXT ``llava/train/train.py`` (``train_mem.py``) and of Qwen-VL finetune's
``train_qwen.py`` where they fit (``--tune_mm_llm/--tune_mm_vision/--tune_mm_mlp``, ``--dataset_use``,
``--vision_tower_lr``), Hugging Face style: ``--flag value``, ``--flag=value``, a bare ``--flag`` for true. Every
flag maps to ``key=value`` overrides of ``conf/neva_config.yaml``, is accepted with no effect (listed once in one
note), or is refused at a value this engine does not train (patch tokens, evaluation during training). LLaVA-NeXT's
AnyRes flags map to ``model.data.image_aspect_ratio`` / ``image_grid_pinpoints`` and
``model.mm_cfg.mm_patch_merge_type`` (``neva_tools.data.anyres``); a pinpoint list, LLaVA's (width, height), is
written as [height, width] pairs.
Unknown flags are one error listing all of them.

Defaults follow LLaVA/Hugging Face where they change what is trained: 3 epochs, lr 5e-5, Adam betas (0.9, 0.999),
weight decay 0, per-device batch 8, no warmup, square images, the whole LLM trained unless a flag freezes it; a
cosine schedule to 0. The global batch is ``per_device_train_batch_size × gradient_accumulation_steps × world
size`` (every process data-parallel, as DeepSpeed), the world size from ``--nproc N`` (this tool's flag), else the
launcher's ``WORLD_SIZE``, else 1. ``--deepspeed`` (zero2/zero3 json, not read) selects the distributed optimizer:
optimizer state and fp32 master weights sharded over data-parallel ranks (ZeRO-1/2; weights are not sharded as in
ZeRO-3: use ``model.tensor_model_parallel_size`` for models too big for one device).
Video: LLaVA-NeXT's ``--video_folder`` / ``--frames_upbound`` and Qwen-VL's ``--base_interval``,
``--video_min_frames`` / ``--video_max_frames`` and ``--video_max_frame_pixels`` / ``--video_min_frame_pixels`` map to
the ``model.data`` keys of the same names (``neva_tools.data.video``).
``--group_by_modality_length True`` gives batches of one modality grouped by length (``train.sampler``).
``--mm_use_im_start_end True`` wraps images in LLaVA-1's ``<im_start>``/``<im_end>``
(``model.mm_cfg.im_start_end_tokens``), which the tokenizer must hold: ``--tokenizer FILE`` (this tool's flag,
``model.tokenizer.model``) trains with one that has them instead of the LLM ``.nemo``'s.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neva_tools.errors import NevaError
from neva_tools.train.hf_flags import Flags, parse_bool, parse_flags

#: Flags accepted with no effect here, and why.
INERT = {
    "lazy_preprocess": "records and images are always read lazily",
    "per_device_eval_batch_size": "there is no evaluation during training",
    "attn_implementation": "attention is megatron-core's",
    "torch_compile": "nothing is compiled",
    "torch_compile_backend": "nothing is compiled",
    "dataloader_drop_last": "the sampler runs across epochs: no partial batch is formed",
    "cache_dir": "no hub downloads",
    "local_rank": "ranks come from the launcher's environment",
    "optim": "the optimizer is megatron-core's Adam with decoupled weight decay",
    "remove_unused_columns": "no HF datasets columns",
    "max_pixels": "images are resized to the vision encoder's input size",
    "min_pixels": "images are resized to the vision encoder's input size",
    "freeze_mm_vision_resampler": "no vision resampler",
    "mm_vision_tower_lr_scale": "see --mm_vision_tower_lr",
}
#: Flags accepted only at these values (LLaVA's defaults), with the reason others are refused.
ONLY = {
    "mm_use_im_patch_token": ("false", "image patch tokens (<im_patch>) are not used by this model"),
    "mm_vision_select_feature": ("patch", "the vision features are the patch tokens (CLIP's class token is dropped)"),
    "evaluation_strategy": ("no", "there is no evaluation during training; run neva eval on the final .nemo"),
    "eval_strategy": ("no", "there is no evaluation during training; run neva eval on the final .nemo"),
    "lora_enable": ("false", "LoRA is not trained here"),
    "bits": ("16", "quantized training is not supported"),
}
#: LLaVA's ``--version`` values whose template differs from ours of the same name: LLaVA's meaning → ours.
LLAVA_VERSIONS: dict[str, str | None] = {"vicuna_v1": "v1", "llama_2": None}
_TUNABLE = {"mm_language_model": "llm", "mm_vision_tower": "vision", "mm_mlp_adapter": "projector"}


@dataclass
class Translation:
    """The overrides (in order), notes for the user, and the flags that had no effect."""

    overrides: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    inert: list[str] = field(default_factory=list)

    def command_line(self) -> str:
        """The equivalent ``neva train`` command line."""
        return shlex.join(["neva", "train", *self.args()])

    def args(self) -> list[str]:
        """The overrides as ``key=value`` arguments."""
        return [f"{k}={_value(v)}" for k, v in self.overrides.items()]


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return str(value)


def translate(argv: Sequence[str]) -> Translation:
    """The ``neva train`` overrides for LLaVA's command line ``argv`` (see the module docstring)."""
    flags = Flags(parse_flags(argv))
    world_size = flags.num("nproc", kind=int)  # this tool's flag: the processes of the job
    out = Translation()
    o = out.overrides
    _model(flags, o)
    _template(flags, o, out.notes)
    _data(flags, o, out.notes)
    _trainable(flags, o)
    _optim(flags, o, out.notes)
    _length(flags, o)
    _batch(flags, o, world_size)
    _engine(flags, o, out.notes)
    _run_dir(flags, o, out)
    for name, (allowed, why) in ONLY.items():
        if flags.has(name):
            raw = flags.take(name)
            boolean = allowed in ("true", "false")
            if (parse_bool(name, raw) != (allowed == "true")) if boolean else str(raw).strip().lower() != allowed:
                raise NevaError(f"--{name} {raw} is not supported: {why}")
            out.inert.append(name)
    for name in list(flags.left):
        if name in INERT:
            flags.take(name)
            out.inert.append(name)
    if flags.left:
        listed = ", ".join(f"--{n}" for n in flags.left)
        raise NevaError(f"unknown LLaVA training flags: {listed}; scripts/llava_train.py --help lists the ones it "
                        "reads, and neva train takes key=value overrides of conf/neva_config.yaml")  # fmt: skip
    if out.inert:
        out.notes.append("flags with no effect here: " + ", ".join(f"--{n}" for n in out.inert))
    return out


def _model(flags: Flags, o: dict[str, Any]) -> None:
    path = flags.take("model_name_or_path")
    if path is None:
        raise NevaError("--model_name_or_path is required: the LLM .nemo (neva convert hf-to-nemo)")
    p = Path(path)
    convert = f"neva convert hf-to-nemo --input {path} --output {p.name}.nemo"
    if p.is_dir():
        config = json.loads((p / "config.json").read_text()) if (p / "config.json").is_file() else None
        if config is not None and ("mm_vision_tower" in config or "mm_projector_type" in config):
            raise NevaError(f"--model_name_or_path {path} is a LLaVA training checkpoint, which is not read here: "
                            "pass its LLM as a .nemo and its mm_projector.bin as "
                            "--pretrain_mm_mlp_adapter")  # fmt: skip
        if config is not None:
            raise NevaError(f"--model_name_or_path {path} is a Hugging Face model directory; convert it once with: "
                            f"{convert}, then pass --model_name_or_path {p.name}.nemo")  # fmt: skip
        raise NevaError(f"--model_name_or_path {path} is a directory, not the LLM .nemo")
    if not p.is_file():
        raise NevaError(f"--model_name_or_path {path} does not exist (the LLM .nemo; a Hugging Face model: neva "
                        f"convert hf-to-nemo --input DIR --output {p.name}.nemo first)")  # fmt: skip
    if p.suffix != ".nemo":
        raise NevaError(f"--model_name_or_path {path} is not a .nemo file (neva convert hf-to-nemo writes one)")
    o["model.mm_cfg.llm.from_pretrained"] = path
    tower = flags.take("vision_tower")
    if tower is None:
        raise NevaError("--vision_tower is required: a CLIP or SigLIP directory (Hugging Face) or open_clip NAME:FILE")
    o["model.mm_cfg.vision_encoder.from_pretrained"] = tower
    if (Path(tower) / "config.json").is_file():
        o["model.mm_cfg.vision_encoder.from_hf"] = True
    if flags.has("mm_vision_select_layer"):
        o["model.mm_cfg.vision_encoder.vision_select_layer"] = flags.num("mm_vision_select_layer", kind=int)
    if flags.has("mm_projector_type"):
        kind = flags.take("mm_projector_type")
        o["model.mm_cfg.mm_mlp_adapter_type"] = {"mlp1x_gelu": "linear"}.get(kind, kind)  # one Linear either way
    if flags.has("pretrain_mm_mlp_adapter"):
        o["model.mm_cfg.pretrain_mm_mlp_adapter"] = flags.take("pretrain_mm_mlp_adapter")


def _template(flags: Flags, o: dict[str, Any], notes: list[str]) -> None:
    from neva_tools.data.template_aliases import ALIASES
    from neva_tools.data.templates import TEMPLATES, get_template

    version = flags.take("version")
    if version is None:
        raise NevaError("--version is required: LLaVA's default (v0, '###' separators) is not rendered here; "
                        "stage 1 uses plain, LLaVA-1.5 v1, Qwen qwen_1_5, LLaMA-3 llava_llama_3")  # fmt: skip
    if version in LLAVA_VERSIONS:
        ours = LLAVA_VERSIONS[version]
        if ours is None:
            raise NevaError(f"--version {version} is LLaVA's conv_llama_2 with Meta's default system prompt; neva's "
                            "llama_2 is LLaVA's llava_llama_2 (the vision-assistant system prompt): pass --version "
                            "llava_llama_2")  # fmt: skip
        notes.append(f"--version {version}: LLaVA's {version} is neva's {ours}")
        version = ours
    if version not in TEMPLATES and version not in ALIASES:  # (an alias is announced once, by the training run)
        get_template(version)  # unknown or unrenderable names fail here, naming the closest template
    o["model.mm_cfg.llm.model_type"] = version


def _data(flags: Flags, o: dict[str, Any], notes: list[str]) -> None:
    from neva_tools.data.templates import LLAVA_IM_TOKENS

    path, names = flags.take("data_path"), flags.take("dataset_use")
    if path is not None and names is not None:
        raise NevaError("--data_path and --dataset_use are both given: use one (a file, or registry names a%50,b)")
    if path is None and names is None:
        raise NevaError("--data_path is required: a LLaVA JSON/JSONL annotation file (or --dataset_use names)")
    if path is not None and (path.endswith((".yaml", ".yml")) or "{" in path):
        raise NevaError(f"--data_path {path}: LLaVA-NeXT's dataset YAML and brace lists are not read here; list the "
                        "datasets in conf/datasets.yaml and pass their names (--dataset_use a%50,b)")  # fmt: skip
    o["model.data.data_path"] = path if path is not None else names
    if flags.has("image_folder"):
        o["model.data.image_folder"] = flags.take("image_folder")
    _video(flags, o)
    _anyres(flags, o)
    if flags.has("model_max_length"):
        o["model.data.max_seq_length"] = flags.num("model_max_length", kind=int)
    if flags.has("dataloader_num_workers"):
        o["model.data.num_workers"] = flags.num("dataloader_num_workers", kind=int)
    packed = [flags.flag(n, False) for n in ("data_flatten", "data_packing")]
    if any(packed):
        o["model.data.packing"] = True
    if flags.has("group_by_modality_length"):
        o["model.data.group_by_modality_length"] = flags.flag("group_by_modality_length")
        if o["model.data.group_by_modality_length"] and any(packed):
            raise NevaError("--group_by_modality_length True with --data_flatten/--data_packing: a packed row "
                            "mixes image and text-only samples, so batches cannot hold one modality; drop one of "
                            "them")  # fmt: skip
    if flags.has("tokenizer"):  # this tool's flag: a tokenizer other than the LLM .nemo's
        o["model.tokenizer.model"] = flags.take("tokenizer")
    if flags.has("mm_use_im_start_end"):
        o["model.mm_cfg.use_im_start_end"] = flags.flag("mm_use_im_start_end")
        if o["model.mm_cfg.use_im_start_end"]:
            o["model.mm_cfg.im_start_end_tokens"] = list(LLAVA_IM_TOKENS)
            quoted = " ".join(shlex.quote(t) for t in LLAVA_IM_TOKENS)
            notes.append(f"--mm_use_im_start_end True: images are wrapped in LLaVA's {' ... '.join(LLAVA_IM_TOKENS)}, "
                         "which the tokenizer must hold (LLaVA adds them itself); add them once with `neva tokenizer "
                         f"add-tokens --input TOKENIZER --output tok_llava.model --tokens {quoted}` and pass "
                         "--tokenizer tok_llava.model")  # fmt: skip


#: Video flags (LLaVA-NeXT's, Qwen-VL's) → ``model.data`` keys of the same name (``neva_tools.data.video``).
VIDEO_FLAGS = {"video_folder": str, "frames_upbound": int, "base_interval": float, "video_min_frames": int,
               "video_max_frames": int, "video_max_frame_pixels": int, "video_min_frame_pixels": int}  # fmt: skip


def _video(flags: Flags, o: dict[str, Any]) -> None:
    """LLaVA-NeXT's ``--video_folder`` / ``--frames_upbound`` and Qwen-VL's frame sampling flags."""
    for name, kind in VIDEO_FLAGS.items():
        if flags.has(name):
            o[f"model.data.{name}"] = flags.take(name) if kind is str else flags.num(name, kind=kind)


def _anyres(flags: Flags, o: dict[str, Any]) -> None:
    """``--image_aspect_ratio``, ``--image_grid_pinpoints`` and ``--mm_patch_merge_type`` (LLaVA-NeXT's AnyRes)."""
    import ast

    from neva_tools.data.anyres import ASPECTS, MERGE_TYPES, parse_aspect

    aspect = str(flags.take("image_aspect_ratio", "square"))
    try:
        parse_aspect(aspect)
    except NevaError:
        raise NevaError(f"--image_aspect_ratio {aspect} is not trained here; use one of {', '.join(ASPECTS)}") from None
    o["model.data.image_aspect_ratio"] = aspect
    pinpoints = flags.take("image_grid_pinpoints")
    if pinpoints is not None and "x" in pinpoints:  # LLaVA-NeXT's "(1x1),...,(6x6)": read as LLaVA-NeXT reads it
        o["model.data.image_grid_pinpoints"] = pinpoints.strip()
    elif pinpoints is not None:
        try:
            pairs = [(int(w), int(h)) for w, h in ast.literal_eval(pinpoints)]
        except (ValueError, SyntaxError, TypeError):
            raise NevaError(f"--image_grid_pinpoints {pinpoints!r} is neither LLaVA's list of (width, height) pixel "
                            "pairs nor the range \"(1x1),...,(6x6)\"") from None  # fmt: skip
        o["model.data.image_grid_pinpoints"] = [[h, w] for w, h in pairs]  # ours are [height, width]
    merge = str(flags.take("mm_patch_merge_type", "flat"))
    if merge not in MERGE_TYPES:
        raise NevaError(f"--mm_patch_merge_type {merge} is not trained here; use one of {', '.join(MERGE_TYPES)}")
    o["model.mm_cfg.mm_patch_merge_type"] = merge


def _trainable(flags: Flags, o: dict[str, Any]) -> None:
    """Which parts train: LLaVA-NeXT's --mm_tunable_parts, Qwen-VL's --tune_mm_*, or LLaVA's older flags."""
    train = {"llm": True, "vision": False, "projector": True}  # LLaVA's default: the LLM and the projector
    qwen = {n: flags.flag(f"tune_mm_{q}") for n, q in (("llm", "llm"), ("vision", "vision"), ("projector", "mlp"))}
    parts = flags.take("mm_tunable_parts")
    old = {n: flags.flag(n) for n in ("tune_mm_mlp_adapter", "freeze_backbone", "freeze_mm_mlp_adapter",
                                      "unfreeze_mm_vision_tower")}  # fmt: skip
    if parts is not None:
        if any(v is not None for v in qwen.values()):
            raise NevaError("--mm_tunable_parts and Qwen-VL's --tune_mm_llm/--tune_mm_vision/--tune_mm_mlp are "
                            "both given: use one")  # fmt: skip
        names = [p.strip() for p in parts.split(",") if p.strip()]
        unknown = [p for p in names if p not in _TUNABLE]
        if unknown:
            raise NevaError(f"--mm_tunable_parts {parts}: unknown part(s) {', '.join(unknown)}; parts: "
                            f"{', '.join(_TUNABLE)}")  # fmt: skip
        train = {part: key in names for key, part in _TUNABLE.items()}
    elif any(v is not None for v in qwen.values()):
        train = {part: bool(value) for part, value in qwen.items()}  # Qwen-VL: each defaults to false
    else:
        if old["tune_mm_mlp_adapter"] or old["freeze_backbone"]:
            train["llm"] = False
        if old["freeze_mm_mlp_adapter"]:
            train["projector"] = False
        if old["unfreeze_mm_vision_tower"]:
            train["vision"] = True
    o["model.mm_cfg.llm.freeze"] = not train["llm"]
    o["model.mm_cfg.vision_encoder.freeze"] = not train["vision"]
    o["model.mm_cfg.freeze_mm_mlp_adapter"] = not train["projector"]


def _optim(flags: Flags, o: dict[str, Any], notes: list[str]) -> None:
    o["model.optim.lr"] = flags.num("learning_rate", 5e-5)
    o["model.optim.weight_decay"] = flags.num("weight_decay", 0.0)
    o["model.optim.betas"] = [flags.num("adam_beta1", 0.9), flags.num("adam_beta2", 0.999)]
    if flags.has("mm_projector_lr"):
        o["model.optim.mm_projector_lr"] = flags.num("mm_projector_lr")
    for name in ("mm_vision_tower_lr", "vision_tower_lr"):  # LLaVA-NeXT's, Qwen-VL's
        if flags.has(name):
            o["model.optim.vision_tower_lr"] = flags.num(name)
    o["model.optim.sched.min_lr"] = 0.0  # Hugging Face's schedules decay to 0
    schedule = flags.take("lr_scheduler_type")
    if schedule is None:
        notes.append("Hugging Face's default linear decay is not available here: the schedule is cosine "
                     "(--lr_scheduler_type cosine)")  # fmt: skip
    elif schedule != "cosine":
        raise NevaError(f"--lr_scheduler_type {schedule}: the schedule here is cosine with warmup (NeMo's "
                        "CosineAnnealing); pass --lr_scheduler_type cosine")  # fmt: skip
    warmup, ratio = flags.num("warmup_steps", 0, kind=int), flags.num("warmup_ratio", 0.0)
    o["model.optim.sched.warmup_steps"] = warmup
    o["model.optim.sched.warmup_ratio"] = ratio if warmup <= 0 and ratio > 0 else None  # HF: warmup_steps wins
    if flags.has("max_grad_norm"):
        o["trainer.gradient_clip_val"] = flags.num("max_grad_norm")
    deepspeed = flags.take("deepspeed")
    if deepspeed is not None:  # the JSON is not read: precision, batch and clipping come from the flags
        o["model.optim.name"] = "distributed_fused_adam"
        notes.append(f"--deepspeed {deepspeed}: optimizer state and fp32 master weights are sharded over the "
                     "data-parallel ranks (distributed_fused_adam); weights are not (ZeRO-3's parameter sharding: "
                     "use model.tensor_model_parallel_size)")  # fmt: skip


def _length(flags: Flags, o: dict[str, Any]) -> None:
    steps, epochs = flags.num("max_steps", -1, kind=int), flags.num("num_train_epochs", 3.0)
    if steps > 0:  # Hugging Face: max_steps overrides num_train_epochs
        o["trainer.max_steps"], o["trainer.max_epochs"] = steps, None
    else:
        o["trainer.max_steps"], o["trainer.max_epochs"] = -1, int(epochs) if float(epochs).is_integer() else epochs


def _batch(flags: Flags, o: dict[str, Any], world_size: int | None) -> None:
    micro = flags.num("per_device_train_batch_size", 8, kind=int)
    accumulate = flags.num("gradient_accumulation_steps", 1, kind=int)
    launched = os.environ.get("WORLD_SIZE")
    world = world_size if world_size is not None else int(launched) if launched else 1
    if launched and world_size is not None and int(launched) != world_size:
        raise NevaError(f"--nproc {world_size} but the launcher's WORLD_SIZE is {launched}")
    if micro < 1 or accumulate < 1 or world < 1:
        raise NevaError(f"--per_device_train_batch_size ({micro}), --gradient_accumulation_steps ({accumulate}) and "
                        f"the world size ({world}) must be positive")  # fmt: skip
    o["model.micro_batch_size"] = micro
    o["model.global_batch_size"] = micro * accumulate * world


def _engine(flags: Flags, o: dict[str, Any], notes: list[str]) -> None:
    bf16, fp16 = flags.flag("bf16", False), flags.flag("fp16", False)
    if bf16 and fp16:
        raise NevaError("--bf16 and --fp16 are both true: choose one")
    o["trainer.precision"] = "bf16" if bf16 else "16" if fp16 else "32"
    if flags.has("tf32"):
        o["model.tf32"] = flags.flag("tf32")
    if flags.flag("gradient_checkpointing", False):
        o["model.activations_checkpoint_granularity"] = "full"
        o["model.activations_checkpoint_method"] = "uniform"
        o["model.activations_checkpoint_num_layers"] = 1
    if flags.has("seed"):
        o["model.seed"] = flags.num("seed", kind=int)
    if flags.has("logging_steps"):
        o["trainer.log_every_n_steps"] = max(1, int(flags.num("logging_steps")))
    report = flags.take("report_to")
    if report is not None and any(r.strip() not in ("tensorboard", "none") for r in report.split(",")):
        notes.append(f"--report_to {report}: metrics go to TensorBoard and CSV only (OUTPUT_DIR/logs); nothing is "
                     "sent to other services")  # fmt: skip


def _run_dir(flags: Flags, o: dict[str, Any], out: Translation) -> None:
    output, run_name = flags.take("output_dir"), flags.take("run_name")
    if output is None:
        raise NevaError("--output_dir is required: the run directory (checkpoints, logs, the final NAME.nemo)")
    path = Path(output)
    o["exp_manager.exp_dir"] = str(path.parent)
    o["name"] = path.name
    if run_name is not None:
        out.inert.append("run_name")  # the run is named after --output_dir, as its files are
    strategy = flags.take("save_strategy", "steps")
    every = flags.num("save_steps", 500, kind=int)
    if strategy == "no":
        o["exp_manager.checkpoint_every_n_steps"] = 0  # one resumable checkpoint at the end, and the .nemo
    elif strategy == "steps":
        o["exp_manager.checkpoint_every_n_steps"] = every
    else:
        raise NevaError(f"--save_strategy {strategy}: checkpoints are taken every --save_steps steps (steps) or only "
                        "at the end (no)")  # fmt: skip
    if flags.has("save_total_limit"):
        o["exp_manager.save_top_k"] = flags.num("save_total_limit", kind=int)
