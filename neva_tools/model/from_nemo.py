"""Loading a ``.nemo`` LLM into a megatron-core ``GPTModel`` at the tensor- and pipeline-parallel sizes of the job.

Any saved TP/layout loads at any running TP: a legacy archive saved at the running TP is read rank by
rank; otherwise the full tensors are rebuilt with the mapping table's merge rules and re-split for this
rank (vocabulary padding adjusted). Names are checked both ways and shapes are compared.

Under pipeline parallelism each rank builds its stage (or, interleaved, its chunks: :func:`load_gpt_chunks_from_nemo`)
and loads only that stage's tensors: the archive's layers ``offset … offset + n - 1`` become the stage's layers
``0 … n - 1`` (:func:`stage_state`), the embedding goes to the first stage, the final norm and output layer to the
last. A dist-checkpoint archive is read through megatron-core's ``sharded_state_dict``, whose keys carry the global
layer numbers already.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any

import torch

from neva_tools.checkpoint import dist, nemo_vision
from neva_tools.checkpoint import tp as tp_rules
from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.checkpoint.nemo_tensors import NEVA_REPLICATED_PREFIXES, NemoTensors, canonical_name, load_arch
from neva_tools.checkpoint.safe_dist import refusals_unwrapped
from neva_tools.errors import NevaError
from neva_tools.mappings.base import Split
from neva_tools.mappings.llama import LOCAL_SPEC_NAMES, LlamaArch
from neva_tools.tokenizer.vocab import DEFAULT_DIVISIBLE_BY, padded_vocab_size

logger = logging.getLogger(__name__)


def local_spec_name(canonical: str) -> str:
    """Canonical archive name (``model.``-prefixed, TE layer-norm names) → local-spec ``GPTModel`` state-dict key."""
    name = canonical.removeprefix("model.")
    for te_name, local_name in LOCAL_SPEC_NAMES.items():
        if name.endswith("." + te_name):
            return name[: -len(te_name)] + local_name
    return name


def rank_state_dict(archive: NemoArchive, arch: LlamaArch, tp: int, rank: int, padded: int) -> dict[str, torch.Tensor]:
    """This TP rank's tensors, keyed by canonical name."""
    if archive.layout == "legacy" and archive.legacy_ranks() == (tp, 1):
        raw = archive.load_legacy(rank, 0)
        state = {c: t for n, t in raw.items() if (c := canonical_name(n)) is not None}
        expected = {name for name, _, _ in arch.entries()}
        extra = set(state) - expected
        vocab_rows = [state[n].shape[0] for n, _, split in arch.entries() if split is Split.VOCAB and n in state]
        same_padding = all(rows == padded // tp for rows in vocab_rows)  # else the rows are re-padded below
        neva_parts = (*NEVA_REPLICATED_PREFIXES, nemo_vision.PREFIX)  # the projector and vision tower of NeVA files
        if expected <= set(state) and same_padding and all(n.startswith(neva_parts) for n in extra):
            return {name: state[name] for name in expected}
    tensors = NemoTensors(archive, arch)
    llm = {name for name, _, _ in arch.entries()}  # a NeVA archive also holds projector/vision tensors
    return {
        name: tp_rules.shard(tensors.full(name), tensors.entries[name], tp, rank, padded_vocab=padded)
        for name in tensors.names()
        if name in llm
    }


_LAYER = re.compile(r"^(.*decoder\.layers\.)(\d+)\.(.*)$")


def layer_offsets(model: torch.nn.Module) -> dict[str, dict[int, int]]:
    """Global → local layer numbers of each ``TransformerBlock`` in ``model``, keyed by the block's name + ``.layers.``
    (megatron-core numbers a stage's layers from 1 + its offset: ``layer_number``)."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    offsets = {}
    for name, module in model.named_modules():
        if isinstance(module, TransformerBlock):
            prefix = f"{name}.layers." if name else "layers."
            offsets[prefix] = {layer.layer_number - 1: local for local, layer in enumerate(module.layers)}
    return offsets


def stage_state(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` (canonical names, global layer numbers) that this pipeline stage holds, under its
    local layer numbers; tensors outside the model's layers and modules (the embedding off the first stage, the
    output layer off the last) are left out; a tied output layer on the last stage gets the embedding. Without
    pipeline parallelism: ``state`` unchanged."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return state
    offsets = {"model." + prefix: table for prefix, table in layer_offsets(model).items()}
    present = set(model.state_dict())
    out = {}
    for name, tensor in state.items():
        match = _LAYER.match(name)
        if match is not None:
            table = offsets.get(match.group(1), {})
            if int(match.group(2)) in table:
                out[f"{match.group(1)}{table[int(match.group(2))]}.{match.group(3)}"] = tensor
        elif local_spec_name(name) in present:
            out[name] = tensor
    tied_copy = "output_layer.weight" in present and getattr(model, "share_embeddings_and_output_weights", False)
    if tied_copy and "model.embedding.word_embeddings.weight" in state:  # the last stage's copy of the embedding
        out["model.output_layer.weight"] = state["model.embedding.word_embeddings.weight"]
    return out


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy canonical-named tensors into ``model``; unknown, missing or mis-shaped tensors are listed."""
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    mapped = {local_spec_name(name): tensor for name, tensor in state.items()}
    missing = sorted(set(target) - set(mapped))
    unexpected = sorted(set(mapped) - set(target))
    wrong = [f"{k}: file {list(mapped[k].shape)} vs model {list(target[k].shape)}"
             for k in sorted(set(target) & set(mapped)) if mapped[k].shape != target[k].shape]  # fmt: skip
    if missing or unexpected or wrong:
        raise NevaError(
            f"{source} does not fit the model built from its config:"
            + (f"\n  missing: {', '.join(missing)}" if missing else "")
            + (f"\n  unexpected: {', '.join(unexpected)}" if unexpected else "")
            + ("\n  shape mismatch: " + "; ".join(wrong) if wrong else "")
        )
    with torch.no_grad():
        for key, tensor in mapped.items():
            target[key].copy_(tensor)


def load_dist_native(model: torch.nn.Module, archive: NemoArchive, padded: int) -> bool:
    """Load a dist checkpoint through megatron-core's own ``sharded_state_dict`` (each rank reads its shard).

    Returns False, loading nothing, when the stored vocabulary padding differs from this TP's (the
    caller then rebuilds full tensors instead).
    """
    from megatron.core import dist_checkpointing

    with tempfile.TemporaryDirectory(prefix=".neva-dist-") as tmp:
        directory = archive.extract_dist(tmp)
        stored = dist.tensor_shapes(directory)
        if stored.get("model.embedding.word_embeddings.weight", (None,))[0] != padded:
            return False
        request = {k: v for k, v in model.sharded_state_dict(prefix="model.").items() if not k.endswith("_extra_state")}
        with refusals_unwrapped():
            loaded = dist_checkpointing.load(request, str(directory))
    state = {k.removeprefix("model."): v for k, v in loaded.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise NevaError(
            f"{archive.path}: dist checkpoint does not fit the model; missing {missing}, unexpected {unexpected}"
        )
    logger.debug("loaded %s through megatron-core dist_checkpointing", archive.path)
    return True


def load_gpt_from_nemo(
    path: str | os.PathLike, *, params_dtype: torch.dtype = torch.float32, overrides: dict[str, Any] | None = None
) -> tuple[torch.nn.Module, dict[str, Any], LlamaArch]:
    """Build a local-spec ``GPTModel`` for this process's TP rank (and pipeline stage) and load the ``.nemo``
    weights into it.

    Needs megatron's parallel state (``neva_tools.model.parallel.init_distributed``); returns
    (model, model config as used, architecture). Interleaved pipelines: :func:`load_gpt_chunks_from_nemo`.
    """
    chunks, cfg, arch = load_gpt_chunks_from_nemo(path, params_dtype=params_dtype, overrides=overrides)
    if len(chunks) != 1:
        raise NevaError(f"{path}: virtual_pipeline_model_parallel_size gives {len(chunks)} model chunks per rank; "
                        "load them with load_gpt_chunks_from_nemo")  # fmt: skip
    return chunks[0], cfg, arch


def load_gpt_chunks_from_nemo(
    path: str | os.PathLike, *, params_dtype: torch.dtype = torch.float32, overrides: dict[str, Any] | None = None
) -> tuple[list[torch.nn.Module], dict[str, Any], LlamaArch]:
    """This rank's model chunks (one per interleaved virtual stage, else one: its pipeline stage) loaded from the
    ``.nemo``, with the parallel sizes of megatron's parallel state; (chunks, config as used, architecture)."""
    from megatron.core import parallel_state

    from neva_tools.model.gpt import build_gpt_chunks

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    with NemoArchive(path) as archive:
        cfg, arch = load_arch(archive)
        tp_rules.check_divisible(tp, num_attention_heads=arch.num_heads, num_query_groups=arch.num_groups)
        cfg = {**cfg, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
               "virtual_pipeline_model_parallel_size": vpp, **(overrides or {})}  # fmt: skip
        divisible = int(cfg.get("make_vocab_size_divisible_by") or DEFAULT_DIVISIBLE_BY)
        padded = padded_vocab_size(arch.vocab_size, tp, divisible)
        chunks = build_gpt_chunks(cfg, padded_vocab_size=padded, params_dtype=params_dtype)
        full: dict[str, torch.Tensor] | None = None
        for model in chunks:
            if archive.layout != "dist" or not load_dist_native(model, archive, padded):
                full = full if full is not None else rank_state_dict(archive, arch, tp, rank, padded)
                load_state_into(model, stage_state(full, model), str(path))
    return chunks, cfg, arch
