"""Write a trained megatron-core ``GPTModel`` as a GPT ``.nemo`` in the layout ``neva convert hf-to-nemo`` writes.

The source ``.nemo``'s config and artifacts (tokenizer files) are carried over; the weights are the model's,
one ``mp_rank_XX/model_weights.ckpt`` per TP rank (``model_weights.ckpt`` at TP=1) under canonical
megatron-core names, in the source's precision. Each TP rank writes its shard to a part file; global
rank 0 streams the parts into the tar, so no rank ever holds another rank's weights. The result reads
back with ``load_gpt_from_nemo``, converts with ``neva convert nemo-to-hf`` and serves as the LLM of a
NeVA stage-1 recipe.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from neva_tools.checkpoint.nemo_archive import CONFIG_NAME, NemoArchive, NemoWriter, weights_member
from neva_tools.checkpoint.nemo_tensors import canonical_name, model_config
from neva_tools.convert.tokenizer_files import add_tokenizer

_DTYPES = {"bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "16": torch.float16, "16-mixed": torch.float16}


def precision_dtype(cfg: dict[str, Any]) -> torch.dtype:
    """The tensor dtype a NeMo ``precision`` value stands for (fp32 unless bf16/16)."""
    return _DTYPES.get(str(cfg.get("precision", 32)), torch.float32)


def _rank_state(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = {}
    for key, tensor in model.state_dict().items():
        name = canonical_name("model." + key)
        if name is not None and isinstance(tensor, torch.Tensor):
            state[name] = tensor.detach().to("cpu", dtype).contiguous()
    return state


def _write_archive(output: Path, source: Path, parts: Path, tp: int, tokenizer: Path | None) -> None:
    with NemoArchive(source) as archive:
        cfg = model_config(archive)
        cfg = {**cfg, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1}
        with NemoWriter(output, overwrite=True) as writer:
            if tokenizer is not None:  # an override replaces the source's tokenizer section
                src = tokenizer if tokenizer.is_dir() else _as_sp_dir(tokenizer, parts)
                cfg["tokenizer"] = add_tokenizer(writer, src)
            else:
                for name in archive.other_members():
                    with archive.open(name) as fin, writer.stream(name) as fout:
                        shutil.copyfileobj(fin, fout, 16 << 20)
            writer.add_yaml(CONFIG_NAME, cfg)
            for rank in range(tp):
                writer.add_file(weights_member(rank, tp), parts / f"rank{rank:02d}.ckpt")


def _as_sp_dir(model_file: Path, scratch: Path) -> Path:
    """A directory holding ``model_file`` as ``tokenizer.model`` (what ``add_tokenizer`` reads)."""
    folder = scratch / "tokenizer"
    folder.mkdir(exist_ok=True)
    shutil.copyfile(model_file, folder / "tokenizer.model")
    return folder


def save_gpt_nemo(model: torch.nn.Module, output: str | Path, source: str | Path,
                  tokenizer: str | Path | None = None) -> Path | None:  # fmt: skip
    """Write ``model`` as a ``.nemo`` like ``source`` (collective: every rank calls it; returns the path on rank 0)."""
    from megatron.core import parallel_state

    output = Path(output)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    parts = output.parent / f".{output.name}.parts"
    rank = torch.distributed.get_rank()
    if rank == 0:
        parts.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    if parallel_state.get_data_parallel_rank() == 0:
        with NemoArchive(source) as archive:
            dtype = precision_dtype(model_config(archive))
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        torch.save(_rank_state(model, dtype), parts / f"rank{tp_rank:02d}.ckpt")
    torch.distributed.barrier()
    written = None
    if rank == 0:
        try:
            _write_archive(output, Path(source), parts, tp, Path(tokenizer) if tokenizer else None)
            written = output
        finally:
            shutil.rmtree(parts, ignore_errors=True)
    torch.distributed.barrier()
    return written
