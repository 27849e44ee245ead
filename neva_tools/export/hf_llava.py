"""``neva export hf-llava``: a NeVA model → a complete Hugging Face ``LlavaForConditionalGeneration`` directory.

Written without a template model: ``config.json`` (``LlavaConfig``: the LLM's config, the CLIP vision config,
``vision_feature_layer`` = our ``vision_select_layer``, ``vision_feature_select_strategy: default``, which drops
the class token as we do, ``image_token_index``, ``image_seq_length``), safetensors shards in llava-hf's layout
(``language_model.model.*``, ``language_model.lm_head.weight``, ``vision_tower.vision_model.*``,
``multi_modal_projector.linear_1/2.*``: what transformers 4 and 5 both load), the processor (tokenizer with an
``<image>`` token, ``LlavaImageProcessor`` set up like our image preprocessing, a chat template rendering our
conversation template; ``patch_size`` and ``num_additional_image_tokens: 1`` make the processor expand
``<image>`` to exactly our image token count), ``generation_config.json`` stopping at the template's end of
turn, and ``neva_export.json`` (provenance, read back by ``neva import``).

``image_token_index`` must be a real token id: an existing ``<image>`` token is used; otherwise ``<image>`` is
added after the tokenizer's last token. When that id lies beyond the LLM vocabulary, one embedding (and output)
row is appended, initialised to the mean of the others as transformers' ``resize_token_embeddings`` does: the
input row is always replaced by image features, and the output row's logit is the mean logit, so it is never the
greedy choice; ``neva import`` removes the row again. Tensors are streamed: one full tensor at a time.
The LLM vocabulary is the model's (``vocab_size`` of the NeVA config): tokens added to the LLM's tokenizer are
exported with their rows (``neva_tools.export.source``); a model trained with ``mm_cfg.use_im_start_end`` gets a
chat template that wraps each ``<image>`` in ``<extra_id_4>`` ... ``<extra_id_5>``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from neva_tools.convert.hf_to_nemo import DTYPES
from neva_tools.convert.nemo_to_hf import _HF_DTYPE_NAMES, _PRECISION_TO_DTYPE, _ShardWriter, hf_tensors, parse_size
from neva_tools.data.images import CLIP_MEAN, CLIP_STD
from neva_tools.data.templates import EOS, get_template, marks_word_starts
from neva_tools.errors import NevaError
from neva_tools.export.chat_template import chat_template
from neva_tools.export.source import NemoSource, NevaSource, mm_setting
from neva_tools.export.tokenizer import check_chat_template, ensure_image_token, hf_tokenizer
from neva_tools.export.vision import VisionTower
from neva_tools.tokenizer.text import TextTokenizer
from neva_tools.utils.atomic import HF_MODEL_DIR, atomic_path, check_output_path
from neva_tools.utils.log import progress

logger = logging.getLogger(__name__)

PROVENANCE = "neva_export.json"
LLM_PREFIX, VISION_PREFIX = "language_model.", "vision_tower.vision_model."
_RESIZED = ("model.embed_tokens.weight", "lm_head.weight")


def template_name(cfg: dict[str, Any], template: str | None) -> str:
    """The conversation template: ``template``, else the training config's ``data.conv_template`` / model type."""
    name = template or mm_setting(cfg, "data", "conv_template") or mm_setting(cfg, "mm_cfg", "llm", "model_type")
    if name is None:
        raise NevaError("the model config names no conversation template; pass --template")
    return get_template(str(name)).name


