"""``repartition``: any TP/PP → any TP/PP for ``.nemo`` LLM and NeVA checkpoints, one tensor at a time.

Full tensors are rebuilt from the source ranks with the mapping table's merge rules (replicated tensors
verified identical) and split again for the target ranks; vocabulary padding is recomputed for the
target TP. Legacy outputs are laid out first and each tensor's parts are written into every target
rank's file, copied file to file where they are rows of the stored shards (``convert.legacy_writer``),
so memory holds about one tensor. Tokenizer and other artifacts that the config references (``nemo:``)
are carried over; members nothing references are reported and left out. Every tensor's shape, dtype and
storage is checked against ``model_config.yaml`` before anything is written (``checkpoint.nemo_tensors``).
"""

from __future__ import annotations

import functools
import logging
import math
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from neva_tools.checkpoint import nemo_vision
from neva_tools.checkpoint import tp as tp_rules
from neva_tools.checkpoint.nemo_archive import CONFIG_NAME, NemoArchive, artifact_name, weights_member
from neva_tools.checkpoint.nemo_tensors import NemoTensors, divisible_by, load_arch
from neva_tools.checkpoint.nemo_writer import NemoWriter
from neva_tools.convert.dist_writer import write_dist_checkpoint
from neva_tools.convert.hf_to_nemo import ConvertSummary
from neva_tools.convert.legacy_writer import Job, part_bytes, write_legacy
from neva_tools.errors import NevaError
from neva_tools.mappings.base import Split
from neva_tools.mappings.nemo_legacy import mcore_to_legacy
from neva_tools.tokenizer.vocab import padded_vocab_size
from neva_tools.utils.atomic import NEMO_FILE, check_output_path
from neva_tools.utils.log import progress
from neva_tools.utils.resources import peak_rss_bytes

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^model\.decoder\.layers\.(\d+)\.(.*)$")
_LAST_STAGE = ("model.decoder.final_layernorm.", "model.output_layer.")


def stage_of(name: str, per_stage: int, pp: int) -> int:
    """The pipeline stage that holds tensor ``name``."""
    m = _LAYER.match(name)
    if m:
        return int(m.group(1)) // per_stage
    return pp - 1 if name.startswith(_LAST_STAGE) else 0


def local_name(name: str, stage: int, per_stage: int, legacy: bool) -> str:
    """``name`` with its layer number made stage-local, in the requested naming."""
    m = _LAYER.match(name)
    if m:
        name = f"model.decoder.layers.{int(m.group(1)) - stage * per_stage}.{m.group(2)}"
    return mcore_to_legacy(name) if legacy else name


def dist_tensors(tensors: NemoTensors, padded: int) -> Iterator[tuple[str, Any]]:
    """(name, full tensor with the target's vocabulary padding) of every tensor, for a dist checkpoint."""
    for name in tensors.names():
        yield name, tensors.part(name, 1, 0, padded)


def legacy_jobs(tensors: NemoTensors, tp: int, pp: int, legacy: bool) -> list[Job]:
    """One ``legacy_writer.Job`` per tensor, targeting every TP rank of its pipeline stage."""
    arch, per_stage = tensors.arch, tensors.arch.num_layers // pp
    jobs = []

    def job(name: str, stage: int, stored_as: str) -> Job:
        split, sources = tensors.entries[name], tensors.stored(name)
        vocab = arch.vocab_size if split is Split.VOCAB else None
        key = local_name(stored_as, stage, per_stage, legacy)
        return Job(
            name=name, split=split, shape=tensors.shape(name), dtype=sources[0].dtype, sources=sources,
            assemble=functools.partial(tp_rules.merge, split=split, name=name, vocab=vocab),
            load=functools.partial(tensors.full, name),
            targets=[(weights_member(t, tp, stage, pp), key, t) for t in range(tp)],
        )  # fmt: skip

    for name in tensors.names():
        jobs.append(job(name, stage_of(name, per_stage, pp), name))
    if pp > 1 and arch.tied and tensors.has_llm:  # megatron-core keeps the tied embedding as the last stage's output
        jobs.append(job("model.embedding.word_embeddings.weight", pp - 1, "model.output_layer.weight"))
    return jobs


def new_config(raw: dict[str, Any], cfg: dict[str, Any], tp: int, pp: int, vocab: int, mcore: bool) -> dict[str, Any]:
    """The output ``model_config.yaml``: parallel sizes updated, the true vocabulary size recorded."""
    updated = {**cfg, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "vocab_size": vocab}
    if mcore:
        updated["mcore_gpt"] = True
    return {**raw, "model": updated} if isinstance(raw.get("model"), dict) else updated


def _model_section(config: dict[str, Any]) -> dict[str, Any]:
    return config["model"] if isinstance(config.get("model"), dict) else config


