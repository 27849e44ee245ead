"""The shapes ``neva plan`` works from: the LLM's, the vision tower's and the run's, read, never typed by hand.

* The LLM: the ``.nemo``'s ``model_config.yaml`` (``model.mm_cfg.llm.from_pretrained``), or ``--llm-config``: a
  Hugging Face ``config.json`` (read by the converter's :class:`~neva_tools.mappings.llama.LlamaArch`, so before
  any download or conversion), a NeMo ``model_config.yaml``, a ``.nemo``, or a directory holding one of them.
  megatron-core's ``TransformerConfig`` (:func:`~neva_tools.model.gpt.transformer_config_from_nemo`) supplies the
  derived sizes (FFN, head width, gated MLP).
* The vision tower: as ``neva config validate`` reads it (:func:`~neva_tools.train.vision_arch.vision_arch`: a local
  HF or open_clip directory, or an open_clip name, which resolves offline). A Hugging Face hub name that is not
  downloaded (``clip-vit-large-patch14-336``, ``siglip-so400m-patch14-384``) is read as the open_clip model of the
  same architecture (:func:`open_clip_equivalent`); ``--vision-config`` names a ``config.json`` instead.
* Image tokens per sample from the recipe's AnyRes / patch-merge settings (:class:`~neva_tools.data.anyres.
  ImageLayout`), the sequence from ``model.data.max_seq_length``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from neva_tools.errors import NevaError
from neva_tools.mappings.clip import ClipVisionArch
from neva_tools.tokenizer.vocab import DEFAULT_DIVISIBLE_BY, padded_vocab_size

logger = logging.getLogger(__name__)

_HF_CLIP = re.compile(r"clip-vit-(base|large|huge)-patch(\d+)(?:-(\d+))?$")
_HF_SIGLIP = re.compile(r"siglip-so400m-patch(\d+)-(\d+)$")
_SIZES = {"base": "B", "large": "L", "huge": "H"}


@dataclass(frozen=True)
class LlmShape:
    """The LLM's sizes, as megatron-core builds it."""

    num_layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int
    kv_channels: int
    vocab: int
    gated: bool
    normalization: str  # megatron-core's: RMSNorm or LayerNorm
    bias: bool
    qkv_bias: bool
    tied: bool
    divisible_by: int = DEFAULT_DIVISIBLE_BY
    source: str = ""

    def padded_vocab(self, tp: int) -> int:
        """The vocabulary rows at ``tp`` (megatron's ``make_vocab_size_divisible_by`` × TP padding)."""
        return padded_vocab_size(self.vocab, tp, self.divisible_by)

    @classmethod
    def from_nemo_config(cls, cfg: dict[str, Any], vocab: int, source: str) -> LlmShape:
        """From NeMo ``model:`` keys through megatron-core's ``TransformerConfig``."""
        from neva_tools.model.gpt import gpt_model_kwargs, transformer_config_from_nemo

        base = {k: v for k, v in cfg.items() if k not in ("tensor_model_parallel_size", "pipeline_model_parallel_size")}
        config = transformer_config_from_nemo(base)
        return cls(num_layers=config.num_layers, hidden=config.hidden_size, ffn=config.ffn_hidden_size,
                   heads=config.num_attention_heads, groups=config.num_query_groups or config.num_attention_heads,
                   kv_channels=config.kv_channels, vocab=int(vocab), gated=bool(config.gated_linear_unit),
                   normalization=config.normalization, bias=bool(config.add_bias_linear),
                   qkv_bias=bool(config.add_qkv_bias),
                   tied=gpt_model_kwargs(base)["share_embeddings_and_output_weights"],
                   divisible_by=int(cfg.get("make_vocab_size_divisible_by") or DEFAULT_DIVISIBLE_BY),
                   source=source)  # fmt: skip


