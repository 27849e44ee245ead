"""A trained NeVA ``.nemo`` as a megatron-core ``LLaVAModel`` ready for inference at the running TP.

What ``neva train`` writes (``neva_tools.model.neva_io.save_neva_nemo``): the projector (always), the LLM (when it
was trained, stage 2), the vision tower (when it was trained; ``neva_tools.checkpoint.nemo_vision``), the tokenizer
and the run's config (the LLM's keys plus ``mm_cfg``, ``data`` and ``vision``). A stored tower is loaded from the
archive (its architecture from ``vision.arch``; ``vision=`` is then not used). The frozen parts come from where the
config says: the LLM from ``mm_cfg.llm.from_pretrained`` when the archive holds none (stage 1), the vision encoder
from ``mm_cfg.vision_encoder.from_pretrained`` (or ``vision=``), read with
``neva_tools.model.vision.read_clip_vision`` (open_clip or Hugging Face, CLIP or SigLIP) and converted exactly as
``neva train`` does; a file whose config says its tower trained but which does not store it is refused unless
``vision=`` names the trained tower. Any saved TP loads at any running TP. The model's vocabulary is the config's
``vocab_size`` (tokens added to the LLM's vocabulary included; a stage-1 file's added rows start as in training, see
``neva_tools.model.added_vocab``), and prompts wrap images as ``mm_cfg.use_im_start_end`` says, in the tokens of
``mm_cfg.im_start_end_tokens`` (NeMo's ``<extra_id_4>``/``<extra_id_5>`` when the config has none). Images are
processed and laid out as in training: ``data.image_aspect_ratio``/``image_grid_pinpoints`` and
``mm_cfg.mm_patch_merge_type`` (AnyRes, :mod:`neva_tools.data.anyres`) build the processor and the model alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neva_tools.checkpoint import nemo_vision
from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.checkpoint.nemo_tensors import canonical_name, model_config
from neva_tools.data.anyres import ImageLayout
from neva_tools.data.images import ImageBatch, ImageProcessor
from neva_tools.data.templates import get_template, image_wrap, image_wrap_ids
from neva_tools.errors import NevaError
from neva_tools.tokenizer.text import TextTokenizer

logger = logging.getLogger(__name__)

_LLM_PROBE = "model.embedding.word_embeddings.weight"  # present iff the archive stores the LLM


@dataclass
class LoadedNeva:
    """A NeVA model in eval mode with everything needed to prompt it."""

    model: Any  # megatron-core LLaVAModel (this TP rank's shard)
    tokenizer: TextTokenizer
    template: str  # conversation template name (neva_tools.data.templates)
    image_processor: ImageProcessor
    vocab_size: int  # true vocabulary, tokens added to the LLM's included (the model's is padded)
    max_sequence_length: int  # the LLM's context, image embeddings included
    source: Path
    im_start_end: bool | tuple[str, str] = False  # mm_cfg.use_im_start_end: the two tokens around each image


def neva_config(nemo: str | Path) -> dict[str, Any]:
    """The model config of a NeVA ``.nemo``; an archive without ``mm_cfg`` (a plain LLM) is an error."""
    with NemoArchive(nemo) as archive:
        cfg = model_config(archive)
    if not isinstance(cfg.get("mm_cfg"), dict):
        raise NevaError(f"{nemo} is not a NeVA .nemo (its model_config.yaml has no mm_cfg section); pass the .nemo "
                        "written by `neva train`")  # fmt: skip
    return cfg


def stores_llm(nemo: str | Path) -> bool:
    """True when the archive holds the LLM weights (stage 2), False when only the projector (frozen LLM)."""
    with NemoArchive(nemo) as archive:
        if archive.layout != "legacy":
            return True  # dist archives are LLM checkpoints
        names = archive.lazy_legacy(0, 0).keys()
        return any(canonical_name(n) == _LLM_PROBE for n in names)


def vision_source(cfg: dict[str, Any], override: str | Path | None, nemo: str | Path) -> tuple[str, str | None]:
    """(source, pretrained) of the vision encoder: ``override`` or ``mm_cfg.vision_encoder.from_pretrained``.

    ``name:checkpoint`` (an open_clip model name and a local file) is split as ``neva train`` does.
    """
    source = override if override is not None else (cfg["mm_cfg"].get("vision_encoder") or {}).get("from_pretrained")
    if not source:
        raise NevaError(f"{nemo}: mm_cfg.vision_encoder.from_pretrained is not set; pass --vision CLIP_DIR")
    if Path(source).exists() or ":" not in str(source):
        if not Path(source).exists():
            raise NevaError(f"vision encoder {source} (from {'--vision' if override else nemo}) does not exist; "
                            "pass --vision with the CLIP the model was trained with")  # fmt: skip
        return str(source), None
    name, checkpoint = str(source).split(":", 1)
    return name, checkpoint


def template_name(cfg: dict[str, Any], override: str | None) -> str:
    """The conversation template: ``override``, else ``data.conv_template``, else ``mm_cfg.llm.model_type``."""
    if override is not None:
        return get_template(override).name
    candidates = [(cfg.get("data") or {}).get("conv_template"), (cfg["mm_cfg"].get("llm") or {}).get("model_type")]
    for name in candidates:
        if isinstance(name, str) and not name.startswith("${"):  # an unresolved interpolation falls through
            return get_template(name).name
    raise NevaError("the .nemo names no conversation template (data.conv_template, mm_cfg.llm.model_type); "
                    "pass --template")  # fmt: skip


def _llm_source(nemo: Path, cfg: dict[str, Any], override: str | Path | None) -> Path:
    if override is not None:
        return Path(override)
    if stores_llm(nemo):
        return nemo
    base = (cfg["mm_cfg"].get("llm") or {}).get("from_pretrained")
    if not base or not Path(base).exists():
        raise NevaError(f"{nemo} holds no LLM weights (it was trained with a frozen LLM) and its "
                        f"mm_cfg.llm.from_pretrained {base!r} does not exist; pass --llm LLM.nemo")  # fmt: skip
    return Path(base)


def _vision_tower(cfg: dict[str, Any], vision: str | Path | None, nemo: Path,
                  select: int) -> tuple[Any, dict[str, torch.Tensor], str]:  # fmt: skip
    """(architecture, full ``CLIPViTModel`` tensors, where from) of the vision tower: the trained one stored in
    ``nemo``, else ``vision`` or ``mm_cfg.vision_encoder.from_pretrained`` converted as ``neva train`` does."""
    from neva_tools.model.vision import read_clip_vision, vision_state_to_mcore

    with NemoArchive(nemo) as archive:
        tower = nemo_vision.read_tower(archive)
    if tower is not None:
        if vision is not None:
            logger.info("%s holds its trained vision tower; --vision %s is not used", nemo, vision)
        return tower.arch, tower.for_layer(select), f"{nemo} (trained tower)"
    bypass = None if vision is not None else "pass --vision with the trained tower"
    nemo_vision.check_trained_tower(cfg, False, str(nemo), bypass=bypass)
    if vision is not None and nemo_vision.tower_trained(cfg):
        logger.warning("%s does not store its trained vision tower; using --vision %s as that tower", nemo, vision)
    source, pretrained = vision_source(cfg, vision, nemo)
    state, arch, kind = read_clip_vision(source, pretrained=pretrained)
    stored = cfg.get("vision") or {}
    trained = (stored.get("image_size", arch.image_size), stored.get("patch_size", arch.patch_size))
    if trained != (arch.image_size, arch.patch_size):
        raise NevaError(f"vision encoder {source} takes {arch.image_size}px images in {arch.patch_size}px patches but "
                        f"{nemo} was trained with {trained[0]}px / {trained[1]}px; pass "
                        "--vision with the CLIP it was trained with")  # fmt: skip
    return arch, vision_state_to_mcore(state, arch, kind, select_layer=select), source  # CLIP or SigLIP, as trained


#: ``--dtype`` names → weight dtypes; ``auto`` is bf16 on CUDA and fp32 on the CPU (see :func:`weight_dtype`).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def weight_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """The weight dtype for ``name`` (``fp32``, ``bf16``, ``fp16`` or a ``torch.dtype``); ``auto``/None: bf16 where
    CUDA is available (as inference is normally run), fp32 on the CPU (bf16 matmuls there are slow and the tests
    compare fp32 results)."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise NevaError(f"weight dtype {name} is not supported; choose from {', '.join(DTYPES)}")
        return name
    if name is None or name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in DTYPES:
        raise NevaError(f"weight dtype {name!r} (--dtype) is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_neva(
    nemo: str | Path,
    *,
    vision: str | Path | None = None,
    llm: str | Path | None = None,
    template: str | None = None,
    dtype: str | torch.dtype = "fp32",
) -> LoadedNeva:
    """Build the NeVA model of ``nemo`` for this TP rank and load every weight (collective under TP).

    Needs megatron's parallel state (``neva_tools.model.parallel.init_distributed``). ``vision`` overrides the
    stored CLIP location, ``llm`` the LLM weights (default: the archive's, else ``mm_cfg.llm.from_pretrained``).
    ``dtype`` (:func:`weight_dtype`: ``fp32``, ``bf16``, ``fp16`` or ``auto``): the weights are loaded in fp32, then
    cast, as megatron-core's ``Float16Module`` casts them for training (RoPE frequencies stay fp32); callers cast
    the images to the model's dtype (``generate``, ``generate_batch`` and the scoring do).
    """
    from megatron.core import parallel_state

    from neva_tools.mappings.siglip import vision_model_type
    from neva_tools.model import neva_io

    if not parallel_state.model_parallel_is_initialized():
        raise NevaError("megatron parallel state is not initialized; call neva_tools.model.parallel.init_distributed()")
    nemo = Path(nemo)
    cfg = neva_config(nemo)
    template_used = template_name(cfg, template)  # fail before any weights are read
    weights = weight_dtype(dtype)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    mm = cfg["mm_cfg"]
    projector = str(mm.get("mm_mlp_adapter_type") or "mlp2x_gelu")
    select = int((mm.get("vision_encoder") or {}).get("vision_select_layer", -2))
    arch, vision_full, source = _vision_tower(cfg, vision, nemo, select)
    llm_path = _llm_source(nemo, cfg, llm)
    llm_cfg, vocab = neva_io.llm_config(llm_path)
    trained = max(vocab, int(cfg.get("vocab_size") or vocab))  # added tokens' rows: stored, else as training began
    layout = ImageLayout.from_config(cfg.get("data"), mm, arch.image_size, arch.patch_size)  # as trained
    model = neva_io.build_neva(llm_path, llm_cfg, vocab, arch, vision_full, select_layer=select,
                               projector_type=projector, projector_from=nemo, vocab_size=trained,
                               image_layout=layout)  # fmt: skip
    model.to(weights)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = TextTokenizer(neva_io.extract_tokenizer(nemo, neva_io.scratch_dir()))
    if tokenizer.vocab_size > trained:
        raise NevaError(f"the tokenizer stored in {nemo} has {tokenizer.vocab_size} tokens but the model was trained "
                        f"with {trained} (LLM {llm_path}, vocab_size of {nemo})")  # fmt: skip
    im_start_end = image_wrap(mm) or False  # im_start_end_tokens (NeMo's when the config has none)
    if im_start_end:
        image_wrap_ids(tokenizer, im_start_end)  # the tokens exist (else a NevaError naming them), before any prompt
    aspect = str((cfg.get("data") or {}).get("image_aspect_ratio") or "pad")
    logger.info("loaded %s (LLM from %s, vision %s) at TP=%d in %s", nemo, llm_path, source, tp,
                str(weights).removeprefix("torch."))  # fmt: skip
    processor = ImageProcessor.for_encoder(vision_model_type(arch), arch.image_size, aspect, layout=layout)
    return LoadedNeva(model, tokenizer, template_used, processor, trained,
                      int(model.language_model.max_sequence_length), nemo, im_start_end)  # fmt: skip


def load_images(paths: list[str | Path], processor: ImageProcessor) -> torch.Tensor:
    """Images ``[n, 3, H, W]`` (``n`` may be 0) for the model, one view each (never tiled: use
    :func:`load_image_batch` for a prompt's images); unreadable files raise ``NevaError``."""
    size = processor.image_size
    return torch.stack([processor(p) for p in paths]) if paths else torch.empty(0, 3, size, size, device="cpu")


def load_image_batch(paths: list[str | Path], processor: ImageProcessor) -> ImageBatch:
    """A prompt's images as training processes a sample's (``anyres``: a single image is tiled) with their tiles,
    sizes and embedding counts, for :func:`neva_tools.inference.generate.generate`."""
    return processor.batch(list(paths))