def _replace_tokenizer(config: dict[str, Any], tokenizer_model: str | Path | None) -> str | None:
    """Point the config at a new sentencepiece artifact; return the member it replaces (not copied over)."""
    if tokenizer_model is None:
        return None
    if not Path(tokenizer_model).is_file():
        raise NevaError(f"--tokenizer_model_path {tokenizer_model} does not exist")
    section = _model_section(config)
    tokenizer = dict(section.get("tokenizer") or {})
    old = tokenizer.get("model")
    tokenizer.update(library="sentencepiece", model="nemo:" + artifact_name("tokenizer.model"))
    section["tokenizer"] = tokenizer
    return old.removeprefix("nemo:") if isinstance(old, str) and old.startswith("nemo:") else None


def repartition(
    source: str | Path,
    output: str | Path,
    *,
    tp: int,
    pp: int = 1,
    fmt: str | None = None,
    to_mcore_names: bool = False,
    tokenizer_model: str | Path | None = None,
    overwrite: bool = False,
) -> ConvertSummary:
    """Write ``source`` re-split for ``tp``×``pp`` to ``output`` (format: ``fmt`` or the source's).

    ``tokenizer_model`` replaces the stored sentencepiece tokenizer (NeMo's ``--tokenizer_model_path``).
    """
    start = time.perf_counter()
    output = Path(output)
    check_output_path(output, overwrite, NEMO_FILE)
    with NemoArchive(source) as archive:
        cfg, arch = load_arch(archive)
        tp_rules.check_divisible(tp, num_attention_heads=arch.num_heads, num_query_groups=arch.num_groups)
        if arch.num_layers % pp:
            raise NevaError(f"pipeline_model_parallel_size ({pp}) must divide num_layers ({arch.num_layers})")
        fmt = fmt or archive.layout
        if fmt not in ("legacy", "dist"):
            raise NevaError(f"--format {fmt!r} is not one of legacy, dist")
        tensors = NemoTensors(archive, arch)
        legacy_names = tensors.legacy_names and not to_mcore_names
        if legacy_names and fmt == "dist":
            raise NevaError(f"{source} uses legacy NeMo names; dist checkpoints need megatron-core names: "
                            "add --to-mcore-names")  # fmt: skip
        if fmt == "dist" and any(name.startswith(nemo_vision.PREFIX) for name in tensors.names()):
            raise NevaError(f"{source} stores a trained vision tower (model.vision_model.*), which only the legacy "
                            "layout holds (NeVA readers take legacy files): use --format legacy")  # fmt: skip
        divisible = divisible_by(cfg, str(archive.path))
        padded = padded_vocab_size(arch.vocab_size, tp, divisible)
        raw = archive.read_config()
        artifacts, unreferenced = archive.split_artifacts(raw)
        if unreferenced:
            logger.warning("%s: not copying %d member(s) that %s does not reference (neither weights nor nemo: "
                           "artifacts): %s", source, len(unreferenced), CONFIG_NAME,
                           ", ".join(unreferenced[:5]) + (" …" if len(unreferenced) > 5 else ""))  # fmt: skip
        config = new_config(raw, cfg, tp, pp, arch.vocab_size, mcore=not legacy_names)
        replaced = _replace_tokenizer(config, tokenizer_model)
        jobs = legacy_jobs(tensors, tp, pp, legacy_names) if fmt == "legacy" else []
        parameters = sum(math.prod(tensors.shape(name)) for name in tensors.names())
        total = part_bytes(jobs, tp, padded)
        with (
            NemoWriter(output, overwrite=overwrite) as writer,
            progress(total=total or 1, desc="repartition", unit="B", unit_scale=True) as bar,
        ):
            for member in artifacts:
                if member != replaced:
                    with archive.open(member) as fin, writer.stream(member) as fout:
                        shutil.copyfileobj(fin, fout, 16 << 20)
            if tokenizer_model is not None:
                writer.add_file(_model_section(config)["tokenizer"]["model"].removeprefix("nemo:"), tokenizer_model)
            writer.add_yaml(CONFIG_NAME, config)
            if fmt == "legacy":
                write_legacy(writer, jobs, tp, padded, bar)
            else:
                write_dist_checkpoint(writer, dist_tensors(tensors, padded), arch)
                bar.update(total or 1)
    logger.info("repartitioned %s to TP=%d PP=%d (%s) at %s", source, tp, pp, fmt, output)
    return ConvertSummary(
        output=output,
        parameters=parameters,
        bytes_read=Path(source).stat().st_size if Path(source).is_file() else 0,
        bytes_written=output.stat().st_size,
        seconds=time.perf_counter() - start,
        peak_rss=peak_rss_bytes(),
    )
