"""Tiny NeVA models for the export tests: a NeVA ``.nemo`` as ``neva train`` writes it, our logits, HF logits.

The ``.nemo`` holds the LLM (megatron-core names, converted from a tiny random HF LLaMA), a random
``mlp2x_gelu`` projector under NeMo's ``mm_projector`` names and the training config (``mm_cfg``, ``data``,
``vision``), exactly the layout of ``neva_tools.model.neva_io.save_neva_nemo``; the CLIP tower stays outside.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from neva_tools.checkpoint.nemo_archive import CONFIG_NAME, NemoArchive, artifact_name, weights_member
from neva_tools.checkpoint.nemo_writer import NemoWriter
from neva_tools.mappings.projector import NEMO_PREFIX, NEWLINE

IMAGE, PATCH, VISION_HIDDEN, VISION_LAYERS = 28, 7, 32, 3
OPEN_CLIP_CFG = {
    "embed_dim": 16, "quick_gelu": False,
    "vision_cfg": {"image_size": IMAGE, "patch_size": PATCH, "width": VISION_HIDDEN, "layers": VISION_LAYERS,
                   "head_width": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}  # fmt: skip


def build_hf_clip(out: Path) -> Path:
    """A tiny random HF ``CLIPVisionModel`` (quick_gelu, all weights random incl. norms)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    cfg = CLIPVisionConfig(hidden_size=VISION_HIDDEN, intermediate_size=64, num_hidden_layers=VISION_LAYERS,
                           num_attention_heads=4, image_size=IMAGE, patch_size=PATCH)  # fmt: skip
    model = CLIPVisionModel(cfg)
    _randomize(model)
    model.save_pretrained(str(out))
    return out


