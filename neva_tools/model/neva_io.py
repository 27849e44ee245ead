"""NeVA weights in and out: the LLM from a ``.nemo``, the projector from a stage-1 ``.nemo`` (or LLaVA's
``mm_projector.bin``), and the final NeVA ``.nemo`` of a training run (NeMo-1 NeVA layout, so ``neva repartition``
and NeMo read it).

The final archive holds, per TP rank, the LLM shard (megatron-core names, when the LLM was trained),
the vision tower's shard (``model.vision_model.*``, when it was trained or came trained from a ``.nemo``; see
``neva_tools.checkpoint.nemo_vision``) and the full projector under NeMo's ``mm_projector`` names (replicated),
plus the tokenizer and the run's config. Each TP rank writes its shard to a part file; global rank 0 streams the
parts into the tar, so no rank ever holds another rank's weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from neva_tools.checkpoint import nemo_vision
from neva_tools.checkpoint import tp as tp_rules
from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.checkpoint.nemo_tensors import load_arch
from neva_tools.errors import NevaError
from neva_tools.mappings.projector import table as projector_table
from neva_tools.model.from_nemo import load_state_into, rank_state_dict, stage_state
from neva_tools.model.save_nemo import canonical_state, save_sharded_nemo
from neva_tools.tokenizer.vocab import DEFAULT_DIVISIBLE_BY, padded_vocab_size


def load_llm(model: Any, nemo_path: str | Path, tp: int, rank: int, padded: int | None = None) -> dict[str, Any]:
    """Load the LLM weights of ``nemo_path`` into ``model.language_model`` for TP ``rank``; return its config.

    ``padded``: the model's padded vocabulary (default: the LLM's own; larger when added tokens grew it).
    """
    with NemoArchive(nemo_path) as archive:
        cfg, arch = load_arch(archive)
        tp_rules.check_divisible(tp, num_attention_heads=arch.num_heads, num_query_groups=arch.num_groups)
        padded = padded or padded_vocab_size(arch.vocab_size, tp, int(cfg.get("make_vocab_size_divisible_by") or 128))
        state = stage_state(rank_state_dict(archive, arch, tp, rank, padded), model.language_model)  # PP: its layers
        load_state_into(model.language_model, state, str(nemo_path))
    return cfg


def llm_config(nemo_path: str | Path) -> tuple[dict[str, Any], int]:
    """(LLM model config, true vocabulary size) of a ``.nemo``."""
    with NemoArchive(nemo_path) as archive:
        cfg, arch = load_arch(archive)
    return cfg, arch.vocab_size


def llm_padded_vocab(cfg: dict[str, Any], vocab: int, tp: int) -> int:
    """The padded vocabulary the LLM needs at ``tp``."""
    return padded_vocab_size(vocab, tp, int(cfg.get("make_vocab_size_divisible_by") or DEFAULT_DIVISIBLE_BY))


def build_neva(llm_path: str | Path, llm_cfg: dict[str, Any], vocab: int, arch: Any,
               vision_full: dict[str, torch.Tensor], *, select_layer: int, projector_type: str,
               projector_from: str | Path | None = None, recompute: dict[str, Any] | None = None,
               vocab_size: int | None = None, image_layout: Any = None,
               vp_stage: int | None = None) -> Any:  # fmt: skip
    """This TP rank's ``LLaVAModel`` with the LLM of ``llm_path``, the vision encoder (full megatron-core tensors,
    split here) and, when ``projector_from`` is given, the projector stored there (else a fresh one).
    ``image_layout`` (``neva_tools.data.anyres.ImageLayout``): AnyRes tiles and ``mm_patch_merge_type``.

    ``recompute`` holds NeMo's activation-checkpointing keys (``neva_tools.model.recompute``), applied to the LLM
    and the vision encoder alike. ``vocab`` is the LLM's vocabulary (the rows ``llm_path`` holds); ``vocab_size``
    the model's, larger when the tokenizer has added tokens: their rows start as the mean rows
    (``neva_tools.model.added_vocab``) and the padded vocabulary follows from it.
    """
    from megatron.core import parallel_state

    from neva_tools.model.added_vocab import init_added_rows
    from neva_tools.model.neva import NevaParts, build_neva_model
    from neva_tools.model.recompute import apply_recompute
    from neva_tools.model.vision import load_mcore_state, vision_splits, vision_transformer_config

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    recompute = recompute or {}
    vision_cfg = apply_recompute(vision_transformer_config(arch, tp, select_layer=select_layer), recompute)
    total = max(vocab, vocab_size or vocab)
    padded = llm_padded_vocab(llm_cfg, total, tp)
    ps = parallel_state
    stages = {"pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
              "virtual_pipeline_model_parallel_size": ps.get_virtual_pipeline_model_parallel_world_size()}  # fmt: skip
    parts = NevaParts({**llm_cfg, **recompute, "tensor_model_parallel_size": tp, **stages},
                      padded, vision_cfg, arch.image_size, arch.patch_size, projector_type, image_layout)  # fmt: skip
    model = build_neva_model(parts, vp_stage=vp_stage)  # PP: this rank's stage (vision encoder on the first)
    load_llm(model, llm_path, tp, rank, padded)
    init_added_rows(model.language_model, vocab, total)
    if model.vision_model is None:
        return model
    load_mcore_state(model.vision_model, vision_full, vision_splits(arch, select_layer))
    if projector_from:
        load_projector(model, projector_from, projector_type, tp, rank)
    return model


def extract_tokenizer(nemo_path: str | Path, dest: str | Path) -> Path:
    """Extract the tokenizer stored in a ``.nemo`` (sentencepiece model, else the HF files) into ``dest``."""
    with NemoArchive(nemo_path) as archive:
        section = archive.read_config()
        section = (section.get("model") or section).get("tokenizer") or {}
        for key in ("model", "hf_files", "type"):
            ref = section.get(key)
            if isinstance(ref, str) and ref.startswith("nemo:"):
                return archive.artifact(ref, dest)
    raise NevaError(f"{nemo_path} stores no tokenizer; set model.tokenizer.model")


def load_projector(model: Any, source: str | Path, projector_type: str, tp: int, rank: int) -> None:
    """Initialise ``model.vision_projection`` from stage 1's projector: the NeMo-named projector of a NeVA ``.nemo``
    or LLaVA's ``mm_projector.bin``/``.safetensors`` (``neva_tools.model.projector_io``), checked against the model's
    sizes and split for TP ``rank`` like every projector. A model with ``image_newline`` (``spatial_unpad``) takes
    the one a ``.nemo`` stores; without one (stage 1 trained flat, LLaVA's files) it keeps its initial row."""
    from neva_tools.model.projector_io import check_shapes, read_image_newline, read_projector

    full = read_projector(source, projector_type)
    check_shapes(full, projector_type, model.language_model.config.hidden_size, model.vision_model.config.hidden_size,
                 str(source))  # fmt: skip
    target = {k: v for k, v in model.vision_projection.state_dict().items() if not k.endswith("_extra_state")}
    local = {}
    for e in projector_table(projector_type):
        key = e.nemo.removeprefix("vision_projection.")
        local[key] = tp_rules.shard(full[e.hf[0]], e.split, tp, rank).to(target[key].dtype)
    newline = getattr(model.vision_projection, "image_newline", None)
    stored = read_image_newline(source) if newline is not None else None  # None: stays as initialised (LLaVA-NeXT)
    if stored is not None:
        if tuple(stored.shape) != tuple(newline.shape):
            raise NevaError(f"{source}: image_newline has shape {list(stored.shape)}, this model's LLM hidden size "
                            f"needs {list(newline.shape)}")  # fmt: skip
        local["image_newline"] = stored.to(newline.dtype)
    model.vision_projection.load_state_dict(local, strict=False)  # copies the CPU tensors onto the model's device
    target = {k: v for k, v in model.vision_projection.state_dict().items() if not k.endswith("_extra_state")}
    for key, tensor in local.items():
        if not torch.equal(target[key].detach().cpu(), tensor):  # compared on the CPU, where the file was read
            raise NevaError(f"loading projector tensor {key} from {source} failed")


def _gather_projector(model: Any, projector_type: str) -> dict[str, torch.Tensor]:
    """The full projector under NeMo names, gathered over the TP group (every TP rank gets it)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    world = torch.distributed.get_world_size(group)
    local = model.state_dict()
    out = {}
    newline = hasattr(model.vision_projection, "image_newline")  # spatial_unpad: saved with the projector
    for entry in projector_table(projector_type, newline=newline):
        shard = local[entry.nemo].detach().cpu()
        shards: list[Any] = [None] * world
        torch.distributed.all_gather_object(shards, shard, group=group)
        out[entry.hf[0]] = tp_rules.merge(shards, entry.split, name=entry.nemo)
    return out


def save_neva_nemo(model: Any, output: str | Path, config: dict[str, Any], *, include_llm: bool,
                   projector_type: str, tokenizer: str | Path | None,
                   include_vision: bool = False) -> Path | None:  # fmt: skip
    """Write the run's NeVA ``.nemo`` (collective: every rank calls it; returns the path on global rank 0).

    ``include_vision`` stores this rank's shard of the vision tower (``neva_tools.checkpoint.nemo_vision``); the
    config's ``vision.arch`` must then describe it. ``vision.stored`` is set to say whether the file holds it.
    """
    vision = dict(config.get("vision") or {})
    if include_vision and not isinstance(vision.get("arch"), dict):
        raise NevaError("storing the vision tower needs its architecture in the config (vision.arch)")
    config = {**config, "vision": {**vision, "stored": include_vision}}
    chunks = list(model) if isinstance(model, torch.nn.ModuleList) else [model]  # PP interleaved: its chunks
    first = next((c for c in chunks if c.vision_projection is not None), None)  # PP: the first stage only
    projector = _gather_projector(first, projector_type) if first is not None else {}  # collective over TP

    def rank_state() -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = dict(projector)
        for chunk in chunks if include_llm else []:
            state.update(canonical_state(chunk.language_model))  # global layer numbers
        if include_vision and first is not None:
            state.update(canonical_state(first.vision_model, prefix=nemo_vision.PREFIX))
        return state

    return save_sharded_nemo(output, rank_state, config, tokenizer=tokenizer)


def scratch_dir() -> Path:
    """A temporary directory for extracted artifacts (the tokenizer of a ``.nemo``), removed when the process exits;
    those of killed processes are removed by the next call (``neva_tools.utils.atomic.scratch_directory``)."""
    from neva_tools.utils.atomic import scratch_directory

    return scratch_directory()
