"""Training checkpoints in megatron-core's distributed format: resumable at another TP, PP or DP size.

A checkpoint is a directory: the model's ``sharded_state_dict`` (``model.<key>``, the unwrapped megatron-core model,
so the keys do not depend on the training wrappers), megatron-core's optimizer ``sharded_state_dict`` (Adam moments
and fp32 master weights, each shaped and sharded like its parameter: ``optimizer.state.exp_avg.<key>``,
``optimizer.state.exp_avg_sq.<key>``, for 16-bit weights ``optimizer.state.fp32_param.<key>``; the distributed
optimizer gathers its shards into the same shapes, master weights as ``optimizer.state.param.<key>``, see
:data:`DISTRIBUTED_OPTIMIZER_SHARDING`), plus a common part with everything else: Lightning's loop progress and
callbacks, the module's schedulers, the optimizer's param groups, step and loss scaler. Loading builds the same
structure from the *current* model and optimizer, so megatron-core reshards on load when the TP or DP size differs.
Pipeline stages save their layers under global layer numbers (megatron-core's layer offsets; interleaved chunks
through :class:`~neva_tools.train.pipeline.PipelineChunks`), so a checkpoint also resumes at another pipeline size,
interleaved or not (``tests/train/test_pipeline.py``: saved at PP 2 × 2 virtual stages, resumed at TP 2).
A checkpoint resumes with the optimizer (``model.optim.name``) and precision it was written with.

A checkpoint is complete once megatron-core wrote its ``metadata.json`` (last); :func:`problems` checks a complete
one before a run resumes from it (its small files readable, every tensor file as long as ``.metadata`` records), so
a file cut short by a full disk or an interrupted copy makes the run fall back to an earlier checkpoint
(``neva_tools.train.paths.resume_checkpoint``). Saving over an unusable checkpoint of the same step replaces it; a
full disk while saving is a ``NevaError`` naming the checkpoint, the incomplete one removed.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from neva_tools.checkpoint.results_queue import adopt_results_queue

MODEL_PREFIX = "model."  # the LightningModule attribute that holds the megatron-core model

#: The distributed optimizer's checkpoint layout (megatron-core ``DistributedOptimizer.sharded_state_dict``):
#: 'fully_reshardable' gathers each data-parallel group's state shards on its DP rank 0 (over gloo, in CPU memory:
#: the ``mem_efficient`` variant) and stores every parameter's master weight and moments shaped and keyed like the
#: parameter's own sharded tensor, so the checkpoint loads at another DP, TP or PP size (and like the other
#: optimizers' checkpoints). 'dp_reshardable' would allow another DP size only; 'fully_sharded_model_space' (flattened
#: tensors) is no longer supported by megatron-core 0.16's dist checkpointing.
DISTRIBUTED_OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable",
                                  "distrib_optim_fully_reshardable_mem_efficient": True}  # fmt: skip


def _model_request(model: torch.nn.Module) -> dict[str, Any]:
    """The model's sharded state dict without Transformer-Engine ``_extra_state`` entries."""
    return {k: v for k, v in model.sharded_state_dict(prefix=MODEL_PREFIX).items() if not k.endswith("_extra_state")}


def _ensure_adam_state(optimizer: Any) -> None:
    """Give every parameter of a fresh torch Adam (no step taken yet) zero moments and step, as torch's Adam creates
    them: megatron-core's distributed optimizer needs a per-parameter step to build its state dict for loading when it
    runs torch's Adam (without Transformer Engine or Apex, whose fused Adams keep the step in the param groups)."""
    from neva_tools.train.megatron_optim import torch_optimizers

    for inner in torch_optimizers(optimizer):
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            on_device = bool(group.get("fused") or group.get("capturable"))
            for p in group["params"]:
                state = inner.state[p]
                if "exp_avg" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _optimizer_request(optimizer: Any, model_request: dict[str, Any], *, is_loading: bool) -> dict[str, Any]:
    """megatron-core's optimizer state, its tensors sharded like the parameters of ``model_request``."""
    if is_loading:
        _ensure_adam_state(optimizer)
    metadata = dict(DISTRIBUTED_OPTIMIZER_SHARDING)  # ignored by the other optimizers
    return optimizer.sharded_state_dict(model_request, is_loading=is_loading, metadata=metadata)


