"""``neva import hf-llava``: a Hugging Face ``LlavaForConditionalGeneration`` directory → a NeVA ``.nemo``.

The inverse of ``neva export hf-llava``, so existing llava-hf checkpoints (LLaVA-1.5 7B/13B shapes) can be
finetuned: the LLM in megatron-core names split for ``--tp`` (the ``hf-to-nemo`` table and rules), the projector
under NeMo's ``mm_projector`` names and the CLIP tower under NeMo-1's ``vision_encoder`` names (both replicated on
every rank), the tokenizer files, and a config with ``mm_cfg``, ``data`` and ``vision`` (``hf_config`` included),
so ``neva export hf-llava`` needs nothing else. Both weight layouts are read: llava-hf's
(``language_model.model.*``, ``vision_tower.vision_model.*``) and transformers 5's (``model.language_model.*``,
``model.vision_tower.*``, ``lm_head.*``). Tensors are streamed; unknown or missing ones are listed.

A model exported by us (``neva_export.json``) gets its conversation template back, and the ``<image>`` row the
export appended to the vocabulary is removed, so ``import(export(x))`` equals ``x`` tensor for tensor (the
vocabulary padding rows, which no token reaches, are written as zeros).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from neva_tools.checkpoint import tp as tp_rules
from neva_tools.checkpoint.hf_reader import HFCheckpoint, resolve_hf_input
from neva_tools.checkpoint.nemo_archive import CONFIG_NAME, weights_member
from neva_tools.checkpoint.nemo_writer import NemoWriter
from neva_tools.convert.hf_to_nemo import DTYPES, check_tensors, nemo_config, nemo_tensor, source_dtype
from neva_tools.convert.tokenizer_files import add_tokenizer
from neva_tools.data.templates import get_template
from neva_tools.errors import NevaError
from neva_tools.export.hf_llava import PROVENANCE
from neva_tools.export.vision import NEMO_VISION_PREFIX
from neva_tools.mappings.clip import HF_PREFIX, ClipVisionArch, hf_clip_state_to_mcore
from neva_tools.mappings.llama import LlamaArch
from neva_tools.mappings.projector import nemo_to_llava_hf
from neva_tools.tokenizer.vocab import DEFAULT_DIVISIBLE_BY, padded_vocab_size
from neva_tools.utils.atomic import HF_MODEL_DIR, NEMO_FILE, atomic_path, check_output_path
from neva_tools.utils.log import progress

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "vicuna_v1"  # LLaVA-1.5's conversation format
#: (prefix, part, replacement) for both layouts; longer prefixes first.
_LAYOUT = (
    ("language_model.model.", "llm", "model."),
    ("language_model.lm_head.", "llm", "lm_head."),
    ("model.language_model.", "llm", "model."),
    ("lm_head.", "llm", "lm_head."),
    ("model.vision_tower.vision_model.", "vision", ""),
    ("model.vision_tower.", "vision", ""),
    ("vision_tower.vision_model.", "vision", ""),
    ("vision_tower.", "vision", ""),
    ("model.multi_modal_projector.", "projector", "multi_modal_projector."),
    ("multi_modal_projector.", "projector", "multi_modal_projector."),
)
_VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


class LlavaTensors:
    """The tensors of a llava-hf directory by part (``llm`` HF LLM names, ``vision`` CLIP names, ``projector``).

    ``llm`` behaves like an ``HFCheckpoint`` of the language model alone (``names``/``shape``/``get``), with the
    vocabulary cut to ``vocab`` rows when set.
    """

    def __init__(self, ckpt: HFCheckpoint) -> None:
        self.ckpt, self.path = ckpt, ckpt.path
        self.parts: dict[str, dict[str, str]] = {"llm": {}, "vision": {}, "projector": {}}
        unknown = []
        for name in ckpt.names():
            match = next(((part, new + name[len(prefix) :]) for prefix, part, new in _LAYOUT
                          if name.startswith(prefix)), None)  # fmt: skip
            if match is None:
                unknown.append(name)
                continue
            part, inner = match
            if inner in self.parts[part]:
                raise NevaError(f"{ckpt.path}: {name} and {self.parts[part][inner]} are the same tensor in the two "
                                "llava-hf layouts; keep one")  # fmt: skip
            self.parts[part][inner] = name
        if unknown:
            raise NevaError(f"{ckpt.path}: tensors outside a LLaVA model (language_model, vision_tower, "
                            f"multi_modal_projector): {', '.join(unknown[:20])}")  # fmt: skip
        self.vocab: int | None = None

    def names(self) -> list[str]:
        """The language model's HF tensor names."""
        return sorted(self.parts["llm"])

    def shape(self, name: str) -> tuple[int, ...]:
        """An LLM tensor's shape (vocabulary cut to ``vocab``)."""
        shape = self.ckpt.shape(self.parts["llm"][name])
        return (self.vocab, *shape[1:]) if self.vocab is not None and name in _VOCAB_ROWS else shape

    def get(self, name: str, copy: bool = True) -> torch.Tensor:
        """An LLM tensor (vocabulary cut to ``vocab``)."""
        tensor = self.ckpt.get(self.parts["llm"][name], copy=copy)
        return tensor[: self.vocab] if self.vocab is not None and name in _VOCAB_ROWS else tensor

    def part(self, part: str) -> dict[str, torch.Tensor]:
        """All tensors of the vision tower or the projector."""
        return {inner: self.ckpt.get(name) for inner, name in self.parts[part].items()}