def build_open_clip(out: Path, width: int = VISION_HIDDEN) -> Path:
    """A tiny random open_clip CLIP (exact GELU) in open_clip's ``local-dir`` layout."""
    import open_clip

    torch.manual_seed(2)
    cfg = {**OPEN_CLIP_CFG, "vision_cfg": {**OPEN_CLIP_CFG["vision_cfg"], "width": width}}
    model = open_clip.model.CLIP(**cfg)
    _randomize(model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.save(model.state_dict(), out / "open_clip_pytorch_model.bin")
    return out


def _randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            param.copy_(1.0 + 0.1 * noise if "norm" in name or "ln_" in name else 0.1 * noise)


def build_neva_nemo(llm_nemo: Path, out: Path, clip: Path, *, template: str = "vicuna_v1", aspect: str = "pad",
                    include_llm: bool = True, select_layer: int = -2, seed: int = 3, projector: bool = True,
                    tokenizer: Path | None = None, adapter: str = "mlp2x_gelu", data: dict | None = None,
                    merge: str | None = None,
                    tower: tuple[Any, dict[str, torch.Tensor]] | None = None) -> Path:  # fmt: skip
    """A NeVA ``.nemo`` (TP=1) from an LLM ``.nemo``: its LLM (unless ``include_llm=False``), a random projector.

    ``projector=False``, another ``tokenizer`` and ``adapter`` make broken files for the error tests. ``data`` adds
    ``data`` keys (``image_grid_pinpoints``), ``merge`` sets ``mm_patch_merge_type`` (``spatial_unpad`` adds a random
    ``image_newline``), ``tower`` = (architecture, full ``CLIPViTModel`` tensors) stores a trained tower as
    ``neva train`` does (``model.vision_model.*``, ``vision.arch``, ``freeze: false``).
    """
    with NemoArchive(llm_nemo) as archive:
        cfg = archive.read_config()
        state = archive.load_legacy() if include_llm else {}
        hf_tokenizer = tokenizer is None and cfg["tokenizer"].get("library") == "huggingface"  # a HF tokenizer dir
        ref = cfg["tokenizer"]["hf_files"] if hf_tokenizer else cfg["tokenizer"]["model"]
        tokenizer = tokenizer or archive.artifact(ref, out.parent / f".{out.name}.tok")
    hidden = int(cfg["hidden_size"])
    g = torch.Generator().manual_seed(seed)
    shapes = {"0.weight": (hidden, VISION_HIDDEN), "0.bias": (hidden,), "2.weight": (hidden, hidden),
              "2.bias": (hidden,)}  # fmt: skip
    if projector:
        state.update({NEMO_PREFIX + k: 0.1 * torch.randn(shape, generator=g) for k, shape in shapes.items()})
    if merge == "spatial_unpad":
        state[NEWLINE.hf[0]] = torch.randn(hidden, generator=g)
    cfg = {
        **cfg,
        "mm_cfg": {
            "llm": {"from_pretrained": str(llm_nemo), "freeze": not include_llm, "model_type": template},
            "vision_encoder": {"from_pretrained": str(clip), "from_hf": False, "vision_select_layer": select_layer,
                               "freeze": True},
            "pretrain_mm_mlp_adapter": None,
            "mm_mlp_adapter_type": adapter,
        },
        "data": {"conv_template": template, "image_aspect_ratio": aspect, **(data or {})},
        "vision": {"image_size": IMAGE, "patch_size": PATCH, "source": str(clip)},
    }  # fmt: skip
    if merge is not None:
        cfg["mm_cfg"]["mm_patch_merge_type"] = merge
    if tower is not None:
        from neva_tools.checkpoint import nemo_vision

        arch, tensors = tower
        state.update({nemo_vision.PREFIX + k: v for k, v in tensors.items()})
        cfg["vision"].update(arch=nemo_vision.arch_record(arch), stored=True)
        cfg["mm_cfg"]["vision_encoder"]["freeze"] = False
    with NemoWriter(out, overwrite=True) as writer:
        if hf_tokenizer:
            name = artifact_name("hf_tokenizer")
            writer.add_dir(name, tokenizer)
            cfg["tokenizer"] = {**cfg["tokenizer"], "type": f"nemo:{name}", "hf_files": f"nemo:{name}"}
        else:
            name = artifact_name("tokenizer.model")
            writer.add_file(name, tokenizer)
            cfg["tokenizer"] = {**cfg["tokenizer"], "model": f"nemo:{name}"}
        writer.add_bytes(CONFIG_NAME, yaml.safe_dump(cfg, sort_keys=False).encode())
        writer.add_torch(weights_member(0, 1), state)
    return out


def build_model(nemo: str, clip: str, tp: int = 1, rank: int = 0, select_layer: int = -2) -> Any:
    """Our megatron-core ``LLaVAModel`` with the weights of ``nemo`` and ``clip`` (parallel state must exist)."""
    from neva_tools.mappings.clip import hf_clip_state_to_mcore, mcore_splits, open_clip_state_to_mcore
    from neva_tools.mappings.clip import transformer_config as vision_config
    from neva_tools.model import neva_io
    from neva_tools.model.neva import NevaParts, build_neva_model
    from neva_tools.model.vision import load_mcore_state, read_clip_vision

    cfg, vocab = neva_io.llm_config(nemo)
    state, arch, kind = read_clip_vision(clip)
    convert = hf_clip_state_to_mcore if kind == "hf" else open_clip_state_to_mcore
    full = convert(state, arch, select_layer=select_layer)
    parts = NevaParts({**cfg, "tensor_model_parallel_size": tp}, neva_io.llm_padded_vocab(cfg, vocab, tp),
                      vision_config(arch, tp, select_layer=select_layer), arch.image_size, arch.patch_size)  # fmt: skip
    model = build_neva_model(parts).eval()
    neva_io.load_llm(model, nemo, tp, rank)
    neva_io.load_projector(model, nemo, "mlp2x_gelu", tp, rank)
    load_mcore_state(model.vision_model, full, mcore_splits(arch, select_layer))
    return model


def our_logits(rank: int, world_size: int, nemo: str, clip: str, input_ids: torch.Tensor, images: torch.Tensor,
               select_layer: int = -2) -> torch.Tensor:  # fmt: skip
    """Logits of our ``LLaVAModel`` at TP=world_size, cut to the vocabulary (for ``run_distributed`` or in process)."""
    from neva_tools.model import neva_io
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    if world_size > 1:
        init_distributed(tp=world_size)
    try:
        model = build_model(nemo, clip, world_size, rank, select_layer)
        position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        with torch.no_grad():
            logits, _ = model(images, input_ids, position_ids, None, runtime_gather_output=True)  # (logits, mask)
        return logits[..., : neva_io.llm_config(nemo)[1]]
    finally:
        if world_size > 1:
            destroy_distributed()


def hf_logits(directory: Path, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits of the exported ``LlavaForConditionalGeneration`` (fp32, eager attention)."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(directory), dtype=torch.float32,
                                                          attn_implementation="eager").eval()  # fmt: skip
    with torch.no_grad():
        return model(input_ids=input_ids, pixel_values=pixel_values).logits


def expand_images(ids: list[int], image_id: int, count: int) -> list[int]:
    """Our ids with each -200 replaced by ``count`` HF image tokens."""
    out: list[int] = []
    for i in ids:
        out.extend([image_id] * count if i == -200 else [i])
    return out


def state_of(nemo: Path, rank: int = 0) -> dict[str, Any]:
    """One TP rank's stored tensors of a legacy ``.nemo``."""
    with NemoArchive(nemo) as archive:
        return archive.load_legacy(rank)


def safetensors_of(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory's safetensors files."""
    from safetensors import safe_open

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118 - not a mapping
    return out
