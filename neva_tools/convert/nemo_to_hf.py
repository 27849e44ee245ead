"""``nemo-to-hf``: a ``.nemo`` LLM (any TP, legacy or dist) → Hugging Face safetensors, config and tokenizer.

The exact inverse of ``hf-to-nemo``: fused QKV and gated MLP are split back, vocabulary padding is
removed, and tensors are written in sharded safetensors with an index, loadable by
``transformers.AutoModelForCausalLM``.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.checkpoint.nemo_tensors import NemoTensors, load_arch
from neva_tools.convert.hf_to_nemo import DTYPES, ConvertSummary
from neva_tools.convert.tokenizer_files import export_tokenizer
from neva_tools.errors import NevaError
from neva_tools.mappings import transforms
from neva_tools.mappings.base import Split
from neva_tools.mappings.llama import LlamaArch
from neva_tools.utils.atomic import HF_MODEL_DIR, atomic_path, check_output_path
from neva_tools.utils.log import progress
from neva_tools.utils.resources import peak_rss_bytes
from neva_tools.utils.temporaries import scratch

_PRECISION_TO_DTYPE = {"bf16": "bf16", "bf16-mixed": "bf16", "16": "fp16", "16-mixed": "fp16", "32": "fp32"}
_HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*$", re.IGNORECASE)
_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """``5GB`` → 5·10⁹ bytes, ``500MiB`` → 500·2²⁰ (Hugging Face's ``max_shard_size`` convention)."""
    m = _SIZE_RE.match(text)
    if m is None:
        raise NevaError(f"--max-shard-size {text!r} is not a size such as 5GB or 500MiB")
    return int(float(m.group(1)) * _UNITS.get((m.group(2) or "").lower(), 1))


def hf_tensors(name: str, tensor: torch.Tensor, split: Split, hf_names: tuple[str, ...], arch: LlamaArch) -> dict:
    """The HF tensors that a full megatron-core tensor stands for."""
    if split is Split.QKV:
        parts = transforms.unfuse_qkv(tensor, arch.num_heads, arch.num_groups)
    elif split is Split.GATED_MLP:
        parts = transforms.unfuse_gated(tensor)
    else:
        parts = (tensor,)
    return {n: p.contiguous() for n, p in zip(hf_names, parts, strict=True)}


class _ShardWriter:
    """Accumulate tensors into safetensors shards of at most ``max_bytes``; write the index at the end."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory, self.max_bytes = directory, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self.flush()
        self.current[name] = tensor
        self.current_bytes += size
        self.total += size

    def flush(self) -> None:
        if not self.current:
            return
        path = self.directory / f".shard-{len(self.files):05d}.safetensors"
        save_file(self.current, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.directory / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.files, start=1):
            final = f"model-{i:05d}-of-{len(self.files):05d}.safetensors"
            path.rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def convert_nemo_to_hf(
    source: str | Path,
    output: str | Path,
    *,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> ConvertSummary:
    """Convert ``source`` (.nemo file or directory) to a Hugging Face model directory ``output``."""
    start = time.perf_counter()
    max_bytes = parse_size(max_shard_size)
    check_output_path(Path(output), overwrite, HF_MODEL_DIR)
    with NemoArchive(source) as archive:
        cfg, arch = load_arch(archive)
        dtype = dtype or _PRECISION_TO_DTYPE.get(str(cfg.get("precision", "32")), "fp32")
        if dtype not in DTYPES:
            raise NevaError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        tensors = NemoTensors(archive, arch)
        hf_names = {name: hf for name, hf, _ in arch.entries()}
        params = 0
        with (
            atomic_path(output, kind=HF_MODEL_DIR, overwrite=overwrite) as tmp,
            scratch() as scratch_dir,
        ):
            shards = _ShardWriter(tmp, max_bytes)
            for name in progress(list(hf_names), desc="nemo-to-hf", unit="tensor"):  # the LLM only (not NeVA parts)
                full = tensors.full(name)
                for hf_name, t in hf_tensors(name, full, tensors.entries[name], hf_names[name], arch).items():
                    shards.add(hf_name, t.to(DTYPES[dtype]))
                    params += t.numel()
            shards.finish()
            hf_config = arch.to_hf_config(cfg.get("hf_config"), dtype=_HF_DTYPE_NAMES[dtype])
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            export_tokenizer(archive, cfg.get("tokenizer"), tmp, scratch_dir)
    out = Path(output)
    return ConvertSummary(
        output=out,
        parameters=params,
        bytes_read=Path(source).stat().st_size if Path(source).is_file() else 0,
        bytes_written=sum(f.stat().st_size for f in out.iterdir()),
        seconds=time.perf_counter() - start,
        peak_rss=peak_rss_bytes(),
    )