def export_hf_llava(
    nemo_path: str | Path,
    output_dir: str | Path,
    *,
    vision: str | Path | None = None,
    llm: str | Path | None = None,
    template: str | None = None,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Export the NeVA ``.nemo`` at ``nemo_path`` to the ``LlavaForConditionalGeneration`` directory ``output_dir``.

    ``vision`` overrides the CLIP tower's source, ``llm`` the LLM of a stage-1 ``.nemo`` (see
    ``neva_tools.export.source``), ``template`` the conversation template; ``dtype`` is fp32/bf16/fp16 (default:
    the ``.nemo``'s precision).
    """
    check_output_path(Path(output_dir), overwrite, HF_MODEL_DIR)
    with NemoSource(nemo_path, llm=llm) as source:
        return write_llava(source, output_dir, vision=vision, template=template, dtype=dtype,
                           max_shard_size=max_shard_size, overwrite=overwrite)  # fmt: skip


def write_llava(source: NevaSource, output: str | Path, *, vision: str | Path | None = None,
                template: str | None = None, dtype: str | None = None, max_shard_size: str = "5GB",
                overwrite: bool = False) -> Path:  # fmt: skip
    """Write ``source`` (a ``NemoSource`` or ``CheckpointSource``) as a llava-hf directory; see the module docstring."""
    cfg, arch = source.cfg, source.arch
    max_bytes = parse_size(max_shard_size)
    tpl = get_template(template_name(cfg, template))
    dtype = dtype or _PRECISION_TO_DTYPE.get(str(cfg.get("precision", "32")), "fp32")
    if dtype not in DTYPES:
        raise NevaError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    select = int(mm_setting(cfg, "mm_cfg", "vision_encoder", "vision_select_layer", default=-2))
    aspect = str(mm_setting(cfg, "data", "image_aspect_ratio", default="pad"))
    tower = source.vision_tower(str(vision) if vision is not None else None)
    tower.arch.kept_layers(select)  # a select layer outside the tower is an error naming both
    projector = source.projector()
    _check_projector(projector, arch.hidden_size, tower, source.where)
    with atomic_path(output, kind=HF_MODEL_DIR, overwrite=overwrite) as tmp, tempfile.TemporaryDirectory() as scratch:
        tok_path = source.tokenizer(Path(scratch))
        ours = TextTokenizer(tok_path)
        tok = hf_tokenizer(tok_path, tpl)
        if len(tok) > arch.vocab_size:
            raise NevaError(f"the tokenizer ({tok_path}) has {len(tok)} tokens but the LLM's vocabulary is "
                            f"{arch.vocab_size}; export the tokenizer the model was trained with")  # fmt: skip
        image_id = ensure_image_token(tok)
        wrap = bool(mm_setting(cfg, "mm_cfg", "use_im_start_end", default=False))  # <extra_id_4> <image> <extra_id_5>
        jinja = chat_template(tpl, word_start_answers=marks_word_starts(ours), im_start_end=wrap)
        check_chat_template(tok, ours, tpl, jinja, image_id, im_start_end=wrap)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token  # our data pads with EOS when the tokenizer has no pad token
        added_row = image_id == arch.vocab_size
        vocab = arch.vocab_size + int(added_row)
        _write_weights(source, tower, projector, tmp, DTYPES[dtype], max_bytes, added_row)
        end_ids = _end_ids(tok, tpl.end)
        _write_config(tmp, source, tower, tok, image_id, vocab, select, dtype, end_ids)
        _write_processor(tmp, tok, tower, aspect, jinja)
        if tok_path.is_file():
            (tmp / "tokenizer.model").write_bytes(tok_path.read_bytes())  # the original, for `neva import`
        provenance = {
            "format": 1,
            "source": source.where,
            "template": tpl.name,
            "image_token_index": image_id,
            "appended_image_row": added_row,
            "llm_vocab_size": arch.vocab_size,
            "vision_source": tower.source,
            "image_aspect_ratio": aspect,
        }
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    logger.info("exported %s to %s (template %s, image token %d)", source.where, output, tpl.name, image_id)
    return Path(output)


def _check_projector(projector: dict[str, torch.Tensor], llm_hidden: int, tower: VisionTower, where: str) -> None:
    shape = tuple(projector["multi_modal_projector.linear_1.weight"].shape)
    if shape != (llm_hidden, tower.arch.hidden_size):
        raise NevaError(f"{where}: the projector's first layer has shape {shape}, but the LLM hidden size is "
                        f"{llm_hidden} and the CLIP tower from {tower.source} has hidden size "
                        f"{tower.arch.hidden_size}; pass --vision with the CLIP used for training")  # fmt: skip


def _write_weights(source: NevaSource, tower: VisionTower, projector: dict[str, torch.Tensor], directory: Path,
                   dtype: torch.dtype, max_bytes: int, added_row: bool) -> None:  # fmt: skip
    """Stream every tensor into safetensors shards under llava-hf names."""
    shards = _ShardWriter(directory, max_bytes)
    entries = source.arch.entries()
    for name, hf_names, split in progress(entries, desc="export hf-llava", unit="tensor"):
        full = source.llm_tensor(name)
        for hf_name, tensor in hf_tensors(name, full, split, hf_names, source.arch).items():
            if added_row and hf_name in _RESIZED:
                mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
                tensor = torch.cat([tensor, mean])
            shards.add(LLM_PREFIX + hf_name, tensor.to(dtype).contiguous())
    for name, tensor in projector.items():
        shards.add(name, tensor.to(dtype).contiguous())
    for name, tensor in tower.state.items():
        shards.add(VISION_PREFIX + name, tensor.to(dtype).contiguous())
    shards.finish()


def _end_ids(tok: Any, end: str) -> list[int]:
    """The end-of-turn id(s) generation stops at: the template's end token, and EOS."""
    ids = [tok.eos_token_id] if end == EOS else [tok.convert_tokens_to_ids(end)]
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return [int(i) for i in ids if i is not None]


def _write_config(directory: Path, source: NevaSource, tower: VisionTower, tok: Any, image_id: int, vocab: int,
                  select: int, dtype: str, end_ids: list[int]) -> None:  # fmt: skip
    """``config.json`` (``LlavaConfig``) and ``generation_config.json``."""
    from transformers import GenerationConfig, LlavaConfig

    text = source.arch.replace(vocab_size=vocab).to_hf_config(source.cfg.get("hf_config"), dtype=_HF_DTYPE_NAMES[dtype])
    text.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text.pop("architectures", None)
    config = LlavaConfig(
        vision_config=tower.arch.to_hf_config(),
        text_config=text,
        image_token_index=image_id,
        image_seq_length=tower.arch.num_patches,
        projector_hidden_act="gelu",  # our projector: torch.nn.functional.gelu (exact erf), HF "gelu" is the same
        vision_feature_select_strategy="default",
        vision_feature_layer=select,
        multimodal_projector_bias=True,
        tie_word_embeddings=source.arch.tied,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = _HF_DTYPE_NAMES[dtype]
    config.save_pretrained(str(directory))
    generation = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=end_ids, pad_token_id=tok.pad_token_id)
    generation.save_pretrained(str(directory))


def _write_processor(directory: Path, tok: Any, tower: VisionTower, aspect: str, jinja: str) -> None:
    """The ``LlavaProcessor`` files: tokenizer, image processor (our preprocessing) and chat template."""
    from transformers import LlavaImageProcessor, LlavaProcessor

    size = tower.arch.image_size
    image_processor = LlavaImageProcessor(
        do_pad=aspect == "pad",  # LLaVA-1.5 expand-to-square with the (truncated) mean colour, as ours
        do_resize=True,
        size={"height": size, "width": size},  # bicubic straight to size × size, as ours (no centre crop)
        do_center_crop=False,
        crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=tower.arch.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped again by the "default" strategy
        chat_template=jinja,
    )
    processor.save_pretrained(str(directory))