@contextlib.contextmanager
def _loading_fixes() -> Iterator[None]:
    """Two fixes to megatron-core 0.16.1's optimizer loading, in force while a checkpoint is loaded.

    * Param groups: megatron-core matches saved param groups to the optimizer's by ``(wd_mult, lr_mult,
      is_expert_parallel, is_decoupled_lr)`` (``param_group_identifier_keys``). The part groups of
      :func:`neva_tools.train.megatron_optim.param_group_overrides` (projector, vision, LLM) differ in ``part`` and
      ``lr`` but share those four values, so one part's group would take another's saved learning rate (the
      distributed optimizer) or parameter list (the others, which then fail). Every group has ``part``: match on it.
    * Adam's ``step`` with the distributed optimizer and torch's Adam (no Transformer Engine or Apex, as on CPU):
      ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every key of the parameter's optimizer
      state from the loaded tensors, which never hold ``step`` (megatron-core restores it from the param groups), so
      loading fails with ``KeyError: 'step'``. Copy the loaded keys only.
    """
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.optimizer import optimizer as base

    keys = base.param_group_identifier_keys
    extended = keys if "part" in keys else (*keys, "part")
    cls = distrib_optimizer.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states

    def set_states(self: Any, model_param: torch.nn.Parameter, tensors: dict[str, torch.Tensor]) -> None:
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state.get(self.optimizer.param_groups[group_index]["params"][group_order], {})
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    base.param_group_identifier_keys = distrib_optimizer.param_group_identifier_keys = extended
    cls._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        base.param_group_identifier_keys = distrib_optimizer.param_group_identifier_keys = keys
        cls._set_main_param_and_optimizer_states = original


def save(directory: str | Path, model: torch.nn.Module, optimizer: Any, common: dict[str, Any]) -> None:
    """Write a checkpoint directory (all ranks call this; megatron-core coordinates the writes).

    ``model`` is the unwrapped megatron-core model (no DDP or ``Float16Module``), ``optimizer`` megatron-core's
    optimizer over it (or None: weights only).
    """
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        _clear_for_save(directory)
    torch.distributed.barrier()
    request = _model_request(model)
    sharded: dict[str, Any] = {"model": request}
    if optimizer is not None:
        sharded["optimizer"] = _optimizer_request(optimizer, request, is_loading=False)
    sharded["common"] = common
    adopt_results_queue()  # its server dies with this rank, however the rank dies
    try:
        with _common_save_shared():
            dist_checkpointing.save(sharded, str(directory))
    except BaseException as exc:
        _raise_write_failure(exc, directory, rank0)
        raise


@contextlib.contextmanager
def _common_save_shared() -> Iterator[None]:
    """megatron-core's common part (``common.pt``, written by rank 0 first) made to fail like the rest of a save.

    ``torch.save`` to a path reports a full disk as ``unexpected pos …`` (no errno, no file name): the part is
    serialized in memory (it is small: loops, callbacks, schedulers, param groups) and written with Python's file
    I/O, whose ``OSError`` names both. Rank 0's failure is broadcast, so every rank raises it instead of the others
    waiting for rank 0 in the sharded save's collectives.
    """
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonSaveStrategy

    original = TorchCommonSaveStrategy.save_common

    def save_common(self: Any, common_state_dict: Any, checkpoint_dir: str | Path) -> None:
        failure: BaseException | None = None
        if torch.distributed.get_rank() == 0:
            try:
                buffer = io.BytesIO()
                torch.save(common_state_dict, buffer)
                with open(os.path.join(checkpoint_dir, COMMON_STATE_FNAME), "wb") as fh:
                    fh.write(buffer.getbuffer())
            except Exception as exc:
                failure = exc
        shared: list[Any] = [None if failure is None else failure if isinstance(failure, OSError) else
                             RuntimeError(f"rank 0 could not write {COMMON_STATE_FNAME}: {failure}")]  # fmt: skip
        torch.distributed.broadcast_object_list(shared, src=0)
        if failure is not None:
            raise failure
        if shared[0] is not None:
            raise shared[0]

    TorchCommonSaveStrategy.save_common = save_common
    try:
        yield
    finally:
        TorchCommonSaveStrategy.save_common = original


