"""NeMo's architecture keys, checked against the checkpoints they describe.

In NeMo's ``neva_config.yaml`` the LLM's and the vision encoder's sizes are written out by hand; here they are read
from the LLM ``.nemo`` and the vision encoder. A value the config sets anyway (NeMo's files always do) must agree:
each disagreement is a problem naming the key, both values and the checkpoint (``neva_tools.config.nemo_keys``
lists the keys as *derived*).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def _activation(value: Any) -> str:
    return str(value).lower().removeprefix("fast-").replace("_", "-")


def _llm_values(llm: Mapping[str, Any]) -> dict[str, tuple[Any, Callable[[Any], Any]]]:
    """key → (the checkpoint's value, normaliser applied to both sides)."""
    heads = int(llm["num_attention_heads"])
    hidden = int(llm["hidden_size"])
    seq = llm.get("encoder_seq_length") or llm.get("max_position_embeddings")
    return {
        "num_layers": (llm["num_layers"], int),
        "hidden_size": (hidden, int),
        "ffn_hidden_size": (llm["ffn_hidden_size"], int),
        "num_attention_heads": (heads, int),
        "num_query_groups": (llm.get("num_query_groups") or heads, int),
        "kv_channels": (llm.get("kv_channels") or hidden // heads, int),
        "max_position_embeddings": (llm.get("max_position_embeddings") or seq, int),
        "position_embedding_type": (llm.get("position_embedding_type", "learned_absolute"), str),
        "normalization": (llm.get("normalization", "layernorm"), lambda v: str(v).lower()),
        "layernorm_epsilon": (llm.get("layernorm_epsilon", 1e-5), float),
        "bias": (llm.get("bias", True), bool),
        "activation": (llm.get("activation", "gelu"), _activation),
        "rotary_percentage": (llm.get("rotary_percentage", 1.0), float),
        "rotary_base": (llm.get("rotary_base", 10000), float),
        "seq_len_interpolation_factor": (llm.get("seq_len_interpolation_factor"), lambda v: v),
        "share_embeddings_and_output_weights": (llm.get("share_embeddings_and_output_weights", True), bool),
    }


def _agree(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-6)
    return a == b


def llm_problems(cfg: DictConfig, llm_path: str | Path, llm: Mapping[str, Any]) -> list[str]:
    """The LLM architecture keys ``cfg.model`` sets that disagree with the LLM ``.nemo``'s config ``llm``."""
    problems = []
    for key, (found, norm) in _llm_values(llm).items():
        given = OmegaConf.select(cfg, f"model.{key}", default=None)
        if given is None:
            continue
        try:
            mine, theirs = norm(given), (norm(found) if found is not None else None)
        except (TypeError, ValueError):
            mine, theirs = given, found
        if not _agree(mine, theirs):
            problems.append(f"model.{key} is {given} in the config but the LLM {llm_path} has {found}: the LLM's "
                            f"architecture comes from its .nemo; delete the key or set it to {found}")  # fmt: skip
    return problems


def vision_problems(cfg: DictConfig, arch: Any) -> list[str]:
    """The vision keys (``mm_cfg.vision_encoder.*``, ``data.image_token_len``) that disagree with the encoder."""
    from neva_tools.mappings.siglip import vision_model_type

    ve = cfg.model.mm_cfg.vision_encoder
    source = ve.from_pretrained
    class_tokens = 0 if "siglip" in str(vision_model_type(arch)).lower() else 1
    found = {
        "model.mm_cfg.vision_encoder.patch_dim": arch.patch_size,
        "model.mm_cfg.vision_encoder.hidden_size": arch.hidden_size,
        "model.mm_cfg.vision_encoder.class_token_length": class_tokens,
        "model.mm_cfg.vision_encoder.crop_size": [arch.image_size, arch.image_size],
        "model.data.image_token_len": arch.num_patches,
    }
    problems = []
    for key, value in found.items():
        given = OmegaConf.select(cfg, key, default=None)
        if given is None:
            continue
        if isinstance(given, ListConfig):
            given = OmegaConf.to_container(given)
        mine = [given, given] if key.endswith("crop_size") and isinstance(given, int) else given
        if mine != value:
            shown = f"{value[0]}×{value[1]} (image_size {arch.image_size})" if isinstance(value, list) else value
            problems.append(f"{key} is {given} in the config but the vision encoder {source} has {shown}: it comes "
                            f"from the encoder; delete the key or set it to {value}")  # fmt: skip
    problems += from_hf_problems(cfg)
    return problems


def from_hf_problems(cfg: DictConfig) -> list[str]:
    """``vision_encoder.from_hf: true`` must name a Hugging Face directory (``config.json``), not an open_clip one."""
    ve = cfg.model.mm_cfg.vision_encoder
    source = str(ve.from_pretrained or "")
    path = Path(source)
    is_hf = path.is_dir() and (path / "config.json").is_file()
    if bool(ve.from_hf) and source and not is_hf and (path.is_dir() or ":" in source):
        kind = "an open_clip directory" if path.is_dir() else "an open_clip NAME:CHECKPOINT"
        return [f"model.mm_cfg.vision_encoder.from_hf is true but from_pretrained ({source}) is {kind}; set "
                "from_hf: false (or point from_pretrained at a Hugging Face CLIPVisionModel directory)"]  # fmt: skip
    return []
