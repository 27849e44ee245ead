"""Image and text embeddings merged by one ``index_select``, with megatron-core's own placement rules.

megatron-core's ``LLaVAModel._preprocess_data`` places the text embeddings and the image embeddings into the
combined sequence with advanced indexing: a gather and a scatter for the text, a boolean-mask scatter for the
images, then a transpose copy to ``[s, b, h]``. On the CPU the backward of that gather (an accumulating
``index_put``) alone costs more than the whole merge needs.

:class:`NevaLLaVAModel` keeps megatron-core's placement rules (several images and tiles per sample, text-only
samples, padding, truncation to the LLM's length, the labels and the loss mask) by running its method on *probe*
embeddings of width 1 whose values are row numbers: the probe result says, for every combined position, which
text or image row lands there (0: padding). The real embeddings are then gathered in one ``index_select``
straight into the ``[s, b, h]`` layout; its backward is one ``index_add``. Labels and loss mask are megatron-core's
own. Inference with a KV cache, pipeline stages without the embedding, context or sequence parallelism and the
FSDP dummy-image case use megatron-core's method unchanged.

AnyRes tiles (:mod:`neva_tools.data.anyres`): every tile goes through the vision encoder and the projector as
megatron-core does it (``images`` ``[tiles, 3, H, W]``, ``num_image_tiles`` per image). ``mm_patch_merge_type:
flat`` is megatron-core's own tile support: an image's tiles' embeddings one after the other, ``num_image_tiles ×
img_seq_len`` positions. megatron-core has no spatial layouts: with ``spatial`` and ``spatial_unpad``,
:func:`pack_image_features` rearranges each image's tiles (and unpads them, appends ``image_newline`` rows and, with
``anyres_max_N``, shrinks large grids) as transformers' ``LlavaNextModel`` / ``LlavaOnevisionModel``
``pack_image_features`` do; an image then becomes any number of embeddings, which megatron-core's placement
(``num_image_tiles × img_seq_len``) is given as that count with ``img_seq_len`` 1. The images' sizes come in
``forward(..., image_sizes=[n, 2])`` (height, width; needed for tiled images). ``image_newline`` is a parameter of
``vision_projection`` (trained, frozen and saved with the projector).

Video (:mod:`neva_tools.data.video`): a clip is one entry of ``num_image_tiles`` whose tiles are its sampled frames,
marked by a third column 1 in ``image_sizes`` (``[n, 3]``: height, width, is a video). Every frame goes through the
vision encoder and the projector; :func:`pack_video_features` pools each frame's features 2×2 (bilinear) and lays the
frames out one after the other, with one ``image_newline`` at the end under ``spatial_unpad``: transformers'
``LlavaOnevisionModel.get_video_features``. The count is :func:`neva_tools.data.video.clip_tokens`, the data side's.

Where this differs: from megatron-core, an image's embeddings need not be a multiple of ``img_seq_len`` (its tile
tags and pixel shuffle are not used); from LLaVA-NeXT, ``image_newline`` belongs to the projector (LLaVA-NeXT keeps
it on the model and trains it with ``mm_language_model``; its stage-2 start is fresh either way, and it gets no
weight decay here, as every 1-D parameter); from transformers, one-view images of a several-image sample are never
tiled (its LLaVA-NeXT processor tiles every image, its OneVision one does as we do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from megatron.core.models.multimodal.llava_model import LLaVAModel

from neva_tools.data.anyres import ImageLayout
from neva_tools.data.video import clip_tokens, frame_grid, pool_frames
from neva_tools.errors import NevaError


def pack_image_features(features: torch.Tensor, layout: ImageLayout, tiles: Sequence[int],
                        sizes: Sequence[tuple[int, int]],
                        newline: torch.Tensor | None) -> list[torch.Tensor]:  # fmt: skip
    """Each image's embeddings ``[tokens, h]`` from its tiles' features (``features`` ``[all tiles, side², h]``,
    images in order, ``tiles`` of each, ``sizes`` (height, width) of each); see the module docstring."""
    side, hidden = layout.side, features.shape[-1]
    if sum(tiles) != features.shape[0] or features.shape[1] != side * side:
        raise NevaError(f"{features.shape[0]} tile features of {features.shape[1]} positions for tiles {list(tiles)} "
                        f"of {side}x{side} features each")  # fmt: skip
    if layout.merge == "spatial_unpad" and newline is None:
        raise NevaError("mm_patch_merge_type spatial_unpad needs the projector's image_newline")
    out, start = [], 0
    for count, (height, width) in zip(tiles, sizes, strict=True):
        image, start = features[start : start + count], start + count
        if count == 1 or layout.merge == "flat":
            packed = image.reshape(-1, hidden)
            if count == 1 and layout.merge == "spatial_unpad":
                packed = torch.cat((packed, newline[None].to(packed.dtype)))
            out.append(packed)
            continue
        rows, cols = layout.grid(height, width)
        if count != 1 + rows * cols:
            raise NevaError(f"an image of {width}x{height} pixels has {count} tiles; its {rows}x{cols} grid and base "
                            f"view make {1 + rows * cols}")  # fmt: skip
        grid = image[1:].view(rows, cols, side, side, hidden).permute(0, 2, 1, 3, 4).reshape(rows * side, -1, hidden)
        if layout.merge == "spatial_unpad":
            plan = layout.unpadded(height, width)
            top, bottom, left, right = plan.crop
            grid = grid[top:bottom, left:right]
            if plan.resize is not None:
                grid = torch.nn.functional.interpolate(grid.permute(2, 0, 1)[None], list(plan.resize),
                                                       mode="bilinear")[0].permute(1, 2, 0)  # fmt: skip
            grid = torch.cat((grid, newline.to(grid.dtype).expand(grid.shape[0], 1, hidden)), dim=1)
        out.append(torch.cat((image[0], grid.reshape(-1, hidden))))
    return out


def pack_video_features(frames: torch.Tensor, layout: ImageLayout | None, newline: torch.Tensor | None) -> torch.Tensor:
    """A clip's embeddings ``[tokens, h]`` from its frames' features ``[frames, side², h]``: each frame pooled 2×2
    (bilinear, :func:`neva_tools.data.video.pool_frames`), the frames one after the other, then ``image_newline``
    when the layout has one (``spatial_unpad``): transformers' ``LlavaOnevisionModel.get_video_features``."""
    side, with_newline = frame_grid(layout, frames.shape[1])
    pooled = pool_frames(frames, side).reshape(-1, frames.shape[-1])
    if not with_newline:
        return pooled
    if newline is None:
        raise NevaError("mm_patch_merge_type spatial_unpad needs the projector's image_newline")
    return torch.cat((pooled, newline[None].to(pooled.dtype)))