@dataclass(frozen=True)
class VisionShape:
    """The vision tower as NeVA builds it: the layers up to ``select_layer``."""

    arch: ClipVisionArch
    select_layer: int = -2
    source: str = ""

    @property
    def siglip(self) -> bool:
        from neva_tools.mappings.siglip import vision_model_type

        return vision_model_type(self.arch) == "siglip"

    @property
    def layers(self) -> int:
        return self.arch.kept_layers(self.select_layer)

    @property
    def patches(self) -> int:
        """Features one tile gives (a ``patch_size`` stride convolution drops any remainder)."""
        return (self.arch.image_size // self.arch.patch_size) ** 2

    @property
    def tokens(self) -> int:
        """The tower's sequence: patches, plus CLIP's class token."""
        return self.patches + (0 if self.siglip else 1)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise NevaError(f"cannot read {path} as YAML: {exc}") from None
    if not isinstance(data, dict):
        raise NevaError(f"{path} must hold a mapping of NeMo model keys, found {type(data).__name__}")
    return data.get("model") if isinstance(data.get("model"), dict) else data


def llm_shape(source: str | Path) -> LlmShape:
    """The LLM of a ``.nemo``, a NeMo ``model_config.yaml``, a HF ``config.json``, or a directory with one."""
    from neva_tools.checkpoint.hf_reader import read_json_object
    from neva_tools.mappings.llama import LlamaArch

    path = Path(source).expanduser()
    if path.is_dir():
        found = next((path / n for n in ("config.json", "model_config.yaml") if (path / n).is_file()), None)
        if found is None:
            raise NevaError(f"{path} holds neither config.json (Hugging Face) nor model_config.yaml (NeMo); give "
                            "--llm-config the file itself")  # fmt: skip
        path = found
    if not path.is_file():
        raise NevaError(f"LLM config {source} does not exist; give --llm-config a .nemo, a model_config.yaml or a "
                        "Hugging Face config.json (or its directory)")  # fmt: skip
    if path.suffix == ".json":
        hf = read_json_object(path, "the LLM's config")
        arch = LlamaArch.from_hf_config(hf, source=str(path))
        return LlmShape.from_nemo_config(arch.to_nemo_model_config(), arch.vocab_size, str(path))
    if path.suffix in (".yaml", ".yml"):
        cfg = _read_yaml(path)
        vocab = cfg.get("vocab_size") or (cfg.get("hf_config") or {}).get("vocab_size")
        if not isinstance(vocab, int):
            raise NevaError(f"{path} has no vocab_size; give --llm-config the .nemo (its tokenizer gives it) or the "
                            "Hugging Face config.json")  # fmt: skip
        return LlmShape.from_nemo_config(cfg, vocab, str(path))
    from neva_tools.model.neva_io import llm_config

    cfg, vocab = llm_config(path)
    return LlmShape.from_nemo_config(cfg, vocab, str(path))


def open_clip_equivalent(source: str) -> str | None:
    """The open_clip model with the architecture of a Hugging Face CLIP / SigLIP hub name (``openai/clip-vit-large-
    patch14-336`` → ``ViT-L-14-336``, ``google/siglip-so400m-patch14-384`` → ``ViT-SO400M-14-SigLIP-384``)."""
    name = source.rstrip("/").rsplit("/", 1)[-1]
    if match := _HF_CLIP.match(name):
        size, patch, res = match.groups()
        return f"ViT-{_SIZES[size]}-{patch}" + (f"-{res}" if res else "")
    if match := _HF_SIGLIP.match(name):
        return f"ViT-SO400M-{match.group(1)}-SigLIP-{match.group(2)}"
    return None


def vision_shape(source: str, select_layer: int = -2, config: str | Path | None = None) -> VisionShape:
    """The vision tower of ``vision_encoder.from_pretrained`` (or of the ``config`` HF ``config.json``/directory)."""
    from neva_tools.mappings.siglip import hf_vision_arch
    from neva_tools.train.vision_arch import vision_arch

    if config is not None:
        path = Path(config).expanduser()
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise NevaError(f"--vision-config {config}: no such file (a Hugging Face CLIP/SigLIP config.json)")
        return VisionShape(hf_vision_arch(json.loads(path.read_text()), source=str(path)), select_layer, str(path))
    arch = vision_arch(source)
    if arch is None and (alias := open_clip_equivalent(source)) is not None:
        arch = vision_arch(alias)
        if arch is not None:
            logger.info("vision encoder %s is not here: read as open_clip's %s (the same architecture)", source, alias)
            source = f"{source} (as open_clip {alias})"
    if arch is None:
        raise NevaError(f"model.mm_cfg.vision_encoder.from_pretrained ({source}) is neither a local directory nor an "
                        "open_clip name; give --vision-config its config.json (or an open_clip name such as "
                        "ViT-L-14-336)")  # fmt: skip
    return VisionShape(arch, select_layer, source)
