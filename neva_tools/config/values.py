"""The type and range of every value of our config keys, as data, checked when a config is loaded.

A key's :class:`Rule` says what one value may be on its own: an integer, a number, true/false, a path, one of some
names, with its bounds (``max_steps``: an integer ≥ 1 or -1). Rules between keys (``max_steps: -1`` needs
``max_epochs``, the global batch a multiple of the micro batch) and names checked by the code that reads them (the
precision, the optimizer, the conversation template) stay in ``neva_tools.train.validate``. Every refused value is
listed with the other problems of loading (unknown keys, NeMo values refused), each naming the key, the value and
what it must be; ``neva config validate`` and ``neva train`` stop with exit status 2 on them.

:func:`value_problems` also writes back numbers given as text (``'5'``, ``1e3`` for an integer key) as numbers, so
the code reading the config meets the types the table promises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

_ABSENT = object()
_SHOWN = 60  #: longest value shown in a message


@dataclass(frozen=True)
class Rule:
    """What one value of a key may be."""

    kind: str  #: int, float, bool, path, text, choice, pair (two numbers) or list_or_text
    low: float | None = None  #: smallest value allowed (excluded when ``above``)
    above: bool = False
    high: float | None = None  #: largest value allowed (excluded when ``below``)
    below: bool = False
    null: bool = False  #: null allowed
    extra: tuple[Any, ...] = ()  #: values allowed besides the range (-1: derive it)
    choices: tuple[str, ...] = ()  #: the names a ``choice`` may take
    hint: str = ""  #: what the value means, shown after the rule

    def describe(self) -> str:
        """``an integer ≥ 1, or -1 (...)``."""
        what = {"int": "an integer", "float": "a number", "bool": "true or false", "path": "a path",
                "text": "non-empty text", "pair": "two numbers [a, b]",
                "list_or_text": "a list or text", "choice": "one of " + ", ".join(self.choices)}[self.kind]  # fmt: skip
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.above else '≥'} {_number_text(self.low)}")
        if self.high is not None:
            bounds.append(f"{'<' if self.below else '≤'} {_number_text(self.high)}")
        if self.kind == "pair" and bounds:
            what += " each"
        text = f"{what} {' and '.join(bounds)}" if bounds else what
        alternatives = [str(v) for v in self.extra] + (["null"] if self.null else [])
        if alternatives:
            text += ", or " + " or ".join(alternatives)
        return f"{text} ({self.hint})" if self.hint else text

    def check(self, value: Any) -> tuple[bool, Any]:
        """(whether ``value`` is allowed, the value as its type: numbers given as text become numbers)."""
        if value is None:
            return self.null, value
        if value in self.extra and not isinstance(value, bool):
            return True, value
        if self.kind == "bool":
            return isinstance(value, bool), value
        if self.kind == "path" and self.null and isinstance(value, str) and not value.strip():
            return True, None  # NeMo's "" for a path it does not set
        if self.kind in ("path", "text"):
            ok = isinstance(value, str) and value.strip() != "" and "\x00" not in value
            return ok or (self.kind == "text" and _number(value, float) is not None), value
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices, value
        if self.kind == "list_or_text":  # the reader checks what the list or text holds
            return isinstance(value, (list, tuple, ListConfig)) or (
                isinstance(value, str) and value.strip() != ""
            ), value
        if self.kind == "pair":
            items = list(value) if isinstance(value, (list, tuple, ListConfig)) else None
            numbers = [_number(v, float) for v in items] if items is not None and len(items) == 2 else [None]
            ok = all(n is not None and self._in_range(n) for n in numbers)
            return ok, [float(n) for n in numbers] if ok else value
        number = _number(value, int if self.kind == "int" else float)
        if number is None:
            return False, value
        if number in self.extra:
            return True, number
        return self._in_range(number), number

    def _in_range(self, number: float) -> bool:
        if self.low is not None and (number <= self.low if self.above else number < self.low):
            return False
        return self.high is None or (number < self.high if self.below else number <= self.high)


def _number_text(number: float) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"


def _number(value: Any, kind: type) -> float | int | None:
    """``value`` as a finite ``kind`` (int: whole numbers only), or None; booleans and containers are not numbers."""
    if isinstance(value, (bool, DictConfig, ListConfig, list, dict)):
        return None
    if isinstance(value, str):
        try:
            value = float(value.replace("_", "")) if value.strip() else None
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if kind is int:
        return int(value) if float(value).is_integer() else None
    return value


def Int(low: float | None = 1, **kw: Any) -> Rule:
    return Rule("int", low=low, **kw)


def Float(low: float | None = None, **kw: Any) -> Rule:
    return Rule("float", low=low, **kw)


BOOL, PATH, PATH_OR_NULL, TEXT = Rule("bool"), Rule("path"), Rule("path", null=True), Rule("text")
TEXT_OR_NULL = Rule("text", null=True)
SIZE_OR_NULL = Int(1, null=True, hint="read from the checkpoint when null")
LR = Float(0, above=True)
PROBABILITY_OR_NULL = Float(0, high=1, below=True, null=True)

#: Our keys (``conf/neva_config.yaml``) → the values each may take on its own.
VALUES: dict[str, Rule] = {
    "name": TEXT,
    "trainer.num_nodes": Int(1),
    "trainer.precision": Rule("text", hint="32, bf16, bf16-mixed, bf16-true, 16 or 16-mixed"),
    "trainer.max_steps": Int(1, extra=(-1,), hint="-1: from trainer.max_epochs"),
    "trainer.max_epochs": Float(0, above=True, null=True, extra=(-1,), hint="null or -1: trainer.max_steps only"),
    "trainer.log_every_n_steps": Int(1),
    "trainer.gradient_clip_val": Float(0, hint="0 disables clipping"),
    "trainer.enable_progress_bar": BOOL,
    "exp_manager.exp_dir": PATH,
    "exp_manager.explicit_log_dir": PATH_OR_NULL,
    "exp_manager.resume_if_exists": BOOL,
    "exp_manager.resume_ignore_no_checkpoint": BOOL,
    "exp_manager.resume_from_checkpoint": PATH_OR_NULL,
    "exp_manager.checkpoint_every_n_steps": Int(0, hint="0: only at the end"),
    "exp_manager.save_top_k": Int(-1, hint="-1: keep all"),
    "model.micro_batch_size": Int(1),
    "model.global_batch_size": Int(1),
    "model.tensor_model_parallel_size": Int(1),
    "model.pipeline_model_parallel_size": Int(1),
    "model.virtual_pipeline_model_parallel_size": Int(1, null=True),
    "model.seed": Int(0, high=2**32, below=True),
    "model.tf32": BOOL,
    "model.megatron_amp_O2": BOOL,
    "model.activations_checkpoint_granularity": Rule("choice", choices=("selective", "full"), null=True),
    "model.activations_checkpoint_method": Rule("choice", choices=("uniform", "block"), null=True),
    "model.activations_checkpoint_num_layers": Int(1, null=True),
    "model.hidden_dropout": PROBABILITY_OR_NULL,
    "model.attention_dropout": PROBABILITY_OR_NULL,
    "model.native_amp_init_scale": Float(0, above=True),
    "model.native_amp_growth_interval": Int(1),
    "model.hysteresis": Int(1),
    # NeMo's architecture keys: read from the checkpoints; a value set is checked against them (config.derived)
    "model.max_position_embeddings": SIZE_OR_NULL,
    "model.position_embedding_type": TEXT_OR_NULL,
    "model.num_layers": SIZE_OR_NULL,
    "model.hidden_size": SIZE_OR_NULL,
    "model.ffn_hidden_size": SIZE_OR_NULL,
    "model.num_attention_heads": SIZE_OR_NULL,
    "model.num_query_groups": SIZE_OR_NULL,
    "model.kv_channels": SIZE_OR_NULL,
    "model.normalization": TEXT_OR_NULL,
    "model.layernorm_epsilon": Float(0, above=True, null=True),
    "model.bias": Rule("bool", null=True),
    "model.activation": TEXT_OR_NULL,
    "model.rotary_percentage": Float(0, above=True, high=1, null=True),
    "model.rotary_base": Float(0, above=True, null=True),
    "model.seq_len_interpolation_factor": Float(0, above=True, null=True),
    "model.share_embeddings_and_output_weights": Rule("bool", null=True),
    "model.mm_cfg.llm.from_pretrained": PATH_OR_NULL,
    "model.mm_cfg.llm.freeze": BOOL,
    "model.mm_cfg.llm.model_type": TEXT,
    "model.mm_cfg.vision_encoder.from_pretrained": PATH_OR_NULL,
    "model.mm_cfg.vision_encoder.from_hf": BOOL,
    "model.mm_cfg.vision_encoder.vision_select_layer": Int(None),
    "model.mm_cfg.vision_encoder.patch_dim": SIZE_OR_NULL,
    "model.mm_cfg.vision_encoder.hidden_size": SIZE_OR_NULL,
    "model.mm_cfg.vision_encoder.crop_size": Rule("pair", low=1, null=True, hint="[height, width] px"),
    "model.mm_cfg.vision_encoder.class_token_length": Int(0, null=True),
    "model.mm_cfg.vision_encoder.freeze": BOOL,
    "model.mm_cfg.pretrain_mm_mlp_adapter": PATH_OR_NULL,
    "model.mm_cfg.mm_mlp_adapter_type": TEXT,
    "model.mm_cfg.mm_patch_merge_type": TEXT,
    "model.mm_cfg.freeze_mm_mlp_adapter": BOOL,
    "model.mm_cfg.use_im_start_end": BOOL,
    "model.mm_cfg.im_start_end_tokens": Rule(
        "list_or_text", null=True, hint="two distinct tokens, e.g. [<im_start>, <im_end>]"
    ),
    "model.data.data_path": PATH_OR_NULL,
    "model.data.registry": PATH,
    "model.data.image_folder": PATH_OR_NULL,
    "model.data.conv_template": TEXT,
    "model.data.image_aspect_ratio": TEXT,
    "model.data.image_grid_pinpoints": Rule(
        "list_or_text", null=True, hint="[[height, width], ...] px or LLaVA-NeXT's range text (1x1),...,(3x3)"
    ),
    "model.data.num_workers": Int(0),
    "model.data.max_seq_length": Int(1),
    "model.data.image_token_len": SIZE_OR_NULL,
    "model.data.packing": BOOL,
    "model.data.group_by_modality_length": BOOL,
    "model.data.allow_outside_image_folder": BOOL,
    "model.data.video_folder": PATH_OR_NULL,
    "model.data.base_interval": Float(0, above=True, hint="seconds between sampled frames"),
    "model.data.video_min_frames": Int(1),
    "model.data.video_max_frames": Int(1),
    "model.data.frames_upbound": Int(1, null=True, extra=(0,), hint="LLaVA-NeXT's video_max_frames; 0 or null: unset"),
    "model.data.video_max_frame_pixels": Int(1, null=True, hint="null: no limit"),
    "model.data.video_min_frame_pixels": Int(1, null=True, hint="null: no limit"),
    "model.optim.name": TEXT,
    "model.optim.overlap_grad_reduce": BOOL,
    "model.optim.overlap_param_gather": BOOL,
    "model.optim.lr": LR,
    "model.optim.weight_decay": Float(0),
    "model.optim.betas": Rule("pair", low=0, high=1, below=True, hint="Adam's beta1, beta2"),
    "model.optim.mm_projector_lr": Float(0, above=True, null=True, hint="null: model.optim.lr"),
    "model.optim.vision_tower_lr": Float(0, above=True, null=True, hint="null: model.optim.lr"),
    "model.optim.sched.name": Rule("choice", choices=("CosineAnnealing",)),
    "model.optim.sched.warmup_steps": Int(0),
    "model.optim.sched.warmup_ratio": Float(0, high=1, below=True, null=True),
    "model.optim.sched.constant_steps": Int(0),
    "model.optim.sched.min_lr": Float(0),
    "model.tokenizer.model": PATH_OR_NULL,
    "model.text_pretrain.enabled": BOOL,
    "model.text_pretrain.data_path": Rule(
        "list_or_text", null=True, hint='"w1 prefix1 w2 prefix2", a list of prefixes or a mixture YAML'
    ),
    "model.text_pretrain.split": TEXT,
    "model.text_pretrain.seq_length": Int(1),
    "model.text_pretrain.index_cache": PATH_OR_NULL,
    "model.text_pretrain.reset_position_ids": BOOL,
    "model.text_pretrain.reset_attention_mask": BOOL,
    "model.text_pretrain.eod_mask_loss": BOOL,
    "model.text_pretrain.eval_interval": Int(0, hint="0: never"),
    "model.text_pretrain.eval_iters": Int(0),
}

#: Our keys without a rule here: the code reading them checks every form they may take (a test keeps the two lists
#: covering ``conf/neva_config.yaml``).
CHECKED_ELSEWHERE = {
    "trainer.devices": "a number, auto or null: neva_tools.train.validate.devices_problems",
}


def show(value: Any) -> str:
    """A value as a message shows it: short, on one line, unprintable characters escaped."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if value is None or isinstance(value, bool):
        text = {None: "null", True: "true", False: "false"}[value]
    elif isinstance(value, str) and value and value.isprintable() and value.strip() == value:
        text = value
    else:
        text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 1] + "…"


def value_problems(cfg: DictConfig, rules: dict[str, Rule] = VALUES) -> list[str]:
    """One problem per refused value of ``cfg`` (merged, interpolations resolved or resolvable); numbers given as text
    are written back as numbers. A key that is absent or whose interpolation fails is left to the loader."""
    problems = []
    for key, rule in rules.items():
        try:
            value = OmegaConf.select(cfg, key, default=_ABSENT)
        except (OmegaConfBaseException, ValueError, TypeError):  # an interpolation that fails: reported by the loader
            continue
        if value is _ABSENT:
            continue
        ok, typed = rule.check(value)
        if not ok:
            problems.append(f"{key} ({show(value)}) must be {rule.describe()}")
        elif type(typed) is not type(value) and not isinstance(value, (ListConfig, list)) and \
                not _is_interpolation(cfg, key):  # fmt: skip
            OmegaConf.update(cfg, key, typed, merge=False)  # a number given as text: written back as a number
    return problems


def _is_interpolation(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and OmegaConf.is_interpolation(node, leaf)
