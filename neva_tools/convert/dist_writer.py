"""Writing converted tensors as the ``model_weights/`` dist checkpoint inside a ``.nemo`` archive."""

from __future__ import annotations

import shutil
from collections.abc import Iterable

import torch

from neva_tools.checkpoint.dist import save_full
from neva_tools.checkpoint.nemo_archive import DIST_DIR
from neva_tools.checkpoint.nemo_writer import NemoWriter
from neva_tools.mappings.llama import LlamaArch
from neva_tools.utils.atomic import kill_point, make_temp


def write_dist_checkpoint(writer: NemoWriter, tensors: Iterable[tuple[str, torch.Tensor]], arch: LlamaArch) -> None:
    """Save full megatron-core ``tensors`` with ``dist_checkpointing`` and add them under ``model_weights/``.

    The checkpoint is staged next to the output (``.<name>.stage-<pid>-…``, on the output's file system) and removed
    afterwards; one that a killed process left is removed by the next writer of the output (``atomic_path``). A full
    disk reaches ``atomic_path`` inside torch's ``CheckpointException`` and is reported there as ours.
    """
    staging = make_temp(writer.path, is_dir=True, role="stage")
    try:
        save_full(list(tensors), arch.num_layers, staging)
        kill_point("dist-staging")
        writer.add_dir(DIST_DIR, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
