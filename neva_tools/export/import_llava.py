"""``neva import hf-llava``: a Hugging Face LLaVA, LLaVA-NeXT or LLaVA-OneVision directory → a NeVA ``.nemo``.

The inverse of ``neva export hf-llava``, so existing llava-hf / lmms-lab checkpoints can be finetuned: the class is
read from ``config.json`` (``model_type`` ``llava``, ``llava_next``, ``llava_onevision``;
``neva_tools.mappings.llava_hf``). The ``.nemo`` holds the LLM in megatron-core names split for ``--tp`` (the
``hf-to-nemo`` table and rules), the projector under NeMo's ``mm_projector`` names (replicated; LLaVA-NeXT's and
OneVision's ``image_newline`` next to it, as ``neva train`` saves it), the vision tower, the tokenizer files, and a
config with ``mm_cfg``, ``data`` and ``vision`` (``hf_config`` included), so ``neva export hf-llava`` needs nothing
else. The tower of a CLIP ``LlavaForConditionalGeneration`` keeps NeMo-1's form (HF names under ``vision_encoder``,
replicated); every other tower (SigLIP, and the NeXT/OneVision models') is stored as ``neva train`` stores a
trained one (``model.vision_model.*`` split for ``--tp`` by the CLIP/SigLIP table, the layers up to the feature
layer, ``vision.arch`` and ``vision.stored``: ``neva_tools.checkpoint.nemo_vision``), so ``neva generate``,
``neva eval``, the next ``neva train`` stage and ``neva repartition`` read it from the ``.nemo``. AnyRes models get
their keys: ``data.image_aspect_ratio`` (``anyres``, or OneVision's ``vision_aspect_ratio`` ``anyres_max_N``),
``data.image_grid_pinpoints`` (``[height, width]`` pairs, transformers' order and ours) and
``mm_cfg.mm_patch_merge_type: spatial_unpad``. Both weight layouts are read: llava-hf's
(``language_model.model.*``, ``vision_tower.vision_model.*``, ``image_newline``) and transformers 5's
(``model.language_model.*``, ``model.vision_tower.*``, ``lm_head.*``, ``model.image_newline``). Tensors are
streamed; unknown or missing ones are listed.

A model exported by us (``neva_export.json``) gets its conversation template back, and the ``<image>`` (OneVision:
and ``<video>``) rows the export appended to the vocabulary are removed, so ``import(export(x))`` equals ``x`` tensor
for tensor (the vocabulary padding rows, which no token reaches, are written as zeros).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neva_tools.checkpoint import nemo_vision
from neva_tools.checkpoint import tp as tp_rules
from neva_tools.checkpoint.hf_reader import HFCheckpoint, resolve_hf_input
from neva_tools.checkpoint.nemo_archive import CONFIG_NAME, weights_member
from neva_tools.checkpoint.nemo_writer import NemoWriter
from neva_tools.convert.hf_to_nemo import DTYPES, check_tensors, nemo_config, nemo_tensor, source_dtype
from neva_tools.convert.tokenizer_files import add_tokenizer
from neva_tools.data.anyres import ImageLayout
from neva_tools.data.templates import get_template
from neva_tools.errors import NevaError
from neva_tools.export.hf_llava import PROVENANCE
from neva_tools.export.vision import NEMO_VISION_PREFIX, hf_to_mcore
from neva_tools.mappings import llava_hf, siglip
from neva_tools.mappings.clip import HF_PREFIX, ClipVisionArch
from neva_tools.mappings.llama import LlamaArch
from neva_tools.mappings.llava_hf import HfLlavaFormat
from neva_tools.mappings.projector import nemo_to_llava_hf
from neva_tools.tokenizer.vocab import DEFAULT_DIVISIBLE_BY, padded_vocab_size
from neva_tools.utils.atomic import HF_MODEL_DIR, NEMO_FILE, atomic_path, check_output_path
from neva_tools.utils.log import progress

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "vicuna_v1"  # LLaVA-1.5's conversation format
#: The conversation template of an LLM family when the directory was not exported by us (llava-hf's LLaVA-NeXT
#: Mistral: [INST]; LLaVA-OneVision and LLaVA-NeXT Qwen: ChatML); other families: :data:`DEFAULT_TEMPLATE`.
FAMILY_TEMPLATES = {"mistral": "mistral", "qwen2": "chatml"}
_VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


class LlavaTensors:
    """The tensors of a llava-hf directory by part (``llm`` HF LLM names, ``vision`` tower names, ``projector``
    llava-hf names with ``image_newline``; ``neva_tools.mappings.llava_hf.LAYOUT``).

    ``llm`` behaves like an ``HFCheckpoint`` of the language model alone (``names``/``shape``/``get``), with the
    vocabulary cut to ``vocab`` rows when set.
    """

    def __init__(self, ckpt: HFCheckpoint) -> None:
        self.ckpt, self.path = ckpt, ckpt.path
        self.parts: dict[str, dict[str, str]] = {"llm": {}, "vision": {}, "projector": {}}
        unknown = []
        for name in ckpt.names():
            match = llava_hf.locate(name)
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
                            f"multi_modal_projector, image_newline): {', '.join(unknown[:20])}")  # fmt: skip
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


@dataclass(frozen=True)
class HfLlavaConfig:
    """What a Hugging Face LLaVA ``config.json`` says about the NeVA model it holds."""

    fmt: HfLlavaFormat
    arch: LlamaArch  # the LLM
    vision: ClipVisionArch  # a ``SiglipVisionArch`` for SigLIP towers
    layer: int  # vision_feature_layer = NeVA's vision_select_layer
    text: dict[str, Any]  # the LLM's own config (non-default keys)
    data: dict[str, Any] = field(default_factory=dict)  # AnyRes: image_aspect_ratio, image_grid_pinpoints
    merge: str = "flat"  # mm_patch_merge_type


def read_hf_llava_config(cfg: dict[str, Any], where: str) -> HfLlavaConfig:
    """The model a LLaVA / LLaVA-NeXT / LLaVA-OneVision ``config.json`` describes, checked against what NeVA runs.

    Sparse configs (llava-hf's omit every default) are completed by the class's transformers config.
    """
    import transformers

    fmt = llava_hf.by_model_type(cfg.get("model_type"), where)
    try:
        full = getattr(transformers, fmt.config_class).from_dict(cfg)
    except (TypeError, ValueError) as exc:
        raise NevaError(f"{where}: not a valid {fmt.config_class} ({exc})") from None
    vision = siglip.hf_vision_arch(full.vision_config.to_dict(), source=f"{where} vision_config")
    kind = siglip.vision_model_type(vision)
    checks = (("vision_feature_select_strategy", llava_hf.select_strategy(kind)), ("projector_hidden_act", "gelu"),
              ("multimodal_projector_bias", True))  # fmt: skip
    for key, wanted in checks:
        if getattr(full, key) != wanted:
            raise NevaError(f"{where}: {key} {getattr(full, key)!r} is not supported with a {kind} tower "
                            f"(NeVA: {wanted!r})")  # fmt: skip
    layer = full.vision_feature_layer
    if not isinstance(layer, int):
        raise NevaError(f"{where}: vision_feature_layer {layer!r} (several layers) is not supported; NeVA uses one")
    text = full.text_config.to_dict()
    arch = LlamaArch.from_hf_config(text, source=f"{where} text_config")
    vision.kept_layers(layer)
    if not fmt.tiled:
        return HfLlavaConfig(fmt, arch, vision, layer, full.text_config.to_diff_dict())
    aspect = str(getattr(full, "vision_aspect_ratio", "anyres"))
    pinpoints = [[int(h), int(w)] for h, w in full.image_grid_pinpoints]
    try:  # the same checks as training's (multiples of the tower's image size, anyres_max_N)
        ImageLayout(vision.image_size, vision.patch_size, aspect, tuple(map(tuple, pinpoints)), "spatial_unpad")
    except NevaError as exc:
        raise NevaError(f"{where}: {exc}") from None
    data = {"image_aspect_ratio": aspect, "image_grid_pinpoints": pinpoints}
    return HfLlavaConfig(fmt, arch, vision, layer, full.text_config.to_diff_dict(), data, "spatial_unpad")


def read_llava_config(cfg: dict[str, Any], where: str) -> tuple[LlamaArch, ClipVisionArch, int, dict[str, Any]]:
    """(LLM architecture, vision architecture, vision feature layer, LLM config) of a LLaVA-family ``config.json``
    (:func:`read_hf_llava_config`)."""
    read = read_hf_llava_config(cfg, where)
    return read.arch, read.vision, read.layer, read.text


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

    ``vision_dir`` also writes the vision tower as a HF ``CLIPVisionModel`` / ``SiglipVisionModel`` directory there
    and points ``mm_cfg.vision_encoder.from_pretrained`` at it (what ``neva train`` reads). ``overwrite`` applies to
    both.
    """
    start = time.perf_counter()
    output = Path(output)
    check_output_path(output, overwrite, NEMO_FILE)
    if vision_dir is not None:
        check_output_path(Path(vision_dir), overwrite, HF_MODEL_DIR)
    src = resolve_hf_input(str(source))
    with HFCheckpoint(src) as ckpt:
        where = str(src / "config.json")
        read = read_hf_llava_config(ckpt.config, where)
        arch, varch, layer, text_cfg = read.arch, read.vision, read.layer, read.text
        provenance = _provenance(src)
        tensors = LlavaTensors(ckpt)
        rows = int(provenance.get("appended_rows", int(bool(provenance.get("appended_image_row")))))
        last = max(int(provenance.get("image_token_index", -1)), int(provenance.get("video_token_index") or -1))
        if rows and last == arch.vocab_size - 1:
            arch = arch.replace(vocab_size=arch.vocab_size - rows)  # the rows `neva export` appended (<image>, <video>)
            tensors.vocab = arch.vocab_size
        tp_rules.check_divisible(tp, num_attention_heads=arch.num_heads, num_query_groups=arch.num_groups)
        tp_rules.check_divisible(tp, vision_num_attention_heads=varch.num_heads)
        check_tensors(tensors, arch)
        skip = ("embeddings.position_ids", *(("head.",) if isinstance(varch, siglip.SiglipVisionArch) else ()))
        vision = {n: t for n, t in tensors.part("vision").items() if not n.startswith(skip)}  # a buffer, the pooler
        mcore_vision = hf_to_mcore(vision, varch, layer)  # every vision name and shape checked
        projector = _projector(tensors, arch.hidden_size, varch.hidden_size, where, newline=read.fmt.tiled)
        legacy_tower = read.fmt.name == "llava" and not isinstance(varch, siglip.SiglipVisionArch)
        if not legacy_tower:
            tp_rules.check_divisible(tp, vision_ffn_hidden_size=varch.ffn_hidden_size)
        dtype = dtype or source_dtype({**text_cfg, **ckpt.config})
        if dtype not in DTYPES:
            raise NevaError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        tpl = get_template(template or provenance.get("template") or FAMILY_TEMPLATES.get(arch.family)
                           or DEFAULT_TEMPLATE).name  # fmt: skip
        if template is None and "template" not in provenance:
            logger.info("no --template given: using %s (the %s LLM's usual conversation format)", tpl, arch.family)
        settings = _processor_settings(src)
        aspect = provenance.get("image_aspect_ratio") or ("square" if settings.get("do_pad") is False else "pad")
        data = {"conv_template": tpl, "image_aspect_ratio": aspect, **read.data}  # AnyRes: the config's keys
        vision_path = _write_vision_dir(vision_dir, vision, varch, overwrite) if vision_dir else None
        cfg = nemo_config(arch, text_cfg, tp, dtype, divisible_by)
        vision_cfg: dict[str, Any] = {"image_size": varch.image_size, "patch_size": varch.patch_size,
                                      "source": str(src), "hf_config": varch.to_hf_config()}  # fmt: skip
        if not legacy_tower:
            vision_cfg.update(arch=nemo_vision.arch_record(varch), stored=True)
        cfg.update(
            mm_cfg={
                "llm": {"from_pretrained": str(output.resolve()), "freeze": False, "model_type": tpl},
                "vision_encoder": {"from_pretrained": vision_path, "from_hf": True, "vision_select_layer": layer,
                                   "freeze": True},
                "pretrain_mm_mlp_adapter": str(output.resolve()),
                "mm_mlp_adapter_type": "mlp2x_gelu",
                "mm_patch_merge_type": read.merge,
            },
            data=data,
            vision=vision_cfg,
        )  # fmt: skip
        padded = padded_vocab_size(arch.vocab_size, tp, divisible_by)
        torch_dtype = DTYPES[dtype]
        extras = {n: t.to(torch_dtype) for n, t in projector.items()}
        if legacy_tower:
            extras.update({f"{NEMO_VISION_PREFIX}{HF_PREFIX}{n}": t.to(torch_dtype) for n, t in vision.items()})
        tower_splits = {} if legacy_tower else nemo_vision.splits(varch, layer)
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
                for name, split in tower_splits.items():  # model.vision_model.*: this rank's shard
                    full = mcore_vision[name.removeprefix(nemo_vision.PREFIX)].to(torch_dtype)
                    state[name] = tp_rules.shard(full, split, tp, rank)
                writer.add_torch(weights_member(rank, tp), state)
                del state
    logger.info("imported %s (%s) to %s (TP=%d, template %s) in %.1f s", src, read.fmt.architecture, output, tp, tpl,
                time.perf_counter() - start)  # fmt: skip
    return output


def _projector(tensors: LlavaTensors, llm_hidden: int, vision_hidden: int, where: str, *,
               newline: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """The projector under NeMo's ``mm_projector`` names (``newline``: and ``image_newline``), names and shapes
    checked."""
    found = tensors.part("projector")
    names = nemo_to_llava_hf("mlp2x_gelu", newline=newline)
    expected = {
        "multi_modal_projector.linear_1.weight": (llm_hidden, vision_hidden),
        "multi_modal_projector.linear_1.bias": (llm_hidden,),
        "multi_modal_projector.linear_2.weight": (llm_hidden, llm_hidden),
        "multi_modal_projector.linear_2.bias": (llm_hidden,),
    }
    if newline:
        expected["image_newline"] = (llm_hidden,)
    if set(found) != set(expected):
        raise NevaError(f"{where}: the projector tensors are {sorted(found)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        if tuple(found[name].shape) != shape:
            raise NevaError(f"{where}: {name} has shape {tuple(found[name].shape)}, expected {shape}")
    return {nemo: found[hf] for nemo, hf in names.items()}


def _write_vision_dir(directory: str | Path, vision: dict[str, torch.Tensor], arch: ClipVisionArch,
                      overwrite: bool) -> str:  # fmt: skip
    """Write the tower as a HF ``CLIPVisionModel`` / ``SiglipVisionModel`` directory (transformers 5 names); return
    its absolute path."""
    from safetensors.torch import save_file

    kind = "SiglipVisionModel" if isinstance(arch, siglip.SiglipVisionArch) else "CLIPVisionModel"
    target = Path(directory)
    with atomic_path(target, kind=HF_MODEL_DIR, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps({**arch.to_hf_config(), "architectures": [kind]}, indent=2))
        save_file({n: t.contiguous() for n, t in vision.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip
    return str(target.resolve())
