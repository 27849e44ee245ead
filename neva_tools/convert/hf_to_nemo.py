"""``hf-to-nemo``: a Hugging Face LLaMA-style checkpoint → a NeMo-1 ``.nemo`` with megatron-core names.

Streaming, no torch model instantiated. Legacy weights: every rank file is laid out first and each
tensor's parts are then written into all of them, copied file to file where the bytes are already on
disk in the right order (``convert.legacy_writer``), so memory holds about one tensor. Dist weights
go through ``dist_checkpointing.save``, which holds the whole model.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neva_tools.checkpoint import tp as tp_rules
from neva_tools.checkpoint.hf_reader import HFCheckpoint, resolve_hf_input
from neva_tools.checkpoint.nemo_archive import CONFIG_NAME, weights_member
from neva_tools.checkpoint.nemo_writer import NemoWriter
from neva_tools.checkpoint.parts import Stored
from neva_tools.convert.dist_writer import write_dist_checkpoint
from neva_tools.convert.legacy_writer import Job, part_bytes, write_legacy
from neva_tools.convert.tokenizer_files import add_tokenizer
from neva_tools.errors import NevaError
from neva_tools.mappings import transforms
from neva_tools.mappings.base import Split
from neva_tools.mappings.llama import IGNORED_HF_SUFFIXES, LlamaArch
from neva_tools.tokenizer.vocab import DEFAULT_DIVISIBLE_BY, padded_vocab_size
from neva_tools.utils.atomic import NEMO_FILE, check_output_path
from neva_tools.utils.log import progress
from neva_tools.utils.resources import peak_rss_bytes

logger = logging.getLogger(__name__)

_HF_LAYER = re.compile(r"^model\.layers\.(\d{1,9})\.")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION = {"fp32": 32, "bf16": "bf16", "fp16": 16}
_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class ConvertSummary:
    """What a conversion did, for the closing summary and the benchmark."""

    output: Path
    parameters: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss: int


def source_dtype(config: dict[str, Any]) -> str:
    """The dtype name recorded in a HF config (``torch_dtype`` or ``dtype``); fp32 when absent."""
    return _HF_DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or "float32"), "fp32")


def check_tensors(ckpt: HFCheckpoint, arch: LlamaArch) -> list[str]:
    """Check names and shapes against the table; return the HF names to ignore. Problems are listed by name.

    The layer count is compared first, so a config.json claiming a huge ``num_hidden_layers`` cannot make the
    table of expected names huge.
    """
    present = set(ckpt.names())
    layers = {int(m.group(1)) for n in present if (m := _HF_LAYER.match(n))}
    if max(layers, default=-1) + 1 != arch.num_layers:
        held = f"layers 0 to {max(layers)}" if layers else "no transformer layers (model.layers.N.*)"
        raise NevaError(f"{ckpt.path}: config.json says num_hidden_layers {arch.num_layers} but the weights hold "
                        f"{held}; fix config.json or use the one saved with these weights")  # fmt: skip
    expected = {name for _, hf_names, _ in arch.entries() for name in hf_names}
    ignored = {n for n in present if n.endswith(IGNORED_HF_SUFFIXES)}
    if arch.tied and "lm_head.weight" in present:
        ignored.add("lm_head.weight")  # tied: some checkpoints still store the shared matrix
    shapes = arch.hf_shapes()
    problems = []
    missing = sorted(expected - present)
    extra = sorted(present - expected - ignored)
    wrong = sorted(n for n in expected & present if ckpt.shape(n) != shapes[n])
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:20])}" + (" …" if len(missing) > 20 else ""))
    if extra:
        problems.append(f"unexpected tensors: {', '.join(extra[:20])}" + (" …" if len(extra) > 20 else ""))
    for n in wrong[:20]:
        problems.append(f"{n} has shape {list(ckpt.shape(n))}, expected {list(shapes[n])} from config.json")
    if problems:
        raise NevaError(f"{ckpt.path} does not match its config.json ({arch.family}):\n  " + "\n  ".join(problems))
    return sorted(ignored)


def check_dtypes(ckpt: HFCheckpoint, arch: LlamaArch) -> None:
    """Refuse weights the table maps that are not stored in a floating-point dtype (integers, fp8 without scales)."""
    wrong = []
    for _, hf_names, _ in arch.entries():
        for n in hf_names:
            dtype = ckpt.dtype(n)
            if dtype is None or not dtype.is_floating_point:
                wrong.append(f"{n} is stored as {ckpt.stored_dtype(n)}")
    if wrong:
        raise NevaError(f"{ckpt.path}: weights must be float32, bfloat16 or float16 (or float64): "
                        + "; ".join(wrong[:10]) + (" …" if len(wrong) > 10 else ""))  # fmt: skip


def fuse(parts: list[torch.Tensor], split: Split, arch: LlamaArch) -> torch.Tensor:
    """The full megatron-core tensor from its HF tensors (``parts`` itself for a single tensor)."""
    if split is Split.QKV:
        return transforms.fuse_qkv(*parts, num_heads=arch.num_heads, num_groups=arch.num_groups)
    if split is Split.GATED_MLP:
        return transforms.fuse_gated(*parts)
    return parts[0]


def nemo_tensor(
    ckpt: HFCheckpoint, arch: LlamaArch, hf_names: tuple[str, ...], split: Split, dtype: torch.dtype
) -> torch.Tensor:
    """Build one full (TP=1) megatron-core tensor of ``dtype`` from its HF tensors (always a fresh tensor)."""
    parts = [ckpt.get(n, copy=False) for n in hf_names]
    if len(parts) == 1:  # a single tensor: copy it out of the mapped file
        return parts[0].to(dtype, copy=True)
    return fuse(parts, split, arch).to(dtype)


def legacy_jobs(ckpt: HFCheckpoint, arch: LlamaArch, tp: int, dtype: torch.dtype) -> list[Job]:
    """One ``legacy_writer.Job`` per megatron-core tensor, with a target in every rank's file."""
    jobs = []
    for nemo_name, hf_names, split in arch.entries():
        sources = [Stored(ckpt.location(n), ckpt.shape(n), ckpt.dtype(n) or dtype) for n in hf_names]
        shape = (sum(s.shape[0] for s in sources), *sources[0].shape[1:])  # fusing stacks along dim 0
        jobs.append(Job(
            name=nemo_name, split=split, shape=shape, dtype=dtype, sources=sources,
            assemble=functools.partial(fuse, split=split, arch=arch),
            load=functools.partial(nemo_tensor, ckpt, arch, hf_names, split, dtype),
            targets=[(weights_member(rank, tp), nemo_name, rank) for rank in range(tp)],
        ))  # fmt: skip
    return jobs


