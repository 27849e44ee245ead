"""``neva train`` with the vision tower unfrozen (stage 1.5, TP=2): the final ``.nemo`` holds the trained tower, its
readers use it, and stage 2 from that ``.nemo`` starts from it; a stage-1.5 file written without it is refused."""

from __future__ import annotations

import io
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
from dist_helpers import in_process_distributed, run_distributed
from tiny_neva import build_assets, train_job

from neva_tools.checkpoint import nemo_vision
from neva_tools.checkpoint.nemo_archive import CONFIG_NAME, NemoArchive
from neva_tools.errors import NevaError


def _common(assets: dict[str, Any], name: str) -> list[str]:
    return [f"name={name}", f"exp_manager.exp_dir={assets['root'] / 'runs'}",
            f"model.mm_cfg.llm.from_pretrained={assets['llm']}",
            f"model.mm_cfg.vision_encoder.from_pretrained={assets['clip']}",
            f"model.data.image_folder={assets['data']['images']}", "model.data.num_workers=0",
            "trainer.enable_progress_bar=false", "model.micro_batch_size=2", "model.global_batch_size=2",
            "model.optim.sched.min_lr=1e-5"]  # fmt: skip


def _stage2(assets: dict[str, Any], adapter: Path, name: str) -> list[str]:
    return [*_common(assets, name), f"model.data.data_path={assets['data']['finetune']}",
            "model.mm_cfg.llm.model_type=vicuna_v1", f"model.mm_cfg.pretrain_mm_mlp_adapter={adapter}",
            "model.mm_cfg.llm.freeze=false", "trainer.max_steps=1", "model.optim.lr=1e-4",
            "model.data.max_seq_length=256", "exp_manager.checkpoint_every_n_steps=0"]  # fmt: skip


