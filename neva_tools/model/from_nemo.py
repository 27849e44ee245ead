"""Loading a ``.nemo`` LLM into a megatron-core ``GPTModel`` at the tensor-parallel size of the running job.

Any saved TP/layout loads at any running TP: a legacy archive saved at the running TP is read rank by
rank; otherwise the full tensors are rebuilt with the mapping table's merge rules and re-split for this
rank (vocabulary padding adjusted). Names are checked both ways and shapes are compared.
"""

from __future__ import annotations

import logging
import os
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
    """Build a local-spec ``GPTModel`` for this process's TP rank and load the ``.nemo`` weights into it.

    Needs megatron's parallel state (``neva_tools.model.parallel.init_distributed``); returns
    (model, model config as used, architecture).
    """
    from megatron.core import parallel_state

    from neva_tools.model.gpt import build_gpt_model

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    with NemoArchive(path) as archive:
        cfg, arch = load_arch(archive)
        tp_rules.check_divisible(tp, num_attention_heads=arch.num_heads, num_query_groups=arch.num_groups)
        cfg = {**cfg, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1, **(overrides or {})}
        divisible = int(cfg.get("make_vocab_size_divisible_by") or DEFAULT_DIVISIBLE_BY)
        padded = padded_vocab_size(arch.vocab_size, tp, divisible)
        model = build_gpt_model(cfg, padded_vocab_size=padded, params_dtype=params_dtype)
        if archive.layout != "dist" or not load_dist_native(model, archive, padded):
            load_state_into(model, rank_state_dict(archive, arch, tp, rank, padded), str(path))
    return model, cfg, arch
