"""Weight conversion shared by the ViT families (CLIP, SigLIP) and megatron-core's ``CLIPViTModel``.

A family supplies its tables (``Entry`` rows with their TP split kind, ``{i}`` expanded per layer), the source
names it ignores, and its full megatron-core shapes; these functions do the rest both ways: check the key sets
(missing and unknown names raise, listed), fuse or unfuse per-head QKV, and check every shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from neva_tools.errors import NevaError
from neva_tools.mappings.base import Entry, Split
from neva_tools.mappings.transforms import fuse_qkv, unfuse_qkv

if TYPE_CHECKING:
    from neva_tools.mappings.clip import ClipVisionArch

#: Where ``CLIPViTModel``'s tensors live inside megatron-core's ``LLaVAModel``.
LLAVA_PREFIX = "vision_model."


def entries(
    table: tuple[Entry, ...], arch: ClipVisionArch, select_layer: int = -2
) -> list[tuple[str, tuple[str, ...], Split]]:
    """Every (megatron-core name, source names, split) for the layers kept for ``select_layer``."""
    kept = arch.kept_layers(select_layer)
    out = []
    for entry in table:
        out.extend((*entry.expand(i), entry.split) for i in (range(kept) if entry.per_layer else [None]))
    return out


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def convert_to_mcore(
    state: Mapping[str, torch.Tensor],
    arch: ClipVisionArch,
    table: tuple[Entry, ...],
    ignored: tuple[str, ...],
    select_layer: int,
    kind: str,
    *,
    family: str,
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, torch.Tensor]:
    """Source tensors → full megatron-core tensors: check the key sets, build each tensor, check its shape.

    ``shapes`` are the family's full megatron-core shapes for ``select_layer``; a source tensor that differs from its
    target only by size-1 dimensions (a flat class token, timm's ``[1, patches, h]`` positions) is reshaped.
    """
    known = {s for _, sources, _ in entries(table, arch, -1) for s in sources}
    missing = sorted(known - set(state))
    unknown = sorted(k for k in state if k not in known and not k.startswith(ignored))
    if missing or unknown:
        found = "; ".join(
            f"{what}: {', '.join(names[:20])}{' …' if len(names) > 20 else ''}"
            for what, names in (("missing", missing), ("unknown", unknown))
            if names
        )
        raise NevaError(f"the {kind} vision checkpoint does not match a {arch.num_layers}-layer {family} ViT ({found})")
    expected = shapes
    out: dict[str, torch.Tensor] = {}
    for name, sources, split in entries(table, arch, select_layer):
        tensors = [state[s] for s in sources]
        if split is Split.QKV:
            q, k, v = torch.chunk(tensors[0], 3, dim=0) if len(tensors) == 1 else tensors
            tensor = fuse_qkv(q, k, v, num_heads=arch.num_heads, num_groups=arch.num_heads)
        else:
            tensor = tensors[0]
        if tuple(tensor.shape) != expected[name] and _squeezed(tensor.shape) == _squeezed(expected[name]):
            tensor = tensor.reshape(expected[name])
        if tuple(tensor.shape) != expected[name]:
            raise NevaError(f"{kind} tensor {', '.join(sources)} has shape {tuple(tensors[0].shape)}; "
                            f"expected {expected[name]} for {name} ({arch})")  # fmt: skip
        out[name] = tensor.contiguous()
    return out


def convert_to_hf(
    state: Mapping[str, torch.Tensor],
    arch: ClipVisionArch,
    table: tuple[Entry, ...],
    select_layer: int,
    *,
    family: str,
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, torch.Tensor]:
    """HF tensors from full megatron-core ViT tensors through ``table`` (the inverse of :func:`convert_to_mcore`)."""
    state = {k.removeprefix(LLAVA_PREFIX): v for k, v in state.items()}
    expected = shapes
    missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unknown:
        raise NevaError(f"the megatron-core vision tensors do not match a {arch.kept_layers(select_layer)}-layer "
                        f"{family} ViT: missing {missing[:20]}, unknown {unknown[:20]}")  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for name, hf_names, split in entries(table, arch, select_layer):
        tensor = state[name]
        if tuple(tensor.shape) != expected[name]:
            raise NevaError(f"megatron-core vision tensor {name} has shape {tuple(tensor.shape)}, expected "
                            f"{expected[name]} ({arch})")  # fmt: skip
        if split is Split.QKV:
            parts = unfuse_qkv(tensor, num_heads=arch.num_heads, num_groups=arch.num_heads)
        else:
            parts = (tensor.reshape(-1) if name == "class_token" else tensor,)
        out.update({n: p.contiguous() for n, p in zip(hf_names, parts, strict=True)})
    return out
