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

from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.checkpoint.nemo_tensors import model_config
from neva_tools.checkpoint.nemo_writer import NemoWriter
from neva_tools.model.save_nemo import canonical_state, save_sharded_nemo

_DTYPES = {"bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "16": torch.float16, "16-mixed": torch.float16}


def precision_dtype(cfg: dict[str, Any]) -> torch.dtype:
    """The tensor dtype a NeMo ``precision`` value stands for (fp32 unless bf16/16)."""
    return _DTYPES.get(str(cfg.get("precision", 32)), torch.float32)


def save_gpt_nemo(model: torch.nn.Module, output: str | Path, source: str | Path,
                  tokenizer: str | Path | None = None) -> Path | None:  # fmt: skip
    """Write ``model`` as a ``.nemo`` like ``source`` (collective: every rank calls it; returns the path on rank 0)."""
    with NemoArchive(source) as archive:
        cfg = model_config(archive)
    dtype = precision_dtype(cfg)

    def copy_source_artifacts(writer: NemoWriter) -> None:
        with NemoArchive(source) as archive:
            for name in archive.split_artifacts()[0]:  # the members the config references (not junk)
                with archive.open(name) as fin, writer.stream(name) as fout:
                    shutil.copyfileobj(fin, fout, 16 << 20)

    return save_sharded_nemo(output, lambda: canonical_state(model, dtype), cfg, tokenizer=tokenizer,
                             extra=None if tokenizer else copy_source_artifacts)  # fmt: skip