def _clear_for_save(directory: Path) -> None:
    """Make way for a checkpoint at ``directory`` (rank 0). megatron-core writes over what is there and keeps the old
    ``metadata.json`` until it writes its own, so an unusable checkpoint of this step (incomplete, or with
    :func:`problems`: the run resumed from an earlier one) is removed, and a usable one loses its ``metadata.json``
    first: a save that stops half-way leaves an incomplete checkpoint, never a mix that looks complete."""
    if directory.is_dir() and any(directory.iterdir()):
        if not (directory / "metadata.json").is_file() or problems(directory):
            remove(directory)
        else:
            (directory / "metadata.json").unlink()
    directory.mkdir(parents=True, exist_ok=True)


def _raise_write_failure(exc: BaseException, directory: Path, rank0: bool) -> None:
    """A full disk (also inside torch's ``CheckpointException``, from any rank) or another ``OSError`` while saving
    ``directory`` as a ``NevaError`` naming it; rank 0 removes the incomplete checkpoint. Other errors: return (the
    caller re-raises them)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from neva_tools.errors import NevaError
    from neva_tools.utils.atomic import disk_full, disk_full_error

    full = disk_full(exc)
    if full is None and not rank0 and isinstance(exc, CheckpointException) and not exc.failures:
        # megatron-core gives the failures' details to the coordinator (rank 0) only
        raise NevaError(f"could not save checkpoint {directory}: writing failed on some rank; rank 0 reports why")
    if full is None and not isinstance(exc, OSError):
        return
    if rank0:
        remove(directory)
    if full is not None:
        removed = "the incomplete checkpoint was removed (a re-run resumes from the last complete one)"
        raise disk_full_error(directory, full, removed=removed) from None
    if isinstance(exc, OSError):
        raise NevaError(f"could not save checkpoint {directory}: {exc.strerror or exc} ({exc.filename or directory}); "
                        "the incomplete checkpoint was removed") from None  # fmt: skip


def _describe(engine: dict[str, Any] | None) -> str:
    if engine is None:
        return "an earlier engine (torch AdamW)"
    return f"model.optim.name {engine.get('optimizer')} and precision {engine.get('precision')}"


def load(directory: str | Path, model: torch.nn.Module, optimizer: Any,
         engine: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Load a checkpoint into ``model`` (and ``optimizer``) at the current TP, PP and DP sizes; return the common
    part.

    ``engine`` (``{"optimizer": name, "precision": ...}``, saved in the common part as ``neva_engine``) must match
    the checkpoint's when the optimizer is loaded: each optimizer and precision stores a different state.
    """
    from megatron.core import dist_checkpointing

    from neva_tools.checkpoint.safe_dist import check_directory, refusals_unwrapped
    from neva_tools.errors import NevaError

    check_directory(directory)
    if optimizer is not None and engine is not None:
        with refusals_unwrapped():
            saved = dist_checkpointing.load_common_state_dict(str(directory)).get("common", {}).get("neva_engine")
        if saved != engine:
            raise NevaError(f"checkpoint {directory} holds the optimizer state of {_describe(saved)} but this run "
                            f"trains with {_describe(engine)}: resume with the checkpoint's model.optim.name and "
                            "trainer.precision, or start a new run (exp_manager.resume_if_exists=false or another "
                            "name)")  # fmt: skip
    request = _model_request(model)
    sharded: dict[str, Any] = {"model": request}
    if optimizer is not None:
        with _loading_fixes():
            sharded["optimizer"] = _optimizer_request(optimizer, request, is_loading=True)
    with refusals_unwrapped():
        loaded = dist_checkpointing.load(sharded, str(directory))
    state = {k.removeprefix(MODEL_PREFIX): v for k, v in loaded["model"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise NevaError(f"checkpoint {directory} does not fit the model: missing {missing}, unexpected {unexpected}")
    common = loaded.get("common") or dist_checkpointing.load_common_state_dict(str(directory)).get("common", {})
    if optimizer is not None:
        with _loading_fixes():
            optimizer.load_state_dict(loaded["optimizer"])
        _unshare_steps(optimizer)
    return common


def _unshare_steps(optimizer: Any) -> None:
    """Give every parameter its own Adam ``step`` tensor after loading.

    megatron-core's optimizers restore torch Adam's per-parameter ``step`` as one tensor shared by all parameters
    (``DistributedOptimizer.load_state_dict``: ``s["step"] = step``; ``_restore_common_per_param_step`` copies
    per parameter, this makes it uniform). torch's Adam increments each parameter's ``step`` in place, so a shared
    tensor would count once per parameter per step and skew Adam's bias correction from the first resumed step.
    """
    from neva_tools.train.megatron_optim import torch_optimizers

    for inner in torch_optimizers(optimizer):
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


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


def problems(directory: str | Path) -> list[str]:
    """Why the complete checkpoint ``directory`` cannot be resumed from, each naming its file (empty: usable).

    Reads the small files through ``neva_tools.checkpoint.safe_dist`` (``metadata.json``; ``.metadata`` through the
    allow-list unpickler; every ``*.pt``, ``common.pt`` included, with ``weights_only``) and checks that every tensor
    file (``*.distcp``) holds the bytes ``.metadata`` records in it: a file cut short or missing is found, altered
    bytes are not. Every rank may call this (no collective).
    """
    from neva_tools.checkpoint import safe_dist
    from neva_tools.errors import NevaError

    safe_dist.install()
    directory = Path(directory)
    found: list[str] = []
    try:
        safe_dist._backends(directory, str(directory))
    except NevaError as exc:
        found.append(str(exc))
    metadata = None
    path = directory / ".metadata"
    try:
        with open(path, "rb") as stream:
            metadata = safe_dist.load_metadata(stream, str(path))
    except NevaError as exc:
        found.append(str(exc))
    except OSError as exc:
        found.append(f"{path} cannot be read ({exc.strerror or exc})")
    if not (directory / "common.pt").is_file():
        found.append(f"{directory / 'common.pt'} is missing")
    for path in sorted(directory.rglob("*.pt")):
        try:
            safe_dist.weights_only_load(path, str(path))
        except NevaError as exc:
            first = str(exc).split(". ")[0]  # torch's zip reader appends paragraphs of advice
            found.append(first + ")" * (first.count("(") - first.count(")")))
    if metadata is not None:
        found += _shard_problems(directory, metadata)
    return found


def _shard_problems(directory: Path, metadata: Any) -> list[str]:
    """Tensor files missing or shorter than the end of the last item ``.metadata`` records in them."""
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = str(getattr(info, "relative_path", ""))
        needed[name] = max(needed.get(name, 0), int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0)))
    if not needed and getattr(metadata, "state_dict_metadata", None):
        return [f"{directory / '.metadata'} records no tensor files"]
    found = []
    for name, size in sorted(needed.items()):
        path = directory / name
        if not name or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            found.append(f"{directory / '.metadata'} names a tensor file outside the checkpoint ({name!r})")
        elif not path.is_file():
            found.append(f"{path} is missing (.metadata records {size:,} bytes in it)")
        elif (have := path.stat().st_size) < size:
            found.append(f"{path} is cut short: {have:,} bytes, .metadata records {size:,}")
    return found