@pytest.fixture(scope="module")
def stage15(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Stage 1.5 at TP=2: projector and vision tower trained (LLM frozen), 4 steps, a checkpoint every 2."""
    assets = build_assets(tmp_path_factory.mktemp("tower_stage"), train=8)
    job = [*_common(assets, "stage15"), f"model.data.data_path={assets['data']['pretrain']}",
           "model.mm_cfg.llm.model_type=plain", "model.mm_cfg.vision_encoder.freeze=false",
           "model.tensor_model_parallel_size=2", "trainer.max_steps=4", "model.optim.lr=1e-3",
           "model.data.max_seq_length=128", "exp_manager.checkpoint_every_n_steps=2"]  # fmt: skip
    out = run_distributed(train_job, 2, job, timeout=600)[0]
    return {**assets, "nemo": Path(out), "run": assets["root"] / "runs" / "stage15"}


@pytest.fixture(scope="module")
def session() -> Iterator[None]:
    with in_process_distributed():
        yield


def _tower(path: Path) -> nemo_vision.StoredTower:
    with NemoArchive(path) as archive:
        tower = nemo_vision.read_tower(archive)
    assert tower is not None, path
    return tower


def _original(clip: Path) -> dict[str, torch.Tensor]:
    from neva_tools.model.vision import read_clip_vision, vision_state_to_mcore

    state, arch, kind = read_clip_vision(clip)
    return vision_state_to_mcore(state, arch, kind, select_layer=-2)


def _without_tower(src: Path, dst: Path) -> Path:
    """``src`` as ``neva train`` wrote it before trained towers were stored: no tower tensors, no ``vision.stored``."""
    with tarfile.open(src, "r:") as fin, tarfile.open(dst, "w:") as fout:
        for member in fin.getmembers():
            data = fin.extractfile(member).read() if member.isfile() else b""
            if member.name.endswith(CONFIG_NAME):
                cfg = yaml.safe_load(data)
                cfg["vision"] = {k: v for k, v in cfg["vision"].items() if k not in ("stored", "arch")}
                data = yaml.safe_dump(cfg).encode()
            elif member.name.endswith("model_weights.ckpt"):
                state = torch.load(io.BytesIO(data), weights_only=True)
                buffer = io.BytesIO()
                torch.save({k: v for k, v in state.items() if not k.startswith(nemo_vision.PREFIX)}, buffer)
                data = buffer.getvalue()
            member.size = len(data)
            fout.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return dst


def test_final_nemo_holds_the_trained_tower_of_the_last_step(stage15: dict[str, Any]) -> None:
    from neva_tools.export.source import CheckpointSource, NemoSource

    with NemoArchive(stage15["nemo"]) as archive:
        assert archive.legacy_ranks() == (2, 1)
        cfg = archive.read_config()
        names = [set(archive.load_legacy(r)) for r in range(2)]
    assert cfg["mm_cfg"]["vision_encoder"]["freeze"] is False and cfg["vision"]["stored"] is True
    assert cfg["vision"]["arch"]["model_type"] == "clip" and cfg["vision"]["arch"]["num_layers"] == 3
    assert all(nemo_vision.PREFIX + "conv1.weight" in n for n in names)  # on every TP rank
    tower, original = _tower(stage15["nemo"]), _original(stage15["clip"])
    assert not torch.equal(tower.tensors["conv1.weight"], original["conv1.weight"])  # the patch embedding moved
    with NemoSource(stage15["nemo"]) as final, CheckpointSource(stage15["run"] / "checkpoints" / "step=4", cfg,
                                                                stage15["nemo"]) as last:  # fmt: skip
        ours, theirs = final.vision_tower(None).state, last.vision_tower(None).state
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_generate_loads_the_trained_tower(session: None, stage15: dict[str, Any]) -> None:
    from neva_tools.inference.load import load_neva

    loaded = load_neva(stage15["nemo"])
    state = {k: v for k, v in loaded.model.vision_model.state_dict().items() if not k.endswith("_extra_state")}
    tower = _tower(stage15["nemo"]).tensors
    assert state.keys() == tower.keys() and all(torch.equal(state[k], tower[k]) for k in state)


def test_stage2_starts_from_the_trained_tower(stage15: dict[str, Any]) -> None:
    """Stage 2 keeps the tower frozen: its ``.nemo`` holds exactly the stage-1.5 tower (not the original)."""
    out = Path(run_distributed(train_job, 1, _stage2(stage15, stage15["nemo"], "stage2"), timeout=600)[0])
    with NemoArchive(out) as archive:
        cfg = archive.read_config()
    assert cfg["mm_cfg"]["vision_encoder"]["freeze"] is True and cfg["vision"]["stored"] is True
    assert cfg["vision"]["weights_from"] == str(stage15["nemo"])
    before, after = _tower(stage15["nemo"]).tensors, _tower(out).tensors
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_stage2_refuses_a_stage15_file_without_its_tower(stage15: dict[str, Any], tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from neva_tools.config.load import load_config
    from neva_tools.model.vision import read_clip_vision
    from neva_tools.train.run import trained_tower

    def tower_for(adapter: Path, clip: Path) -> Any:
        overrides = [*_stage2(stage15, adapter, "probe"), f"model.mm_cfg.vision_encoder.from_pretrained={clip}"]
        m = load_config(None, overrides)
        return trained_tower(m.model, read_clip_vision(clip)[1], -2)

    found = tower_for(stage15["nemo"], stage15["clip"])
    assert found is not None and found[0] == str(stage15["nemo"])
    old = _without_tower(stage15["nemo"], tmp_path / "old.nemo")
    with pytest.raises(NevaError, match=r"old\.nemo\) was trained with an unfrozen vision tower .*--all-checkpoints"):
        tower_for(old, stage15["clip"])
    other = tmp_path / "trained_clip"  # a tower the user names (e.g. the trained one, exported): taken as given
    CLIPVisionModel.from_pretrained(str(stage15["clip"])).save_pretrained(str(other))
    assert tower_for(old, other) is None
    big = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=56, patch_size=7)  # fmt: skip
    CLIPVisionModel(big).save_pretrained(str(tmp_path / "clip56"))
    with pytest.raises(NevaError, match=r"stores a trained vision tower .*image_size=28.* is .*image_size=56"):
        tower_for(stage15["nemo"], tmp_path / "clip56")
