"""``neva config validate``: everything about a training config that can be checked without GPUs.

Rules that need no files always run (batch sizes, schedule, names of templates/projectors/precisions,
data aspect mode); with ``offline=False`` the referenced files are checked too and the LLM ``.nemo``
is read (TP must divide its heads and query groups; the tokenizer must hold the template's special
tokens; an image's token count must fit the sequence length). Every problem names the key and values.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from neva_tools.data.images import ASPECT_MODES
from neva_tools.data.templates import TEMPLATE_NAMES
from neva_tools.model.neva import PROJECTOR_TYPES
from neva_tools.train.run import PRECISIONS


def check_config(cfg: DictConfig, *, offline: bool = True) -> list[str]:
    """All problems found in ``cfg`` (an empty list when it is valid)."""
    problems: list[str] = []
    m = cfg.model
    tp, pp = int(m.tensor_model_parallel_size), int(m.pipeline_model_parallel_size)
    micro, glob = int(m.micro_batch_size), int(m.global_batch_size)
    if tp < 1 or pp < 1 or micro < 1 or glob < 1:
        problems.append(f"model sizes must be positive: TP {tp}, PP {pp}, micro_batch_size {micro}, "
                        f"global_batch_size {glob}")  # fmt: skip
    elif glob % micro:
        problems.append(f"model.global_batch_size ({glob}) must be a multiple of model.micro_batch_size ({micro})")
    if pp != 1:
        problems.append(f"model.pipeline_model_parallel_size ({pp}) must be 1: NeVA training supports TP only")
    if str(m.data.conv_template) not in TEMPLATE_NAMES:
        problems.append(f"model.data.conv_template ({m.data.conv_template}) is not one of {', '.join(TEMPLATE_NAMES)}")
    if str(m.mm_cfg.mm_mlp_adapter_type) not in PROJECTOR_TYPES:
        problems.append(f"model.mm_cfg.mm_mlp_adapter_type ({m.mm_cfg.mm_mlp_adapter_type}) is not one of "
                        f"{', '.join(PROJECTOR_TYPES)}")  # fmt: skip
    if str(m.data.image_aspect_ratio) not in ASPECT_MODES:
        problems.append(f"model.data.image_aspect_ratio ({m.data.image_aspect_ratio}) is not one of "
                        f"{', '.join(ASPECT_MODES)}")  # fmt: skip
    if str(cfg.trainer.precision) not in PRECISIONS:
        problems.append(f"trainer.precision ({cfg.trainer.precision}) is not one of {', '.join(PRECISIONS)}")
    steps, sched = int(cfg.trainer.max_steps), m.optim.sched
    if int(sched.warmup_steps) + int(sched.constant_steps) > steps:
        problems.append(f"model.optim.sched warmup_steps ({sched.warmup_steps}) + constant_steps "
                        f"({sched.constant_steps}) exceed trainer.max_steps ({steps})")  # fmt: skip
    if float(sched.min_lr) > float(m.optim.lr):
        problems.append(f"model.optim.sched.min_lr ({sched.min_lr}) is larger than model.optim.lr ({m.optim.lr})")
    if not m.mm_cfg.llm.freeze and m.mm_cfg.pretrain_mm_mlp_adapter is None:
        problems.append("stage 2 (model.mm_cfg.llm.freeze: false) without model.mm_cfg.pretrain_mm_mlp_adapter: "
                        "the projector would start from scratch; point it at the stage-1 .nemo")  # fmt: skip
    if not offline:
        problems += _check_files(cfg)
    return problems


def _check_files(cfg: DictConfig) -> list[str]:
    from neva_tools.checkpoint import tp as tp_rules
    from neva_tools.data.templates import required_special_tokens
    from neva_tools.errors import NevaError
    from neva_tools.model import neva_io
    from neva_tools.tokenizer.text import TextTokenizer

    m, problems = cfg.model, []
    for key, value in (("model.mm_cfg.llm.from_pretrained", m.mm_cfg.llm.from_pretrained),
                       ("model.mm_cfg.vision_encoder.from_pretrained", m.mm_cfg.vision_encoder.from_pretrained),
                       ("model.data.data_path", m.data.data_path)):  # fmt: skip
        if value is None:
            problems.append(f"{key} is not set")
    llm = m.mm_cfg.llm.from_pretrained
    if llm is not None and not Path(llm).is_file():
        return [*problems, f"model.mm_cfg.llm.from_pretrained ({llm}) does not exist"]
    if llm is None:
        return problems
    cfg_llm, _ = neva_io.llm_config(llm)
    try:
        heads = int(cfg_llm["num_attention_heads"])
        groups = int(cfg_llm.get("num_query_groups") or heads)
        tp_rules.check_divisible(int(m.tensor_model_parallel_size), num_attention_heads=heads, num_query_groups=groups)
    except NevaError as exc:
        problems.append(str(exc))
    tokenizer = m.tokenizer.model or neva_io.extract_tokenizer(llm, neva_io.scratch_dir())
    tok = TextTokenizer(tokenizer)
    missing = [t for t in required_special_tokens(str(m.data.conv_template)) if tok.token_id(t) is None]
    if missing:
        problems.append(f"tokenizer {tokenizer} lacks {missing} needed by template {m.data.conv_template}; add them "
                        "with neva tokenizer add-tokens")  # fmt: skip
    return problems
