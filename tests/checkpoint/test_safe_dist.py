"""Untrusted ``torch_dist`` checkpoints: a pickle that would run code is refused in every reading path.

Each malicious file's payload would create a marker file; every test checks the marker was never made.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from dist_helpers import in_process_distributed

from neva_tools.checkpoint import safe_dist
from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.cli.main import main
from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
from neva_tools.errors import NevaError


class _RunsCode:
    """Unpickling this calls ``os.system``: what an attacker would put in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def _metadata_payload(marker: Path) -> tuple[str, bytes]:
    return ".metadata", pickle.dumps(_RunsCode(marker))


def _common_payload(marker: Path) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    torch.save({"common": _RunsCode(marker)}, buffer)
    return "common.pt", buffer.getvalue()


PAYLOADS = {"metadata": _metadata_payload, "common": _common_payload}


@pytest.fixture(scope="module")
def dist_nemo(llama_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "llm.nemo"
    convert_hf_to_nemo(str(llama_hf), out, fmt="dist")
    return out


@pytest.fixture(params=sorted(PAYLOADS))
def tampered(request: pytest.FixtureRequest, dist_nemo: Path, tmp_path: Path) -> Iterator[tuple[Path, Path, str]]:
    """(a dist .nemo with one malicious member, the marker its payload would create, the member's name)."""
    marker = tmp_path / "PWNED"
    member, payload = PAYLOADS[request.param](marker)
    out = tmp_path / "evil.nemo"
    with tarfile.open(dist_nemo) as src, tarfile.open(out, "w") as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read() if info.isfile() else None
            if info.name.endswith(f"model_weights/{member}"):
                data = payload
                info.size = len(payload)
            dst.addfile(info, io.BytesIO(data) if data is not None else None)
    yield out, marker, f"model_weights/{member}"
    assert not marker.exists(), "the checkpoint's payload ran"


def _checkpoint_dir(nemo: Path, dest: Path) -> Path:
    """The ``model_weights/`` of a .nemo as a plain directory (the layout of a training checkpoint)."""
    with NemoArchive(nemo) as archive:
        return archive.extract("model_weights", dest)


@pytest.mark.parametrize(
    "command", [["repartition", "--tp", "2"], ["convert", "nemo-to-hf"]], ids=["repartition", "nemo-to-hf"]
)
def test_cli_refuses_and_writes_nothing(
    tampered: tuple[Path, Path, str], tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    evil, _, member = tampered
    out = tmp_path / "out"
    argv = [*command, "--input", str(evil), "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{evil}:{member}" in err and "posix.system" in err and "Traceback" not in err
    assert not out.exists()


def test_llm_loading_for_training_refuses(tampered: tuple[Path, Path, str]) -> None:
    """The two ways ``neva train`` reads an LLM ``.nemo``: megatron's own dist load and full tensors by name."""
    from neva_tools.checkpoint.nemo_tensors import load_arch
    from neva_tools.model.from_nemo import load_gpt_from_nemo, rank_state_dict

    evil, _, member = tampered
    with in_process_distributed(tp=1):
        with pytest.raises(NevaError, match=f"{member}.*posix.system"):
            load_gpt_from_nemo(evil)
        with NemoArchive(evil) as archive, pytest.raises(NevaError, match=r"posix\.system"):
            _, arch = load_arch(archive)
            rank_state_dict(archive, arch, 1, 0, 384)


def test_resume_and_export_of_a_checkpoint_directory_refuse(tampered: tuple[Path, Path, str], tmp_path: Path) -> None:
    """``runs/NAME/checkpoints/step=N``: resume (consumed samples, the load itself) and export read it."""
    from neva_tools.export.source import CheckpointSource
    from neva_tools.train import checkpoint as ckpt
    from neva_tools.train.fit import consumed_samples

    evil, _, member = tampered
    directory = _checkpoint_dir(evil, tmp_path / "step=4")
    name = member.split("/")[-1]
    readers: list[Callable[[], object]] = [
        lambda: consumed_samples(directory, 2),
        lambda: ckpt.load(directory, torch.nn.Linear(1, 1), None),
        lambda: CheckpointSource(directory, {}, tmp_path / "tok.model"),
    ]
    for read in readers:
        with pytest.raises(NevaError, match=f"{name}.*posix.system"):
            read()


def test_megatron_load_is_guarded_without_the_check(dist_nemo: Path, tmp_path: Path) -> None:
    """Defence in depth: megatron-core's own metadata reader goes through the allow-list once ``install()`` ran."""
    from megatron.core import dist_checkpointing

    from neva_tools.checkpoint.dist import single_process_group

    directory = _checkpoint_dir(dist_nemo, tmp_path / "ckpt")
    name, payload = _metadata_payload(tmp_path / "PWNED")
    (directory / name).write_bytes(payload)
    with single_process_group(), pytest.raises(NevaError, match=r"\.metadata tries to load posix.system"):
        dist_checkpointing.load_tensors_metadata(str(directory))
    assert not (tmp_path / "PWNED").exists()


def test_unknown_backend_and_missing_files_are_named(dist_nemo: Path, tmp_path: Path) -> None:
    directory = _checkpoint_dir(dist_nemo, tmp_path / "ckpt")
    safe_dist.check_directory(directory)  # ours is fine
    (directory / "metadata.json").write_text('{"sharded_backend": "evil", "common_backend": "torch"}')
    with pytest.raises(NevaError, match=r"sharded_backend 'evil'.*torch_dist"):
        safe_dist.check_directory(directory)
    (directory / "metadata.json").write_text("{not json")
    with pytest.raises(NevaError, match=r"metadata\.json is not valid JSON"):
        safe_dist.check_directory(directory)
    (directory / "metadata.json").unlink()
    with pytest.raises(NevaError, match=r"no metadata\.json"):
        safe_dist.check_directory(directory)


def test_garbled_metadata_is_a_clear_error(dist_nemo: Path, tmp_path: Path) -> None:
    directory = _checkpoint_dir(dist_nemo, tmp_path / "ckpt")
    (directory / ".metadata").write_bytes((directory / ".metadata").read_bytes()[:50])
    with pytest.raises(NevaError, match=r"\.metadata is not a readable checkpoint metadata file"):
        safe_dist.check_directory(directory)
    (directory / ".metadata").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(NevaError, match="holds a dict"):
        safe_dist.check_directory(directory)


def test_sharded_objects_load_with_weights_only(tmp_path: Path) -> None:
    """NeMo and Megatron-LM store RNG states and optimizer extras as ShardedObjects (byte items in ``*.distcp``):
    plain data still loads; a pickled callable is refused."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    from neva_tools.checkpoint.dist import single_process_group

    marker = tmp_path / "PWNED"
    good = {"rng": torch.arange(4), "step": 3, "names": ["a", "b"], "betas": (0.9, 0.95)}
    cases = {"good": good, "evil": {"rng": _RunsCode(marker)}}
    for name, obj in cases.items():
        directory = tmp_path / name
        directory.mkdir()
        state = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(6.0)),
                 "obj": ShardedObject("rng_state", obj, (1,), (0,))}  # fmt: skip
        with single_process_group():
            dist_checkpointing.save(state, str(directory))
        safe_dist.check_directory(directory)  # the byte items are not pre-read: the guarded planner reads them
        request = {"w": ShardedTensor.from_rank_offsets("w", torch.empty(6)),
                   "obj": ShardedObject("rng_state", None, (1,), (0,))}  # fmt: skip
        with single_process_group():
            if name == "good":
                loaded = dist_checkpointing.load(request, str(directory))
                assert torch.equal(loaded["w"], torch.arange(6.0)) and loaded["obj"]["step"] == 3
                assert torch.equal(loaded["obj"]["rng"], good["rng"]) and loaded["obj"]["betas"] == (0.9, 0.95)
            else:
                refused = r"'rng_state/shard_0_1' tries to load posix\.system"
                with pytest.raises(NevaError, match=refused), safe_dist.refusals_unwrapped():
                    dist_checkpointing.load(request, str(directory))
    assert not marker.exists()
    shutil.rmtree(tmp_path / "evil")


def test_allow_list_names_only_checkpoint_classes() -> None:
    assert safe_dist._allowed("torch", "bfloat16") and safe_dist._allowed("torch", "Size")
    assert not safe_dist._allowed("torch", "load") and not safe_dist._allowed("posix", "system")
    assert not safe_dist._allowed("builtins", "eval") and not safe_dist._allowed("builtins", "getattr")


class _ByGetattr:
    """Pickles as ``getattr(target, name)``: how Python 3.12 pickles an enum member (``WriteItemType.TENSOR``)."""

    def __init__(self, target: object, name: str) -> None:
        self.target, self.name = target, name

    def __reduce__(self) -> tuple:
        return getattr, (self.target, self.name)


def test_enum_members_pickled_by_getattr_load_and_nothing_else_does() -> None:
    """Python 3.12 (the GPU images) pickles enum members as ``getattr(Enum, "NAME")``: those load, other getattrs
    are refused."""
    from torch.distributed.checkpoint.planner import WriteItemType

    stream = io.BytesIO(pickle.dumps([_ByGetattr(WriteItemType, "TENSOR")]))
    assert safe_dist.MetadataUnpickler(stream).load() == [WriteItemType.TENSOR]
    for target, name in ((WriteItemType, "__init__"), (torch.Size, "__class__"), (WriteItemType, "_missing_")):
        with pytest.raises(safe_dist.RefusedClass, match=r"builtins\.getattr"):
            safe_dist.MetadataUnpickler(io.BytesIO(pickle.dumps(_ByGetattr(target, name)))).load()
