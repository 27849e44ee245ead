"""``--all-checkpoints RUN_DIR``: every checkpoint a training run saved → one Hugging Face directory per step.

A run keeps ``runs/NAME/checkpoints/step=N`` (megatron-core ``torch_dist``, see ``neva_tools.train.checkpoint``)
and, once finished, ``runs/NAME/NAME.nemo``. The checkpoints hold weights only, so the model is described by the
run's final ``.nemo`` config or, for a run still in progress, by the training config given again (``--config``,
``--set key=value``). Each checkpoint becomes ``OUTPUT/step=N``; a step whose directory exists is skipped (outputs
appear only when complete), so re-running converts just the new checkpoints. ``OUTPUT`` must hold nothing but such
``step=N`` directories, and ``--overwrite`` replaces only Hugging Face model directories (checked before converting).
Text-pretraining runs (``model.text_pretrain``: the LLM alone, a GPT ``.nemo`` at the end) convert the same way with
``nemo-to-hf --all-checkpoints``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neva_tools.errors import NevaError
from neva_tools.export.source import CheckpointSource
from neva_tools.utils.atomic import (
    CHECKPOINT_EXPORTS_DIR,
    HF_MODEL_DIR,
    atomic_path,
    check_output_kind,
    check_output_path,
)
from neva_tools.utils.temporaries import scratch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """What happened to one checkpoint."""

    checkpoint: Path
    output: Path
    converted: bool  # False: the output existed and was kept


def run_description(run_dir: Path, config: str | Path | None = None,
                    overrides: Sequence[str] = ()) -> tuple[dict[str, Any], Path]:  # fmt: skip
    """(model config, tokenizer source) describing a run's checkpoints (NeVA or text pretraining); see the module
    docstring."""
    if config is not None or overrides:
        from omegaconf import OmegaConf

        from neva_tools.config.load import load_config
        from neva_tools.model import neva_io
        from neva_tools.tokenizer.text import TextTokenizer

        m = load_config(config, overrides).model
        llm = m.mm_cfg.llm.from_pretrained
        if llm is None or not Path(llm).exists():
            raise NevaError(f"model.mm_cfg.llm.from_pretrained {llm!r} is not an existing .nemo")
        llm_cfg, vocab = neva_io.llm_config(llm)
        if m.text_pretrain.enabled:  # the LLM alone, with its own vocabulary (train_text refuses a larger tokenizer)
            return {**llm_cfg, "vocab_size": vocab}, Path(m.tokenizer.model or llm)
        tokens = TextTokenizer(m.tokenizer.model or neva_io.extract_tokenizer(llm, neva_io.scratch_dir())).vocab_size
        # vocab_size as neva train records it: tokens added to the LLM's vocabulary have rows of their own
        cfg = {**llm_cfg, "mm_cfg": OmegaConf.to_container(m.mm_cfg), "data": OmegaConf.to_container(m.data),
               "vocab_size": max(vocab, tokens)}  # fmt: skip
        return cfg, Path(m.tokenizer.model or llm)
    finals = sorted(run_dir.glob("*.nemo"))
    if len(finals) != 1:
        found = f"found {', '.join(p.name for p in finals)}" if finals else "it has none (the run has not finished)"
        raise NevaError(f"{run_dir} must hold exactly one final .nemo to describe its checkpoints ({found}); pass "
                        "the training config instead: --config RECIPE.yaml [--set key=value ...]")  # fmt: skip
    from neva_tools.checkpoint.nemo_archive import NemoArchive
    from neva_tools.checkpoint.nemo_tensors import load_arch, model_config

    with NemoArchive(finals[0]) as archive:
        cfg = model_config(archive)
        if "mm_cfg" not in cfg:  # a text-pretraining run's GPT .nemo: the vocabulary size may come from its tokenizer
            cfg = {**cfg, "vocab_size": load_arch(archive)[1].vocab_size}
        return cfg, finals[0]


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run directory (or of its ``checkpoints/`` directory), oldest first."""
    from neva_tools.train.checkpoint import checkpoints

    root = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    found = list(checkpoints(root))
    if not found:
        raise NevaError(f"{run_dir} holds no training checkpoints (step=N directories with metadata.json under "
                        f"{root})")  # fmt: skip
    return found


def convert_all(run_dir: str | Path, output: str | Path, write: Callable[[CheckpointSource, Path], object], *,
                config: str | Path | None = None, overrides: Sequence[str] = (),
                overwrite: bool = False) -> list[StepResult]:  # fmt: skip
    """Convert every checkpoint of ``run_dir`` with ``write(source, target)`` into ``output/step=N``."""
    run_dir, output = Path(run_dir), Path(output)
    if not run_dir.is_dir():
        raise NevaError(f"run directory {run_dir} does not exist")
    found = run_checkpoints(run_dir)
    check_output_kind(output, CHECKPOINT_EXPORTS_DIR)
    todo = [c for c in found if overwrite or not (output / c.name).exists()]
    for checkpoint in todo:
        check_output_path(output / checkpoint.name, overwrite, HF_MODEL_DIR)
    results = [StepResult(c, output / c.name, False) for c in found if c not in todo]
    for done in results:
        logger.info("%s: already converted, skipped (%s)", done.checkpoint.name, done.output)
    if todo:
        cfg, tokenizer = run_description(run_dir, config, overrides)
        output.mkdir(parents=True, exist_ok=True)
        for checkpoint in todo:
            with CheckpointSource(checkpoint, cfg, tokenizer) as source:
                write(source, output / checkpoint.name)
            results.append(StepResult(checkpoint, output / checkpoint.name, True))
            logger.info("%s → %s", checkpoint, output / checkpoint.name)
    return sorted(results, key=lambda r: found.index(r.checkpoint))


def write_llm(source: CheckpointSource, output: Path, *, dtype: str | None = None, max_shard_size: str = "5GB",
              overwrite: bool = False) -> Path:  # fmt: skip
    """The LLM of a training checkpoint as a Hugging Face causal-LM directory (``nemo-to-hf --all-checkpoints``).

    ``dtype`` defaults to the run's precision.
    """
    from neva_tools.convert.hf_to_nemo import DTYPES
    from neva_tools.convert.nemo_to_hf import _HF_DTYPE_NAMES, _PRECISION_TO_DTYPE, _ShardWriter, hf_tensors, parse_size

    dtype = dtype or _PRECISION_TO_DTYPE.get(str(source.cfg.get("precision", "32")), "fp32")
    if dtype not in DTYPES:
        raise NevaError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    arch = source.arch
    with atomic_path(output, kind=HF_MODEL_DIR, overwrite=overwrite) as tmp, scratch() as scratch_dir:
        shards = _ShardWriter(tmp, parse_size(max_shard_size))
        for name, hf_names, split in arch.entries():
            for hf_name, tensor in hf_tensors(name, source.llm_tensor(name), split, hf_names, arch).items():
                shards.add(hf_name, tensor.to(DTYPES[dtype]))
        shards.finish()
        hf_config = arch.to_hf_config(source.cfg.get("hf_config"), dtype=_HF_DTYPE_NAMES[dtype])
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        tokenizer = source.tokenizer(scratch_dir)
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        else:
            for file in tokenizer.iterdir():
                shutil.copyfile(file, tmp / file.name)
    return output