class NevaLLaVAModel(LLaVAModel):
    """megatron-core ``LLaVAModel`` whose training-time embedding merge is one ``index_select`` and which lays out
    AnyRes tiles as ``image_layout`` says (None: one tile per image unless ``num_image_tiles`` says otherwise)."""

    image_layout: ImageLayout | None = None  # set by neva_tools.model.neva.build_neva_model
    _image_sizes: torch.Tensor | None = None

    def forward(self, *args: Any, image_sizes: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """megatron-core's ``LLaVAModel.forward``; ``image_sizes`` ``[n, 2]``: each image's (height, width)."""
        self._image_sizes = image_sizes
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._image_sizes = None

    def _preprocess_data(self, image_embeddings: torch.Tensor | None, language_embeddings: torch.Tensor | None,
                         input_ids: torch.Tensor, loss_mask: torch.Tensor | None, labels: torch.Tensor | None,
                         use_inference_kv_cache: bool, inference_context: Any, image_token_index: int,
                         num_image_tiles: torch.Tensor, *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        """``(embeddings [s, b, h], labels [b, s], loss_mask [b, s])`` as megatron-core's method returns them, with
        each image's embeddings laid out by ``image_layout``."""
        layout = self.image_layout
        videos = (
            self._image_sizes is not None and self._image_sizes.shape[-1] == 3 and bool(self._image_sizes[:, 2].any())
        )
        if ((not videos and (layout is None or layout.merge == "flat")) or use_inference_kv_cache
                or num_image_tiles is None or num_image_tiles.numel() == 0):  # fmt: skip
            return self._merge(image_embeddings, language_embeddings, input_ids, loss_mask, labels,
                               use_inference_kv_cache, inference_context, image_token_index, num_image_tiles,
                               *args, **kwargs)  # fmt: skip
        packed, counts = self._pack_images(image_embeddings, num_image_tiles)
        saved, self.img_seq_len = self.img_seq_len, 1  # megatron-core places counts × 1 embeddings per image
        try:
            return self._merge(packed, language_embeddings, input_ids, loss_mask, labels, use_inference_kv_cache,
                               inference_context, image_token_index, counts, *args, **kwargs)  # fmt: skip
        finally:
            self.img_seq_len = saved

    def _pack_images(self, image_embeddings: torch.Tensor | None,
                     num_image_tiles: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:  # fmt: skip
        """(each image's embeddings in one ``[1, total, h]``, embeddings per image ``[n]``) for megatron-core; a
        video's frames (its tiles) are pooled 2×2 and laid out one after the other (:func:`pack_video_features`)."""
        layout = self.image_layout
        tiles = [int(t) for t in num_image_tiles.tolist()]
        videos = [False] * len(tiles)
        if self._image_sizes is None:
            if any(t > 1 for t in tiles) and layout is not None:
                raise NevaError("tiled images need their sizes: pass image_sizes=[n, 2] (height, width) to forward")
            sizes = [(0, 0)] * len(tiles)
        else:
            rows = self._image_sizes.tolist()
            sizes = [(int(row[0]), int(row[1])) for row in rows]
            videos = [len(row) == 3 and bool(row[2]) for row in rows]
            if len(sizes) != len(tiles):
                raise NevaError(f"{len(sizes)} image sizes for {len(tiles)} images")
        counts = [clip_tokens(t, layout, self.img_seq_len) if video
                  else t * self.img_seq_len if layout is None else layout.tokens(h, w, tiled=t > 1)
                  for t, (h, w), video in zip(tiles, sizes, videos, strict=True)]  # fmt: skip
        packed = None
        if image_embeddings is not None:
            newline = getattr(self.vision_projection, "image_newline", None)
            features, parts, start = image_embeddings.transpose(0, 1), [], 0
            for t, size, video in zip(tiles, sizes, videos, strict=True):
                entry, start = features[start : start + t], start + t
                if video:
                    parts.append(pack_video_features(entry, layout, newline))
                elif layout is None:
                    parts.append(entry.reshape(-1, entry.shape[-1]))
                else:
                    parts += pack_image_features(entry, layout, [t], [size], newline)
            if [len(p) for p in parts] != counts:
                raise NevaError(f"images laid out as {[len(p) for p in parts]} embeddings, counted {counts}")
            packed = torch.cat(parts)[None]
        return packed, torch.tensor(counts, dtype=torch.int, device=num_image_tiles.device)

    def _merge(self, image_embeddings: torch.Tensor | None, language_embeddings: torch.Tensor | None,
               input_ids: torch.Tensor, loss_mask: torch.Tensor | None, labels: torch.Tensor | None,
               use_inference_kv_cache: bool, inference_context: Any, image_token_index: int,
               num_image_tiles: torch.Tensor, *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        """megatron-core's placement of ``img_seq_len × num_image_tiles`` embeddings per image, one ``index_select``."""
        plain = (
            self.pre_process and not use_inference_kv_cache and not args and kwargs.get("inference_params") is None
            and image_embeddings is not None and language_embeddings is not None
            and self.context_parallel_lm == 1 and not self.sequence_parallel_lm
            and not (num_image_tiles.shape[0] == 0 and image_embeddings.shape[0] > 0)  # FSDP's dummy image
        )  # fmt: skip
        if not plain:
            return super()._preprocess_data(image_embeddings, language_embeddings, input_ids, loss_mask, labels,
                                            use_inference_kv_cache, inference_context, image_token_index,
                                            num_image_tiles, *args, **kwargs)  # fmt: skip
        hidden = language_embeddings.shape[-1]
        text_rows = language_embeddings.shape[0] * language_embeddings.shape[1]
        image_rows = image_embeddings.shape[0] * image_embeddings.shape[1]
        device = language_embeddings.device
        with torch.no_grad():  # row numbers (exact in float64): 0 padding, then text rows, then image rows
            text_probe = torch.arange(1, 1 + text_rows, dtype=torch.float64, device=device)
            image_probe = torch.arange(1 + text_rows, 1 + text_rows + image_rows, dtype=torch.float64, device=device)
            probe, final_labels, final_loss_mask = super()._preprocess_data(
                image_probe.view(*image_embeddings.shape[:2], 1), text_probe.view(*language_embeddings.shape[:2], 1),
                input_ids, loss_mask, labels, use_inference_kv_cache, inference_context, image_token_index,
                num_image_tiles,
            )  # fmt: skip
            rows = probe[..., 0].long()  # [s, b]
        source = torch.cat((language_embeddings.new_zeros(1, hidden), language_embeddings.reshape(-1, hidden),
                            image_embeddings.reshape(-1, hidden).to(language_embeddings.dtype)))  # fmt: skip
        merged = source.index_select(0, rows.reshape(-1)).view(*rows.shape, hidden)
        return merged, final_labels, final_loss_mask
