"""The Hugging Face LLaVA classes a NeVA model is exported to and imported from, and their checkpoint layouts.

Which class runs which NeVA model follows from the model's config (:func:`choose_format`):

==================  =========================================  ==============================================
``image_aspect``    ``mm_patch_merge_type``                    Hugging Face class (``--format``)
==================  =========================================  ==============================================
square, pad         flat (or spatial: one view is laid flat)   ``LlavaForConditionalGeneration`` (llava)
anyres              spatial_unpad                              ``LlavaNextForConditionalGeneration``
anyres_max_N        spatial_unpad                              ``LlavaOnevisionForConditionalGeneration``
==================  =========================================  ==============================================

transformers' LLaVA-NeXT and OneVision always unpad the tile grid and append ``image_newline``
(``pack_image_features``), so ``anyres`` with ``flat`` or ``spatial`` has no Hugging Face class; nor has an untiled
``spatial_unpad`` model (its one ``image_newline`` per image). The tower kind picks
``vision_feature_select_strategy``: CLIP's class token is dropped (``default``), SigLIP has none (``full``).

Tensors: llava-hf's layout (transformers 4: ``language_model.model.*``, ``language_model.lm_head.*``,
``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``image_newline``) is what the export writes and
transformers 4 and 5 load; transformers 5 saves ``model.language_model.*``, ``model.vision_tower.*``, ``lm_head.*``,
``model.multi_modal_projector.*`` and ``model.image_newline``. :data:`LAYOUT` maps both to the parts' own names (the
LLM's Hugging Face names, the tower's without ``vision_model.``, the projector's llava-hf names of
``neva_tools.mappings.projector``).
"""

from __future__ import annotations

from dataclasses import dataclass

from neva_tools.data.anyres import parse_aspect
from neva_tools.errors import NevaError


@dataclass(frozen=True)
class HfLlavaFormat:
    """One Hugging Face LLaVA class and what comes with it."""

    name: str  # ``--format`` value and config ``model_type``
    architecture: str  # config.json ``architectures``
    config_class: str  # transformers classes, by name
    processor_class: str
    image_processor_class: str
    tiled: bool  # AnyRes: ``image_grid_pinpoints``, ``image_sizes`` and ``image_newline``
    video_processor_class: str | None = None  # OneVision: frames of <video> prompts (neva_tools.data.video)


FORMATS: dict[str, HfLlavaFormat] = {
    f.name: f
    for f in (
        HfLlavaFormat("llava", "LlavaForConditionalGeneration", "LlavaConfig", "LlavaProcessor",
                      "LlavaImageProcessor", tiled=False),
        HfLlavaFormat("llava_next", "LlavaNextForConditionalGeneration", "LlavaNextConfig", "LlavaNextProcessor",
                      "LlavaNextImageProcessor", tiled=True),
        HfLlavaFormat("llava_onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionConfig",
                      "LlavaOnevisionProcessor", "LlavaOnevisionImageProcessor", tiled=True,
                      video_processor_class="LlavaOnevisionVideoProcessor"),
    )
}  # fmt: skip
#: ``--format`` choices.
FORMAT_CHOICES = ("auto", *FORMATS)

#: (checkpoint name prefix, part, replacement) for both layouts; longer prefixes first. Parts: ``llm`` (HF LLM
#: names), ``vision`` (tower names without ``vision_model.``), ``projector`` (llava-hf projector names).
LAYOUT: tuple[tuple[str, str, str], ...] = (
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
    ("model.image_newline", "projector", "image_newline"),
    ("image_newline", "projector", "image_newline"),
)
#: Where the export writes each part (llava-hf's layout).
WRITE_PREFIX = {"llm": "language_model.", "vision": "vision_tower.vision_model.", "projector": ""}


def locate(name: str) -> tuple[str, str] | None:
    """(part, name inside the part) of a checkpoint tensor name, or None when it is no part of a LLaVA model."""
    for prefix, part, replacement in LAYOUT:
        if name.startswith(prefix) and (prefix.endswith(".") or name == prefix):
            return part, replacement + name[len(prefix) :]
    return None


def select_strategy(vision_model_type: str) -> str:
    """``vision_feature_select_strategy`` of a tower kind: ``default`` drops CLIP's class token, SigLIP has none."""
    return "full" if vision_model_type == "siglip" else "default"


def by_model_type(model_type: object, where: str) -> HfLlavaFormat:
    """The format of a ``config.json`` ``model_type``; anything else is an error naming the known ones."""
    if model_type not in FORMATS:
        names = [repr(name) for name in FORMATS]
        raise NevaError(f"{where}: model_type {model_type!r} is not {', '.join(names[:-1])} or {names[-1]} (LLaVA, "
                        "LLaVA-NeXT, LLaVA-OneVision); for a language model use `neva convert hf-to-nemo`")  # fmt: skip
    return FORMATS[str(model_type)]


def choose_format(aspect: str, merge: str, where: str, requested: str = "auto") -> HfLlavaFormat:
    """The Hugging Face class that runs a model trained with ``image_aspect_ratio`` ``aspect`` and
    ``mm_patch_merge_type`` ``merge`` (module docstring); ``requested`` (``--format``) must be it or ``auto``."""
    if requested not in FORMAT_CHOICES:
        raise NevaError(f"--format {requested!r} is not one of {', '.join(FORMAT_CHOICES)}")
    mode, limit = parse_aspect(aspect)
    if mode != "anyres":
        if merge == "spatial_unpad":
            raise NevaError(f"{where} was trained with image_aspect_ratio {aspect} and mm_patch_merge_type "
                            "spatial_unpad (an image_newline after every untiled image): no Hugging Face LLaVA class "
                            "lays images out so")  # fmt: skip
        chosen = FORMATS["llava"]
    elif merge != "spatial_unpad":
        raise NevaError(f"{where} was trained with image_aspect_ratio {aspect} and mm_patch_merge_type {merge}; "
                        "Hugging Face LLaVA-NeXT and LLaVA-OneVision lay tiles out as spatial_unpad only, and "
                        "LlavaForConditionalGeneration has one view per image")  # fmt: skip
    else:
        chosen = FORMATS["llava_next" if limit is None else "llava_onevision"]
    if requested not in ("auto", chosen.name):
        raise NevaError(f"--format {requested} cannot run {where} (image_aspect_ratio {aspect}, mm_patch_merge_type "
                        f"{merge}); its class is {chosen.architecture} (--format {chosen.name} or auto)")  # fmt: skip
    return chosen
