"""Checks of the ``model.text_pretrain`` block (text-only continued pretraining) that need no GPU.

``text_problems`` complements ``neva_tools.train.validate.check_config``: with ``text_pretrain.enabled`` the
NeVA-only keys (vision encoder, ``model.data.*``, templates) do not apply, and these rules do. With
``offline=False`` the dataset prefixes and the LLM ``.nemo`` are read too, and a mixture YAML's values are checked
against the config (``neva_tools.train.text_mixture``).
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig

from neva_tools.errors import NevaError


def split_shares(split: str) -> list[float]:
    """The train/valid/test shares of a Megatron split string (``"99,1,0"``), missing ones 0; NevaError if malformed."""
    parts = [p.strip() for p in str(split).split(",")]
    if len(parts) > 3 or not all(re.fullmatch(r"\d+(\.\d*)?", p) for p in parts):
        raise NevaError(f"model.text_pretrain.split ({split}) must be up to three non-negative numbers, e.g. 99,1,0")
    shares = [float(p) for p in parts] + [0.0] * (3 - len(parts))
    if shares[0] <= 0:
        raise NevaError(f"model.text_pretrain.split ({split}) gives the train split no share")
    return shares


def text_problems(cfg: DictConfig, *, offline: bool = True) -> list[str]:
    """Every problem of the text-pretraining keys of ``cfg`` (empty when they are valid or the mode is off)."""
    t = cfg.model.text_pretrain
    if not t.enabled:
        return []
    problems: list[str] = []
    seq, every, iters = int(t.seq_length), int(t.eval_interval), int(t.eval_iters)
    if seq < 1:
        problems.append(f"model.text_pretrain.seq_length ({seq}) must be positive")
    if every < 0 or (every > 0 and iters < 1):
        problems.append(f"model.text_pretrain.eval_interval ({every}) must be 0 (off) or positive with "
                        f"model.text_pretrain.eval_iters ({iters}) positive")  # fmt: skip
    try:
        shares = split_shares(t.split)
        if every > 0 and shares[1] <= 0:
            problems.append(f"model.text_pretrain.split ({t.split}) gives the validation split no share but "
                            f"model.text_pretrain.eval_interval is {every}; give it one (98,2,0) or set 0")  # fmt: skip
    except NevaError as exc:
        problems.append(str(exc))
    if t.data_path is None:
        problems.append("model.text_pretrain.data_path is not set (a blend such as neva data mixture's DATA_PATH)")
    llm = cfg.model.mm_cfg.llm.from_pretrained
    if llm is None:
        problems.append("model.mm_cfg.llm.from_pretrained is not set (the LLM .nemo to pretrain)")
    if offline:
        return problems
    if t.data_path is not None:
        from neva_tools.data.gpt_blend import parse_blend
        from neva_tools.train.text_mixture import apply_mixture

        try:
            parse_blend(t.data_path)
            apply_mixture(cfg)  # a mixture YAML's TRAIN_ITERS, GLOBAL_BATCH_SIZE, SEQ_LEN against the config's
        except NevaError as exc:
            problems.append(str(exc))
    if llm is not None and not Path(llm).is_file():
        problems.append(f"model.mm_cfg.llm.from_pretrained ({llm}) does not exist")
    return problems
