"""A ``.nemo`` from a running tensor-parallel model: per-rank part files, then one archive written by rank 0.

Every TP rank of data-parallel rank 0 saves its own shard to ``.<output>.parts/rankXX.ckpt``; global rank 0
then streams the config, the tokenizer and the parts into the tar (atomically, through ``NemoWriter``), so no
rank ever holds another rank's weights. All ranks must call :func:`save_sharded_nemo` (it has barriers).
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
    """``module``'s local shard under the archive's canonical names, ``prefix`` + its own (contiguous CPU copies)."""
    state = {}
    for key, tensor in module.state_dict().items():
        name = canonical_name(prefix + key)
        if name is not None and isinstance(tensor, torch.Tensor):
            state[name] = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
    return state


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
    rank = torch.distributed.get_rank()
    parts = output.parent / f".{output.name}.parts"
    if rank == 0:
        parts.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    if parallel_state.get_data_parallel_rank() == 0:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        torch.save(rank_state(), parts / f"rank{tp_rank:02d}.ckpt")
    torch.distributed.barrier()
    written = None
    if rank == 0:
        try:
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