def _provenance(src: Path) -> dict[str, Any]:
    path = src / PROVENANCE
    return json.loads(path.read_text()) if path.is_file() else {}


def _processor_settings(src: Path) -> dict[str, Any]:
    """The image processor settings (``processor_config.json`` of transformers 5, else ``preprocessor_config.json``)."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = src / name
        if path.is_file():
            data = json.loads(path.read_text())
            return data.get("image_processor", data)
    return {}


def read_llava_config(cfg: dict[str, Any], where: str) -> tuple[LlamaArch, ClipVisionArch, int, dict[str, Any]]:
    """(LLM architecture, vision architecture, vision feature layer, LLM config) of a llava-hf ``config.json``.

    Sparse configs (llava-hf's LLaVA-1.5 omits every default) are completed by transformers' ``LlavaConfig``.
    """
    from transformers import LlavaConfig

    if cfg.get("model_type") != "llava":
        raise NevaError(f"{where}: model_type {cfg.get('model_type')!r} is not 'llava' (LlavaForConditionalGeneration);"
                        " for a language model use `neva convert hf-to-nemo`")  # fmt: skip
    try:
        full = LlavaConfig.from_dict(cfg)
    except (TypeError, ValueError) as exc:
        raise NevaError(f"{where}: not a valid LlavaConfig ({exc})") from None
    for key, wanted in (("vision_feature_select_strategy", "default"), ("projector_hidden_act", "gelu"),
                        ("multimodal_projector_bias", True)):  # fmt: skip
        if getattr(full, key) != wanted:
            raise NevaError(f"{where}: {key} {getattr(full, key)!r} is not supported (NeVA: {wanted!r})")
    layer = full.vision_feature_layer
    if not isinstance(layer, int):
        raise NevaError(f"{where}: vision_feature_layer {layer!r} (several layers) is not supported; NeVA uses one")
    text = full.text_config.to_dict()
    arch = LlamaArch.from_hf_config(text, source=f"{where} text_config")
    vision = ClipVisionArch.from_hf_config(full.vision_config.to_dict(), source=f"{where} vision_config")
    vision.kept_layers(layer)
    return arch, vision, layer, full.text_config.to_diff_dict()


def import_hf_llava(
    source: str | Path,
    output: str | Path,
    *,
    tp: int = 1,
    template: str | None = None,
    dtype: str | None = None,
    vision_dir: str | Path | None = None,
    divisible_by: int = DEFAULT_DIVISIBLE_BY,
    overwrite: bool = False,
) -> Path:
    """Convert llava-hf directory (or hub id) ``source`` to the NeVA ``.nemo`` ``output``; see the module docstring.

    ``vision_dir`` also writes the CLIP tower as a HF ``CLIPVisionModel`` directory there and points
    ``mm_cfg.vision_encoder.from_pretrained`` at it (what ``neva train`` reads). ``overwrite`` applies to both.
    """
    start = time.perf_counter()
    output = Path(output)
    check_output_path(output, overwrite, NEMO_FILE)
    if vision_dir is not None:
        check_output_path(Path(vision_dir), overwrite, HF_MODEL_DIR)
    src = resolve_hf_input(str(source))
    with HFCheckpoint(src) as ckpt:
        where = str(src / "config.json")
        arch, varch, layer, text_cfg = read_llava_config(ckpt.config, where)
        provenance = _provenance(src)
        tensors = LlavaTensors(ckpt)
        if provenance.get("appended_image_row") and provenance.get("image_token_index") == arch.vocab_size - 1:
            arch = arch.replace(vocab_size=arch.vocab_size - 1)  # the row `neva export` appended for <image>
            tensors.vocab = arch.vocab_size
        tp_rules.check_divisible(tp, num_attention_heads=arch.num_heads, num_query_groups=arch.num_groups)
        tp_rules.check_divisible(tp, vision_num_attention_heads=varch.num_heads)
        check_tensors(tensors, arch)
        vision = {n: t for n, t in tensors.part("vision").items() if n != "embeddings.position_ids"}  # a buffer
        hf_clip_state_to_mcore(vision, varch, select_layer=-1)  # every vision name and shape checked
        projector = _projector(tensors, arch.hidden_size, varch.hidden_size, where)
        dtype = dtype or source_dtype({**text_cfg, **ckpt.config})
        if dtype not in DTYPES:
            raise NevaError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        tpl = get_template(template or provenance.get("template") or DEFAULT_TEMPLATE).name
        if template is None and "template" not in provenance:
            logger.info("no --template given: using %s (LLaVA-1.5's conversation format)", tpl)
        settings = _processor_settings(src)
        aspect = provenance.get("image_aspect_ratio") or ("square" if settings.get("do_pad") is False else "pad")
        vision_path = _write_vision_dir(vision_dir, vision, varch.to_hf_config(), overwrite) if vision_dir else None
        cfg = nemo_config(arch, text_cfg, tp, dtype, divisible_by)
        cfg.update(
            mm_cfg={
                "llm": {"from_pretrained": str(output.resolve()), "freeze": False, "model_type": tpl},
                "vision_encoder": {"from_pretrained": vision_path, "from_hf": True, "vision_select_layer": layer,
                                   "freeze": True},
                "pretrain_mm_mlp_adapter": str(output.resolve()),
                "mm_mlp_adapter_type": "mlp2x_gelu",
            },
            data={"conv_template": tpl, "image_aspect_ratio": aspect},
            vision={"image_size": varch.image_size, "patch_size": varch.patch_size, "source": str(src),
                    "hf_config": varch.to_hf_config()},
        )  # fmt: skip
        padded = padded_vocab_size(arch.vocab_size, tp, divisible_by)
        torch_dtype = DTYPES[dtype]
        extras = {n: t.to(torch_dtype) for n, t in projector.items()}
        extras.update({f"{NEMO_VISION_PREFIX}{HF_PREFIX}{n}": t.to(torch_dtype) for n, t in vision.items()})
        with NemoWriter(output, overwrite=overwrite) as writer:
            section = add_tokenizer(writer, src)
            if section is None:
                raise NevaError(f"{src} has no tokenizer files (tokenizer.model or tokenizer.json)")
            cfg["tokenizer"] = section
            writer.add_yaml(CONFIG_NAME, cfg)
            for rank in progress(range(tp), desc="import hf-llava", unit="rank"):
                state = {name: tp_rules.shard(nemo_tensor(tensors, arch, hf, split, torch_dtype), split, tp, rank,
                                              padded_vocab=padded)
                         for name, hf, split in arch.entries()}  # fmt: skip
                state.update(extras)
                writer.add_torch(weights_member(rank, tp), state)
                del state
    logger.info("imported %s to %s (TP=%d, template %s) in %.1f s", src, output, tp, tpl, time.perf_counter() - start)
    return output


def _projector(tensors: LlavaTensors, llm_hidden: int, vision_hidden: int, where: str) -> dict[str, torch.Tensor]:
    """The projector under NeMo's ``mm_projector`` names, its names and shapes checked."""
    found = tensors.part("projector")
    names = nemo_to_llava_hf("mlp2x_gelu")
    expected = {
        "multi_modal_projector.linear_1.weight": (llm_hidden, vision_hidden),
        "multi_modal_projector.linear_1.bias": (llm_hidden,),
        "multi_modal_projector.linear_2.weight": (llm_hidden, llm_hidden),
        "multi_modal_projector.linear_2.bias": (llm_hidden,),
    }
    if set(found) != set(expected):
        raise NevaError(f"{where}: the projector tensors are {sorted(found)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        if tuple(found[name].shape) != shape:
            raise NevaError(f"{where}: {name} has shape {tuple(found[name].shape)}, expected {shape}")
    return {nemo: found[hf] for nemo, hf in names.items()}


def _write_vision_dir(directory: str | Path, vision: dict[str, torch.Tensor], config: dict[str, Any],
                      overwrite: bool) -> str:  # fmt: skip
    """Write the tower as a HF ``CLIPVisionModel`` directory (transformers 5 names); return its absolute path."""
    from safetensors.torch import save_file

    target = Path(directory)
    with atomic_path(target, kind=HF_MODEL_DIR, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps({**config, "architectures": ["CLIPVisionModel"]}, indent=2))
        save_file({n: t.contiguous() for n, t in vision.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip
    return str(target.resolve())
