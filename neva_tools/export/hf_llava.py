"""``neva export hf-llava``: a NeVA model → a complete Hugging Face LLaVA, LLaVA-NeXT or LLaVA-OneVision directory.

The class follows from the model's config (``neva_tools.mappings.llava_hf.choose_format``: image aspect ratio and
merge type; ``--format`` may name it): ``LlavaForConditionalGeneration`` for one view per image,
``LlavaNextForConditionalGeneration`` for ``anyres`` + ``spatial_unpad``, ``LlavaOnevisionForConditionalGeneration``
for ``anyres_max_N`` + ``spatial_unpad``; each with a CLIP or SigLIP tower.

Written without a template model: ``config.json`` (the LLM's config, the CLIP/SigLIP vision config,
``vision_feature_layer`` = our ``vision_select_layer``, ``vision_feature_select_strategy`` ``default`` for CLIP,
which drops the class token as we do, ``full`` for SigLIP, which has none, ``image_token_index``; AnyRes:
``image_grid_pinpoints`` as ``[height, width]`` pairs, our order and transformers', and OneVision's
``vision_aspect_ratio`` ``anyres_max_N``), safetensors shards in llava-hf's layout (``language_model.model.*``,
``language_model.lm_head.weight``, ``vision_tower.vision_model.*``, ``multi_modal_projector.linear_1/2.*``,
``image_newline``: what transformers 4 and 5 both load), the processor (tokenizer with an ``<image>`` token, the
class's image processor set up like our image preprocessing and tiling, a chat template rendering our
conversation template; ``patch_size`` and the class-token count make the processor expand ``<image>`` to exactly
our image token count, tiles, unpadding and ``image_newline`` rows included), ``generation_config.json`` stopping at
the template's end of turn, and ``neva_export.json`` (provenance, read back by ``neva import``). OneVision's
``<video>`` is added to the tokenizer like ``<image>`` (``video_token_index``), and its video processor resizes frames
bicubically to the encoder's size as ours does for square frames (``neva_tools.data.video``: frames are sampled by
``base_interval`` there; give transformers the sampled frames). A prompt with several images: training and our
inference tile only a single image (as OneVision's processor and model do); transformers' LLaVA-NeXT tiles every
image, so such prompts match ours only with OneVision.

``image_token_index`` must be a real token id: an existing ``<image>`` token is used; otherwise ``<image>`` is
added after the tokenizer's last token. When that id lies beyond the LLM vocabulary, one embedding (and output)
row is appended, initialised to the mean of the others as transformers' ``resize_token_embeddings`` does: the
input row is always replaced by image features, and the output row's logit is the mean logit, so it is never the
greedy choice; ``neva import`` removes the row again. Tensors are streamed: one full tensor at a time.
The LLM vocabulary is the model's (``vocab_size`` of the NeVA config): tokens added to the LLM's tokenizer are
exported with their rows (``neva_tools.export.source``); a model trained with ``mm_cfg.use_im_start_end`` gets a
chat template that wraps each ``<image>`` in ``<extra_id_4>`` ... ``<extra_id_5>`` (``mm_cfg.im_start_end_tokens``).
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
from neva_tools.data.anyres import ImageLayout
from neva_tools.data.images import NORMALIZATION
from neva_tools.data.templates import EOS, get_template, image_wrap, marks_word_starts
from neva_tools.errors import NevaError
from neva_tools.export.chat_template import chat_template
from neva_tools.export.source import NemoSource, NevaSource, mm_setting
from neva_tools.export.tokenizer import VIDEO_TOKEN, check_chat_template, ensure_image_token, hf_tokenizer
from neva_tools.export.vision import VisionTower
from neva_tools.mappings import llava_hf
from neva_tools.mappings.llava_hf import HfLlavaFormat, choose_format, select_strategy
from neva_tools.mappings.siglip import vision_model_type
from neva_tools.tokenizer.text import TextTokenizer
from neva_tools.utils.atomic import HF_MODEL_DIR, atomic_path, check_output_path
from neva_tools.utils.log import progress

logger = logging.getLogger(__name__)

PROVENANCE = "neva_export.json"
LLM_PREFIX, VISION_PREFIX = llava_hf.WRITE_PREFIX["llm"], llava_hf.WRITE_PREFIX["vision"]
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
    hf_format: str = "auto",
) -> Path:
    """Export the NeVA ``.nemo`` at ``nemo_path`` to the Hugging Face LLaVA directory ``output_dir``.

    ``vision`` overrides the vision tower's source, ``llm`` the LLM of a stage-1 ``.nemo`` (see
    ``neva_tools.export.source``), ``template`` the conversation template; ``dtype`` is fp32/bf16/fp16 (default:
    the ``.nemo``'s precision); ``hf_format`` (``auto``, ``llava``, ``llava_next``, ``llava_onevision``) must be
    the class the model's config calls for (``auto``: that class).
    """
    check_output_path(Path(output_dir), overwrite, HF_MODEL_DIR)
    with NemoSource(nemo_path, llm=llm) as source:
        return write_llava(source, output_dir, vision=vision, template=template, dtype=dtype,
                           max_shard_size=max_shard_size, overwrite=overwrite, hf_format=hf_format)  # fmt: skip


def write_llava(source: NevaSource, output: str | Path, *, vision: str | Path | None = None,
                template: str | None = None, dtype: str | None = None, max_shard_size: str = "5GB",
                overwrite: bool = False, hf_format: str = "auto") -> Path:  # fmt: skip
    """Write ``source`` (a ``NemoSource`` or ``CheckpointSource``) as a llava-hf directory; see the module docstring."""
    cfg, arch = source.cfg, source.arch
    max_bytes = parse_size(max_shard_size)
    tpl = get_template(template_name(cfg, template))
    dtype = dtype or _PRECISION_TO_DTYPE.get(str(cfg.get("precision", "32")), "fp32")
    if dtype not in DTYPES:
        raise NevaError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    select = int(mm_setting(cfg, "mm_cfg", "vision_encoder", "vision_select_layer", default=-2))
    aspect = str(mm_setting(cfg, "data", "image_aspect_ratio", default="pad"))
    merge = str(mm_setting(cfg, "mm_cfg", "mm_patch_merge_type", default="flat"))
    fmt = choose_format(aspect, merge, source.where, hf_format)
    tower = source.vision_tower(str(vision) if vision is not None else None)
    select = select if tower.feature_layer is None else tower.feature_layer  # a tower of the trained layers alone
    tower.arch.kept_layers(select)  # a select layer outside the tower is an error naming both
    layout = None
    if fmt.tiled:
        layout = ImageLayout.from_config(cfg.get("data"), cfg.get("mm_cfg"), tower.arch.image_size,
                                         tower.arch.patch_size)  # fmt: skip
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
        wrap = image_wrap(mm_setting(cfg, "mm_cfg")) or False  # <extra_id_4> <image> <extra_id_5> (NeMo's tokens)
        jinja = chat_template(tpl, word_start_answers=marks_word_starts(ours), im_start_end=wrap)
        check_chat_template(tok, ours, tpl, jinja, image_id, im_start_end=wrap)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token  # our data pads with EOS when the tokenizer has no pad token
        video_id = ensure_image_token(tok, VIDEO_TOKEN) if fmt.video_processor_class else None
        added_rows = max(0, max(image_id, video_id or 0) + 1 - arch.vocab_size)  # rows for <image> / <video>
        vocab = arch.vocab_size + added_rows
        _write_weights(source, tower, projector, tmp, DTYPES[dtype], max_bytes, added_rows)
        end_ids = _end_ids(tok, tpl.end)
        _write_config(tmp, fmt, source, tower, tok, (image_id, video_id), vocab, select, dtype, end_ids, layout)
        _write_processor(tmp, fmt, tok, tower, aspect, jinja, layout)
        if tok_path.is_file():
            (tmp / "tokenizer.model").write_bytes(tok_path.read_bytes())  # the original, for `neva import`
        provenance = {
            "format": 1,
            "source": source.where,
            "template": tpl.name,
            "image_token_index": image_id,
            "appended_image_row": added_rows > 0,
            "appended_rows": added_rows,
            "video_token_index": video_id,
            "llm_vocab_size": arch.vocab_size,
            "vision_source": tower.source,
            "image_aspect_ratio": aspect,
            "mm_patch_merge_type": merge,
            "hf_format": fmt.name,
        }
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    logger.info("exported %s to %s as %s (template %s, image token %d)", source.where, output, fmt.architecture,
                tpl.name, image_id)  # fmt: skip
    return Path(output)


def _check_projector(projector: dict[str, torch.Tensor], llm_hidden: int, tower: VisionTower, where: str) -> None:
    shape = tuple(projector["multi_modal_projector.linear_1.weight"].shape)
    if shape != (llm_hidden, tower.arch.hidden_size):
        raise NevaError(f"{where}: the projector's first layer has shape {shape}, but the LLM hidden size is "
                        f"{llm_hidden} and the vision tower from {tower.source} has hidden size "
                        f"{tower.arch.hidden_size}; pass --vision with the tower used for training")  # fmt: skip
    newline = projector.get("image_newline")
    if newline is not None and tuple(newline.shape) != (llm_hidden,):
        raise NevaError(f"{where}: image_newline has shape {tuple(newline.shape)}, the LLM hidden size is "
                        f"{llm_hidden}")  # fmt: skip


def _write_weights(source: NevaSource, tower: VisionTower, projector: dict[str, torch.Tensor], directory: Path,
                   dtype: torch.dtype, max_bytes: int, added_rows: int) -> None:  # fmt: skip
    """Stream every tensor into safetensors shards under llava-hf names (``added_rows`` mean rows appended to the
    embedding and output matrices for the media tokens)."""
    shards = _ShardWriter(directory, max_bytes)
    entries = source.arch.entries()
    for name, hf_names, split in progress(entries, desc="export hf-llava", unit="tensor"):
        full = source.llm_tensor(name)
        for hf_name, tensor in hf_tensors(name, full, split, hf_names, source.arch).items():
            if added_rows and hf_name in _RESIZED:
                mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
                tensor = torch.cat([tensor, mean.expand(added_rows, -1)])
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


def _write_config(directory: Path, fmt: HfLlavaFormat, source: NevaSource, tower: VisionTower, tok: Any,
                  media_ids: tuple[int, int | None], vocab: int, select: int, dtype: str, end_ids: list[int],
                  layout: ImageLayout | None) -> None:  # fmt: skip
    """``config.json`` (the format's config class) and ``generation_config.json``; ``media_ids``: the ``<image>``
    and (OneVision) ``<video>`` token ids."""
    image_id, video_id = media_ids
    import transformers
    from transformers import GenerationConfig

    text = source.arch.replace(vocab_size=vocab).to_hf_config(source.cfg.get("hf_config"), dtype=_HF_DTYPE_NAMES[dtype])
    text.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text.pop("architectures", None)
    settings: dict[str, Any] = {
        "vision_config": tower.arch.to_hf_config(),
        "text_config": text,
        "image_token_index": image_id,
        "projector_hidden_act": "gelu",  # our projector: torch.nn.functional.gelu (exact erf), HF "gelu" is the same
        "vision_feature_select_strategy": select_strategy(vision_model_type(tower.arch)),
        "vision_feature_layer": select,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": source.arch.tied,
    }
    if fmt.name in ("llava", "llava_next"):
        settings["image_seq_length"] = tower.arch.num_patches
    if layout is not None:
        settings["image_grid_pinpoints"] = [[h, w] for h, w in layout.pinpoints]  # [height, width], as ours
    if fmt.name == "llava_onevision":
        assert layout is not None
        settings.update(vision_aspect_ratio=layout.aspect, video_token_index=video_id)
    config = getattr(transformers, fmt.config_class)(**settings)
    config.architectures = [fmt.architecture]
    config.dtype = _HF_DTYPE_NAMES[dtype]
    config.save_pretrained(str(directory))
    generation = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=end_ids, pad_token_id=tok.pad_token_id)
    generation.save_pretrained(str(directory))


def _write_processor(directory: Path, fmt: HfLlavaFormat, tok: Any, tower: VisionTower, aspect: str, jinja: str,
                     layout: ImageLayout | None) -> None:  # fmt: skip
    """The processor files: tokenizer, image processor (our preprocessing and tiling) and chat template."""
    import transformers

    size, kind = tower.arch.image_size, vision_model_type(tower.arch)
    mean, std = NORMALIZATION[kind]
    strategy = select_strategy(kind)
    class_tokens = int(strategy == "default")  # CLIP's class token, dropped again by the "default" strategy
    square = {"height": size, "width": size}  # bicubic straight to size × size, as ours (no centre crop)
    common = {"do_resize": True, "size": square, "image_mean": list(mean), "image_std": list(std)}
    image_class = getattr(transformers, fmt.image_processor_class)
    processor_class = getattr(transformers, fmt.processor_class)
    if layout is None:  # LLaVA: one view; do_pad is LLaVA-1.5's expand-to-square with the (truncated) mean colour
        image_processor = image_class(do_pad=aspect == "pad", do_center_crop=False, crop_size=square, **common)
        processor = processor_class(image_processor=image_processor, tokenizer=tok, patch_size=tower.arch.patch_size,
                                    vision_feature_select_strategy=strategy, num_additional_image_tokens=class_tokens,
                                    chat_template=jinja)  # fmt: skip
    else:  # AnyRes: base view and tiles as ours; do_pad pads a batch's tile counts (the model drops the padding)
        pinpoints = [[h, w] for h, w in layout.pinpoints]
        if fmt.name == "llava_next":
            image_processor = image_class(do_pad=True, do_center_crop=False, crop_size=square,
                                          image_grid_pinpoints=pinpoints, **common)  # fmt: skip
            processor = processor_class(image_processor=image_processor, tokenizer=tok,
                                        patch_size=tower.arch.patch_size, vision_feature_select_strategy=strategy,
                                        num_additional_image_tokens=class_tokens, chat_template=jinja)  # fmt: skip
        else:
            image_processor = image_class(do_pad=True, image_grid_pinpoints=pinpoints, **common)
            assert fmt.video_processor_class is not None
            video = getattr(transformers, fmt.video_processor_class)(**common)  # frames: bicubic to size × size
            processor = processor_class(image_processor=image_processor, tokenizer=tok, video_processor=video,
                                        num_image_tokens=tower.arch.num_patches + class_tokens,
                                        vision_feature_select_strategy=strategy, chat_template=jinja,
                                        vision_aspect_ratio=layout.aspect)  # fmt: skip
    processor.save_pretrained(str(directory))
