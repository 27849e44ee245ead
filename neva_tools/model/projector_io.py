"""Stage 1's projector for stage 2 (``model.mm_cfg.pretrain_mm_mlp_adapter``): a NeVA ``.nemo`` or LLaVA's
``mm_projector.bin`` / ``mm_projector.safetensors``.

Either gives the full (TP=1) projector under NeMo-1 names (:mod:`neva_tools.mappings.projector`);
``neva_io.load_projector`` checks it against the model's sizes and splits it for its TP rank. LLaVA's file is
``torch.save`` of ``{"model.mm_projector.0.weight": ..., ...}`` (whatever precedes ``mm_projector.`` is ignored),
read with ``torch.load(weights_only=True)``: a pickle holding code is refused. Every key must map and every tensor
must be there; a key of something else (a vision resampler, embeddings) is an error naming it.
``image_newline`` (``spatial_unpad``) comes from a NeVA ``.nemo`` only (:func:`read_image_newline`): LLaVA's
``mm_projector.bin`` never holds it, and LLaVA-NeXT starts it fresh in stage 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from neva_tools.errors import NevaError
from neva_tools.mappings.projector import LLAVA_PROJECTOR, NEMO_PREFIX, NEWLINE, full_shapes, llava_suffix, table

#: File suffixes read as LLaVA projector files; anything else is read as a ``.nemo``.
LLAVA_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


def is_llava_file(source: str | Path) -> bool:
    """Whether ``source`` is read as LLaVA's ``mm_projector.bin`` (or ``.safetensors``), not as a ``.nemo``."""
    return Path(source).suffix in LLAVA_SUFFIXES


def read_projector(source: str | Path, projector_type: str) -> dict[str, torch.Tensor]:
    """The full projector stored in ``source`` under NeMo-1 names (CPU tensors)."""
    if is_llava_file(source):
        return from_llava(_load_llava(Path(source)), projector_type, str(source))
    return _from_nemo(source, projector_type)


def _from_nemo(source: str | Path, projector_type: str) -> dict[str, torch.Tensor]:
    from neva_tools.checkpoint.nemo_archive import NemoArchive

    with NemoArchive(source) as archive:
        state = archive.lazy_legacy(0, 0) if archive.layout == "legacy" else None
        if state is None:
            raise NevaError(f"{source}: the projector must come from a legacy-layout NeVA .nemo")
        names = [e.hf[0] for e in table(projector_type)]
        missing = [n for n in names if n not in state]
        if missing:
            raise NevaError(f"{source} has no {projector_type} projector (missing {', '.join(missing)})")
        return {n: state[n] for n in names}


def read_image_newline(source: str | Path) -> torch.Tensor | None:
    """The ``image_newline`` a NeVA ``.nemo`` stores, or None (LLaVA's projector files, models trained without
    ``spatial_unpad``); a ``.nemo`` whose config says ``spatial_unpad`` but that holds none is an error."""
    from neva_tools.checkpoint.nemo_archive import NemoArchive
    from neva_tools.checkpoint.nemo_tensors import model_config

    if is_llava_file(source):
        return None
    name = NEWLINE.hf[0]
    with NemoArchive(source) as archive:
        state = archive.lazy_legacy(0, 0) if archive.layout == "legacy" else {}
        if name in state:
            return state[name].detach().to("cpu").contiguous()
        merge = (model_config(archive).get("mm_cfg") or {}).get("mm_patch_merge_type")
    if merge == "spatial_unpad":
        raise NevaError(f"{source} was trained with mm_patch_merge_type spatial_unpad but stores no image_newline "
                        f"({name}); the file is incomplete: save it again from its training run")  # fmt: skip
    return None


def _load_llava(path: Path) -> Mapping[str, Any]:
    from neva_tools.checkpoint.safe_dist import weights_only_load

    if not path.is_file():
        raise NevaError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise NevaError(f"{path} is not a readable safetensors file ({exc})") from None
    state = weights_only_load(path, str(path))
    if not isinstance(state, Mapping):
        raise NevaError(f"{path} holds a {type(state).__name__}, not the dict of tensors LLaVA saves as "
                        "mm_projector.bin")  # fmt: skip
    return state


def from_llava(state: Mapping[str, Any], projector_type: str, where: str) -> dict[str, torch.Tensor]:
    """LLaVA's ``mm_projector`` tensors under NeMo-1 names; unknown, duplicate or missing keys are an error."""
    found: dict[str, torch.Tensor] = {}
    others = []
    for key, value in state.items():
        _, sep, suffix = str(key).rpartition(LLAVA_PROJECTOR)
        if not sep or not isinstance(value, torch.Tensor):
            others.append(str(key))
        elif suffix in found:
            raise NevaError(f"{where} holds mm_projector.{suffix} twice (under different prefixes)")
        else:
            found[suffix] = value
    if projector_type == "linear" and set(found) == {"0.weight", "0.bias"}:  # LLaVA's mlp1x_gelu: one Linear
        found = {k.removeprefix("0."): v for k, v in found.items()}
    wanted = {llava_suffix(e): e.hf[0] for e in table(projector_type)}
    missing, extra = [s for s in wanted if s not in found], [s for s in found if s not in wanted]
    if missing or extra or others:
        hint = ""
        if projector_type == "mlp2x_gelu" and set(found) in ({"weight", "bias"}, {"0.weight", "0.bias"}):
            hint = "; it is a one-layer projector: set model.mm_cfg.mm_mlp_adapter_type=linear"
        elif projector_type == "linear" and "2.weight" in found:
            hint = "; it is a two-layer projector: set model.mm_cfg.mm_mlp_adapter_type=mlp2x_gelu"
        parts = [f"missing mm_projector.{', mm_projector.'.join(missing)}" if missing else "",
                 f"unexpected mm_projector.{', mm_projector.'.join(extra)}" if extra else "",
                 f"keys that are no projector tensor: {', '.join(others[:8])}" if others else ""]  # fmt: skip
        listed = "; ".join(p for p in parts if p)
        raise NevaError(f"{where} is not a LLaVA {projector_type} mm_projector file ({listed}){hint}")
    return {wanted[s]: found[s].detach().to("cpu").contiguous() for s in wanted}


def check_shapes(tensors: Mapping[str, Any], projector_type: str, llm_hidden: int, vision_hidden: int,
                 where: str) -> None:  # fmt: skip
    """Raise unless every projector tensor has the full shape this model needs (values: tensors or shapes)."""
    expected = full_shapes(projector_type, llm_hidden, vision_hidden)
    wrong = []
    for name, want in expected.items():
        value = tensors[name]
        shape = tuple(value.shape if isinstance(value, torch.Tensor) else value)
        if shape != want:
            wrong.append(f"{name.removeprefix(NEMO_PREFIX)} is {list(shape)}, expected {list(want)}")
    if wrong:
        raise NevaError(f"{where}: the projector does not fit this model (vision hidden size {vision_hidden} → LLM "
                        f"hidden size {llm_hidden}): {'; '.join(wrong)}; stage 1 must have used the same vision "
                        "encoder and LLM")  # fmt: skip
