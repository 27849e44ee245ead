"""Training checkpoints in megatron-core's distributed format: resumable at another TP size.

A checkpoint is a directory: the model's ``sharded_state_dict`` and the AdamW moments sharded exactly
like their parameters (``optimizer.state.exp_avg.<param key>``), plus a common part with everything
else Lightning keeps (loop progress, scheduler, step counters, callbacks). Loading builds the same
structure from the *current* model and optimizer, so megatron-core reshards on load when the TP size
differs. Per-rank RNG states are kept only for same-layout resumes.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import torch

MODEL_PREFIX = "model."  # the LightningModule attribute that holds the megatron-core model


def _model_request(model: torch.nn.Module) -> dict[str, Any]:
    """The model's sharded state dict without Transformer-Engine ``_extra_state`` entries."""
    return {k: v for k, v in model.sharded_state_dict(prefix=MODEL_PREFIX).items() if not k.endswith("_extra_state")}


def _ensure_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create zero AdamW moments for parameters that have none yet (a fresh optimizer before resuming)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if "exp_avg" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device="cpu")  # where AdamW keeps it
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _optimizer_request(optimizer: torch.optim.Optimizer, model_request: dict[str, Any]) -> tuple[dict, float]:
    """The optimizer state as sharded tensors mirroring the parameters; returns (sharded dict, step)."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    _ensure_adam_state(optimizer)
    params = list(chain.from_iterable(g["params"] for g in optimizer.param_groups))
    id_map = get_param_id_to_sharded_param_map(model_request, params)
    state = optimizer.state_dict()
    steps = [float(s["step"]) for s in state["state"].values() if "step" in s]
    optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
    return state, max(steps, default=0.0)


def save(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         common: dict[str, Any]) -> None:  # fmt: skip
    """Write a checkpoint directory (all ranks call this; megatron-core coordinates the writes)."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if torch.distributed.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    request = _model_request(model)
    sharded: dict[str, Any] = {"model": request}
    if optimizer is not None:
        sharded["optimizer"], step = _optimizer_request(optimizer, request)
        common = {**common, "optimizer_step": step}
    sharded["common"] = common
    dist_checkpointing.save(sharded, str(directory))


def load(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``) at the current TP; return the common part."""
    from megatron.core import dist_checkpointing

    from neva_tools.checkpoint.safe_dist import check_directory, refusals_unwrapped

    check_directory(directory)
    request = _model_request(model)
    sharded: dict[str, Any] = {"model": request}
    if optimizer is not None:
        sharded["optimizer"], _ = _optimizer_request(optimizer, request)
    with refusals_unwrapped():
        loaded = dist_checkpointing.load(sharded, str(directory))
    state = {k.removeprefix(MODEL_PREFIX): v for k, v in loaded["model"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        from neva_tools.errors import NevaError

        raise NevaError(f"checkpoint {directory} does not fit the model: missing {missing}, unexpected {unexpected}")
    common = loaded.get("common") or dist_checkpointing.load_common_state_dict(str(directory)).get("common", {})
    if optimizer is not None:
        optim_state = loaded["optimizer"]
        step = torch.tensor(float(common.get("optimizer_step", 0.0)), device="cpu")
        for param_state in optim_state["state"].values():
            param_state["step"] = step.clone()
        current = optimizer.state_dict()["param_groups"]
        optim_state["param_groups"] = [{**g, "params": c["params"]} for g, c in zip(optim_state["param_groups"],
                                                                                   current, strict=True)]  # fmt: skip
        optimizer.load_state_dict(optim_state)
    return common


def checkpoints(root: str | Path) -> Iterator[Path]:
    """Checkpoint directories under ``root`` (``step=N`` names), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return iter(())
    found = [p for p in root.iterdir() if p.is_dir() and (p / "metadata.json").is_file()]
    return iter(sorted(found, key=lambda p: int("".join(ch for ch in p.name if ch.isdigit()) or 0)))


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list(checkpoints(root))
    return found[-1] if found else None


def remove(directory: str | Path) -> None:
    """Delete a checkpoint directory."""
    shutil.rmtree(directory, ignore_errors=True)
