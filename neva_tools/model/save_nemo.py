"""A ``.nemo`` from a running tensor- (and pipeline-) parallel model: per-rank part files, then one archive written
by rank 0.

Every TP rank of data-parallel rank 0 saves its own shard to ``.<output>.parts/rankXX.ckpt``; global rank 0
then streams the config, the tokenizer and the parts into the tar (atomically, through ``NemoWriter``), so no
rank ever holds another rank's weights. All ranks must call :func:`save_sharded_nemo` (it has barriers).

Pipeline stages: :func:`canonical_state` names a stage's layers by their global numbers (megatron-core's
``layer_number``; interleaved chunks, a ``ModuleList`` of them, are merged), each stage writes
``rankXX_ppYY.ckpt`` and rank 0 merges the stages of each TP rank into that rank's file: the archive has the
``pipeline_model_parallel_size: 1`` layout every reader here takes (and that ``neva convert repartition`` splits
again).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from neva_tools.checkpoint.nemo_archive import CONFIG_NAME, weights_member
from neva_tools.checkpoint.nemo_tensors import canonical_name
from neva_tools.checkpoint.nemo_writer import NemoWriter
from neva_tools.convert.tokenizer_files import add_tokenizer


def canonical_state(module: torch.nn.Module, dtype: torch.dtype | None = None,
                    prefix: str = "model.") -> dict[str, torch.Tensor]:  # fmt: skip
    """``module``'s local shard under the archive's canonical names, ``prefix`` + its own (contiguous CPU copies);
    a pipeline stage's layers under their global numbers, and a ``ModuleList`` of interleaved chunks merged."""
    if isinstance(module, torch.nn.ModuleList):
        return {k: v for chunk in module for k, v in canonical_state(chunk, dtype, prefix).items()}
    names = global_layer_names(module)
    # a tied output layer off the first stage is the embedding's copy (the archive holds the embedding only)
    tied_copy = getattr(module, "share_embeddings_and_output_weights", False) and not getattr(module, "pre_process", 1)
    state = {}
    for key, tensor in module.state_dict().items():
        if tied_copy and key == "output_layer.weight":
            continue
        name = canonical_name(prefix + names(key))
        if name is not None and isinstance(tensor, torch.Tensor):
            state[name] = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
    return state


def global_layer_names(module: torch.nn.Module) -> Callable[[str], str]:
    """A function renaming ``module``'s state-dict keys ``….layers.<local>.…`` of its transformer blocks to
    their global layer numbers (``layer_number - 1``: a pipeline stage's offset added; unchanged without one)."""
    from neva_tools.model.from_nemo import layer_offsets

    tables = {prefix: {local: glob for glob, local in table.items()} for prefix, table in layer_offsets(module).items()
              if any(glob != local for glob, local in table.items())}  # fmt: skip

    def rename(key: str) -> str:
        for prefix, table in tables.items():
            if key.startswith(prefix):
                index, _, rest = key[len(prefix) :].partition(".")
                if index.isdigit() and int(index) in table:
                    return f"{prefix}{table[int(index)]}.{rest}"
        return key

    return rename


def store_tokenizer(writer: NemoWriter, tokenizer: Path, scratch: Path) -> dict[str, Any] | None:
    """Store a sentencepiece model file or an HF tokenizer directory; return NeMo's ``tokenizer:`` section."""
    if tokenizer.is_dir():
        return add_tokenizer(writer, tokenizer)
    folder = scratch / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer, folder / "tokenizer.model")
    return add_tokenizer(writer, folder)


def save_sharded_nemo(output: str | Path, rank_state: Callable[[], dict[str, torch.Tensor]], config: dict[str, Any],
                      *, tokenizer: str | Path | None = None,
                      extra: Callable[[NemoWriter], None] | None = None) -> Path | None:  # fmt: skip
    """Write ``output`` from every TP rank's ``rank_state()``; returns the path on global rank 0, else None.

    ``config`` becomes ``model_config.yaml`` with this run's parallel sizes; ``tokenizer`` (a ``.model`` file or
    an HF directory) replaces its ``tokenizer:`` section; ``extra(writer)`` may add other members (rank 0 only).
    """
    from megatron.core import parallel_state

    output = Path(output)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    rank = torch.distributed.get_rank()
    parts = output.parent / f".{output.name}.parts"
    if rank == 0:
        parts.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    if parallel_state.get_data_parallel_rank() == 0:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        stage = f"_pp{parallel_state.get_pipeline_model_parallel_rank():02d}" if pp > 1 else ""
        torch.save(rank_state(), parts / f"rank{tp_rank:02d}{stage}.ckpt")
    torch.distributed.barrier()
    written = None
    if rank == 0:
        try:
            if pp > 1:
                _merge_stages(parts, tp, pp)
            cfg = {**config, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1}
            with NemoWriter(output, overwrite=True) as writer:
                if tokenizer is not None:
                    cfg["tokenizer"] = store_tokenizer(writer, Path(tokenizer), parts)
                if extra is not None:
                    extra(writer)
                writer.add_yaml(CONFIG_NAME, cfg)
                for r in range(tp):
                    writer.add_file(weights_member(r, tp), parts / f"rank{r:02d}.ckpt")
            written = output
        finally:
            shutil.rmtree(parts, ignore_errors=True)
    torch.distributed.barrier()
    return written


def _merge_stages(parts: Path, tp: int, pp: int) -> None:
    """Merge each TP rank's stage files ``rankXX_ppYY.ckpt`` into ``rankXX.ckpt`` (one TP rank in memory at a time)."""
    for r in range(tp):
        merged: dict[str, torch.Tensor] = {}
        for stage in range(pp):
            path = parts / f"rank{r:02d}_pp{stage:02d}.ckpt"
            state = torch.load(path, map_location="cpu", weights_only=True)
            shared = sorted(set(merged) & set(state))
            different = [k for k in shared if not torch.equal(merged[k], state[k])]
            if different:  # only a tied embedding may appear on two stages, with the same values
                raise RuntimeError(f"pipeline stages hold different values for {', '.join(different)}")
            merged.update(state)
            path.unlink()
        torch.save(merged, parts / f"rank{r:02d}.ckpt")