def iter_rank_tensors(
    ckpt: HFCheckpoint, arch: LlamaArch, tp: int, rank: int, padded_vocab: int, dtype: torch.dtype, bar: Any
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (megatron-core name, rank shard) for every tensor of the model."""
    for nemo_name, hf_names, split in arch.entries():
        full = nemo_tensor(ckpt, arch, hf_names, split, dtype)
        bar.update(full.numel() * full.element_size())
        yield nemo_name, tp_rules.shard(full, split, tp, rank, padded_vocab=padded_vocab)


def nemo_config(arch: LlamaArch, hf_config: dict[str, Any], tp: int, dtype: str, divisible_by: int) -> dict[str, Any]:
    """NeMo's ``model_config.yaml`` content (the ``model:`` section) for a converted LLM."""
    cfg: dict[str, Any] = {
        "precision": PRECISION[dtype],
        "micro_batch_size": 1,
        "global_batch_size": 1,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": 1,
        "make_vocab_size_divisible_by": divisible_by,
        **arch.to_nemo_model_config(),
        "megatron_amp_O2": False,
        "seed": 1234,
        "target": "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
        "hf_config": hf_config,
    }
    return cfg


def convert_hf_to_nemo(
    source: str,
    output: str | Path,
    *,
    dtype: str | None = None,
    tp: int = 1,
    fmt: str = "legacy",
    revision: str | None = None,
    overwrite: bool = False,
    divisible_by: int = DEFAULT_DIVISIBLE_BY,
) -> ConvertSummary:
    """Convert HF model ``source`` (directory or hub repo id) to ``output`` (.nemo); see the module docstring."""
    start = time.perf_counter()
    output = Path(output)
    check_output_path(output, overwrite, NEMO_FILE)
    if fmt not in ("legacy", "dist"):
        raise NevaError(f"--format {fmt!r} is not one of legacy, dist")
    src = resolve_hf_input(source, revision)
    with HFCheckpoint(src) as ckpt:
        arch = LlamaArch.from_hf_config(ckpt.config, source=str(src / "config.json"))
        tp_rules.check_divisible(tp, num_attention_heads=arch.num_heads, num_query_groups=arch.num_groups)
        check_tensors(ckpt, arch)
        check_dtypes(ckpt, arch)
        dtype = dtype or source_dtype(ckpt.config)
        if dtype not in DTYPES:
            raise NevaError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        cfg = nemo_config(arch, ckpt.config, tp, dtype, divisible_by)
        padded = padded_vocab_size(arch.vocab_size, tp, divisible_by)
        total = sum(torch.Size(ckpt.shape(n)).numel() for _, names, _ in arch.entries() for n in names)
        jobs = legacy_jobs(ckpt, arch, tp, DTYPES[dtype]) if fmt == "legacy" else []
        to_write = part_bytes(jobs, tp, padded) if jobs else total * DTYPES[dtype].itemsize
        with (
            NemoWriter(output, overwrite=overwrite) as writer,
            progress(total=to_write, unit="B", unit_scale=True, desc="hf-to-nemo") as bar,
        ):
            tokenizer = add_tokenizer(writer, src)
            if tokenizer is None:
                logger.warning("%s has no tokenizer files; the .nemo will have no tokenizer section", src)
            else:
                cfg["tokenizer"] = tokenizer
            writer.add_yaml(CONFIG_NAME, cfg)
            if fmt == "legacy":
                write_legacy(writer, jobs, tp, padded, bar)
            else:
                tensors = iter_rank_tensors(ckpt, arch, 1, 0, padded, DTYPES[dtype], bar)
                write_dist_checkpoint(writer, tensors, arch)
    summary = ConvertSummary(
        output=output,
        parameters=total,
        bytes_read=ckpt.nbytes(),
        bytes_written=output.stat().st_size,
        seconds=time.perf_counter() - start,
        peak_rss=peak_rss_bytes(),
    )
    logger.info("converted %s (%s) to %s", src, arch.family, output)
    return summary
