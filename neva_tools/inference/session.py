"""The process group of an inference command: one process (TP=1) or ``torchrun --nproc_per_node N`` for TP=N."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from neva_tools.errors import NevaError
from neva_tools.model.parallel import destroy_distributed, init_distributed, launch_env


@contextlib.contextmanager
def inference_session(tp: int, command: str, seed: int = 1234) -> Iterator[None]:
    """Megatron parallel state with ``tp`` ranks for the body; every process must be one TP rank."""
    world = launch_env().world_size
    if world != tp:
        raise NevaError(f"--tp {tp} needs exactly {tp} process(es), found {world}: run "
                        f"`torchrun --nproc_per_node {tp} -m neva_tools {command} ... --tp {tp}`"
                        + ("" if tp > 1 else " or drop torchrun"))  # fmt: skip
    init_distributed(tp=tp, seed=seed)
    try:
        yield
    finally:
        destroy_distributed()