def latest_usable(root: str | Path) -> tuple[Path | None, dict[Path, list[str]]]:
    """The newest complete checkpoint under ``root`` without :func:`problems` (or None), and the newer complete ones
    that have problems, newest first, with their problems."""
    skipped: dict[Path, list[str]] = {}
    for path in reversed(list(checkpoints(root))):
        found = problems(path)
        if not found:
            return path, skipped
        skipped[path] = found
    return None, skipped


def remove(directory: str | Path) -> None:
    """Delete a checkpoint directory."""
    shutil.rmtree(directory, ignore_errors=True)


def prune(root: str | Path, keep: int, protect: Iterable[str | Path] = ()) -> list[Path]:
    """Delete the oldest complete ``step=N`` checkpoints under ``root`` so the newest ``keep`` remain; return them.

    ``keep < 0`` deletes nothing. A ``protect``ed directory (the one just written, the one the run resumed from) is
    never deleted; incomplete directories (no ``metadata.json``: a save that did not finish) and other names are
    left alone. Call on one rank, after every rank finished writing.
    """
    if keep < 0:
        return []
    kept = {Path(p).resolve() for p in protect}
    found = [p for p in checkpoints(root) if p.name.startswith("step=") and p.name[5:].isdigit()]
    doomed = [p for p in found[: max(0, len(found) - keep)] if p.resolve() not in kept]
    for path in doomed:
        remove(path)
    return doomed
