"""Writing converted tensors as the ``model_weights/`` dist checkpoint inside a ``.nemo`` archive."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from neva_tools.checkpoint.dist import save_full
from neva_tools.checkpoint.nemo_archive import DIST_DIR
from neva_tools.checkpoint.nemo_writer import NemoWriter
from neva_tools.mappings.llama import LlamaArch


def write_dist_checkpoint(writer: NemoWriter, tensors: Iterable[tuple[str, torch.Tensor]], arch: LlamaArch) -> None:
    """Save full megatron-core ``tensors`` with ``dist_checkpointing`` and add them under ``model_weights/``."""
    with tempfile.TemporaryDirectory(prefix=".neva-dist-", dir=writer.path.parent) as tmp:
        save_full(list(tensors), arch.num_layers, Path(tmp))
        writer.add_dir(DIST_DIR, tmp)
