"""megatron-core distributed checkpoints (``torch_dist``) of full, unsharded tensors, written and read in one process.

The keys follow megatron-core's ``GPTModel.sharded_state_dict(prefix="model.")``: per-layer tensors share
one key without the layer number (``model.decoder.layers.mlp.linear_fc2.weight``) and carry the layer
index on a prepended axis, so a model at any TP loads the file with ``dist_checkpointing.load`` and
megatron-core reshards on load. The whole model passes through memory at once here (a limit of
``dist_checkpointing.save``); the legacy format streams.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from neva_tools.checkpoint.results_queue import adopt_results_queue
from neva_tools.checkpoint.safe_dist import refusals_unwrapped

_LAYER_RE = re.compile(r"^(.*\.layers)\.(\d+)\.(.*)$")


def dist_key(name: str) -> tuple[str, int | None]:
    """``model.decoder.layers.3.mlp.linear_fc2.weight`` → (``model.decoder.layers.mlp.linear_fc2.weight``, 3)."""
    m = _LAYER_RE.match(name)
    if m is None:
        return name, None
    return f"{m.group(1)}.{m.group(3)}", int(m.group(2))


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A one-process gloo group when none exists (``dist_checkpointing`` asks for ranks); torn down after.

    Also applies the CPU compatibility patches (``dist_checkpointing`` synchronises CUDA) and the safe readers
    of ``neva_tools.checkpoint.safe_dist``.
    """
    from neva_tools.checkpoint.safe_dist import install
    from neva_tools.model.cpu_compat import apply_cpu_compat

    apply_cpu_compat()
    install()
    if torch.distributed.is_initialized():
        yield
        return
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def sharded_tensors(tensors: Iterable[tuple[str, torch.Tensor]], num_layers: int) -> dict:
    """ShardedTensors of full tensors with megatron-core's keys (per-layer ones on a prepended layer axis).

    In a multi-process job every rank holds the same full tensors: rank 0's are the main replica and
    the others are marked as replicas, as ``dist_checkpointing`` requires.
    """
    from megatron.core.dist_checkpointing import ShardedTensor

    replica = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    out = {}
    for name, tensor in tensors:
        key, layer = dist_key(name)
        if layer is None:
            out[name] = ShardedTensor.from_rank_offsets(key, tensor, replica_id=replica)
        else:
            out[name] = ShardedTensor.from_rank_offsets(
                key, tensor, (0, layer, num_layers), prepend_axis_num=1, replica_id=replica
            )
    return out


def save_full(tensors: Iterable[tuple[str, torch.Tensor]], num_layers: int, directory: Path) -> None:
    """Save full tensors as a ``torch_dist`` checkpoint in ``directory`` (which must be empty)."""
    from megatron.core import dist_checkpointing

    with single_process_group():
        adopt_results_queue()  # its server dies with this process, however the process dies
        dist_checkpointing.save(sharded_tensors(tensors, num_layers), str(directory))


def tensor_metadata(directory: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every tensor key stored in a ``torch_dist`` checkpoint (no tensor data is read)."""
    from megatron.core import dist_checkpointing

    with single_process_group():
        meta = dist_checkpointing.load_tensors_metadata(str(directory))
    return {key: (tuple(st.global_shape), st.dtype) for key, st in meta.items()}


def tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor key stored in a ``torch_dist`` checkpoint."""
    return {key: shape for key, (shape, _) in tensor_metadata(directory).items()}


def load_full(names: Iterable[str], directory: Path, num_layers: int) -> dict[str, torch.Tensor]:
    """Load the full tensors ``names`` (megatron-core names with layer numbers) from a ``torch_dist`` checkpoint."""
    from megatron.core import dist_checkpointing

    shapes = tensor_shapes(directory)
    empty = []
    for name in names:
        key, layer = dist_key(name)
        shape = shapes[key][1:] if layer is not None else shapes[key]
        empty.append((name, torch.empty(shape, dtype=torch.float32, device="cpu")))  # read to CPU memory
    with single_process_group(), refusals_unwrapped():
        request = sharded_tensors(empty, num_layers)
        _cast_to_stored_dtypes(request, directory)
        return dict(dist_checkpointing.load(request, str(directory)))


def _cast_to_stored_dtypes(request: dict, directory: Path) -> None:
    """Give each requested tensor the dtype it was saved with (loading does not convert dtypes)."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(directory))
    for st in request.values():
        st.data = st.data.to(meta[st.key].dtype)
        st.dtype = st.data.dtype
