"""The LLaVA-NeXT seed's three stages (``../shared/seeds/002``) as recipes: the tiny CPU ones run end to end in order
(stage 1 → stage 1.5 with the tower trained and stored → stage 2 from stage 1.5's LLM, projector and tower), and the
GPU ones hold the seed's hyper-parameters, as ``scripts/llava_train.py`` translates its command lines."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from dist_helpers import run_distributed

from neva_tools.checkpoint import nemo_vision
from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.config.load import load_config
from neva_tools.data.anyres import ImageLayout
from neva_tools.data.templates import get_template
from neva_tools.mappings.projector import NEWLINE
from neva_tools.train.llava_flags import translate

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny_cpu"
STAGES = ("next_stage1_pretrain", "next_stage1.5_tower", "next_stage2_finetune")
NEXT = {size: ROOT / "recipes" / f"llava_next_qwen2.5_{size}" for size in ("0.5b", "7b")}
NEXT_STAGES = ("stage1_pretrain", "stage1.5_tower", "stage2_finetune")

#: The seed's train_mem.py flags per stage (paths shortened; LLM.nemo stands for the LLM), and its GPU count.
SEED = {
    "stage1_pretrain": (
        2,
        """--deepspeed scripts/zero3.json --model_name_or_path LLM.nemo --version plain
        --data_path blip_laion_cc_sbu_558k.json --image_folder images --vision_tower siglip-so400m-p14-384
        --mm_tunable_parts=mm_mlp_adapter --mm_vision_select_layer -2 --mm_projector_type mlp2x_gelu
        --mm_use_im_start_end False --mm_use_im_patch_token False --bf16 True --output_dir checkpoints/projectors/base
        --num_train_epochs 1 --per_device_train_batch_size 8 --per_device_eval_batch_size 2
        --gradient_accumulation_steps 4 --evaluation_strategy no --save_strategy no --save_steps 10000
        --learning_rate 1e-3 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 10
        --tf32 True --model_max_length 8192 --gradient_checkpointing True --dataloader_num_workers 16
        --lazy_preprocess True --report_to tensorboard --run_name base --attn_implementation sdpa""",
    ),
    "stage1.5_tower": (
        2,
        """--deepspeed scripts/zero3.json --model_name_or_path LLM.nemo --version qwen_1_5
        --data_path=coco30k_stage1.5_finetune_w_prompt.json --image_folder LLaVA_S1_5
        --pretrain_mm_mlp_adapter=mm_projector.bin --mm_tunable_parts=mm_vision_tower,mm_mlp_adapter,mm_language_model
        --mm_vision_tower_lr=2e-6 --vision_tower siglip-so400m-p14-384 --mm_projector_type mlp2x_gelu
        --mm_vision_select_layer -2 --mm_use_im_start_end False --mm_use_im_patch_token False
        --group_by_modality_length True --image_aspect_ratio anyres
        --image_grid_pinpoints "[(384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152)]"
        --mm_patch_merge_type spatial_unpad --bf16 True --run_name mid --output_dir checkpoints/mid --num_train_epochs 1
        --per_device_train_batch_size 1 --per_device_eval_batch_size 1 --gradient_accumulation_steps 16
        --evaluation_strategy no --save_strategy steps --save_steps 1000 --save_total_limit 1 --learning_rate 1e-5
        --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 2 --tf32 True
        --model_max_length 32768 --dataloader_num_workers 16 --lazy_preprocess True --report_to tensorboard
        --dataloader_drop_last True --attn_implementation flash_attention_2 --torch_compile False""",
    ),
    "stage2_finetune": (
        4,
        """--deepspeed scripts/zero3.json --model_name_or_path LLM.nemo --version qwen_1_5
        --data_path llava_v1_5_mix60k.json --image_folder LLaVA_SFT
        --mm_tunable_parts=mm_vision_tower,mm_mlp_adapter,mm_language_model --mm_vision_tower_lr=2e-6
        --vision_tower siglip-so400m-p14-384 --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2
        --mm_use_im_start_end False --mm_use_im_patch_token False --group_by_modality_length True
        --image_aspect_ratio anyres_max_9 --image_grid_pinpoints "(1x1),...,(6x6)" --mm_patch_merge_type spatial_unpad
        --bf16 True --run_name next --output_dir checkpoints/llavanext/next --num_train_epochs 1
        --per_device_train_batch_size 1 --per_device_eval_batch_size 1 --gradient_accumulation_steps 16
        --evaluation_strategy no --save_strategy steps --save_steps 500 --save_total_limit 1 --learning_rate 1e-5
        --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 2 --tf32 True
        --model_max_length 32768 --gradient_checkpointing True --dataloader_num_workers 4 --lazy_preprocess True
        --report_to tensorboard --dataloader_drop_last True --torch_compile False
        --attn_implementation flash_attention_2""",
    ),
}
#: Keys the recipes set otherwise than the translation, on purpose: paths and names, the data as registry names or
#: placeholders, loader processes, and stage 1's periodic checkpoint (the seed saves none).
NOT_THE_SEEDS = {"model.mm_cfg.llm.from_pretrained", "model.mm_cfg.vision_encoder.from_pretrained",
                 "model.mm_cfg.pretrain_mm_mlp_adapter", "model.data.data_path", "model.data.image_folder",
                 "model.data.num_workers", "exp_manager.exp_dir", "name"}  # fmt: skip
#: The shapes that decide TP: SigLIP-so400m-patch14-384's vision config, Qwen2.5's heads and query groups.
SIGLIP_SO400M = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                 "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384, "patch_size": 14}  # fmt: skip
QWEN = {"0.5b": {"num_attention_heads": 14, "num_query_groups": 2, "ffn_hidden_size": 4864},
        "7b": {"num_attention_heads": 28, "num_query_groups": 4, "ffn_hidden_size": 18944}}  # fmt: skip


def _paths(recipe: Path, inputs: Path) -> list[str]:
    """The recipe's ``demo_output/next`` paths moved to ``inputs`` (the only overrides the tiny runs get)."""
    cfg = OmegaConf.load(recipe)
    keys = ["exp_manager.exp_dir", "model.mm_cfg.llm.from_pretrained", "model.mm_cfg.vision_encoder.from_pretrained",
            "model.mm_cfg.pretrain_mm_mlp_adapter", "model.data.data_path", "model.data.image_folder"]  # fmt: skip
    out = []
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value is not None:
            assert str(value).startswith("demo_output/next/"), (recipe.name, key, value)
            out.append(f"{key}={inputs / str(value).removeprefix('demo_output/next/')}")
    return out


def stage_job(rank: int, world_size: int, recipe: str, overrides: list[str]) -> dict[str, Any]:
    """``neva train RECIPE overrides`` in this process; also what the model was built from (its first weights)."""
    from megatron.core import parallel_state

    from neva_tools.model import neva_io
    from neva_tools.model.neva_io import _gather_projector
    from neva_tools.model.save_nemo import canonical_state
    from neva_tools.train.run import train

    cfg = load_config(Path(recipe), overrides)
    seen: dict[str, Any] = {}
    build = neva_io.build_neva

    def spy(llm_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Compare this rank's built model with the .nemo the stage starts from (same TP: the same shards)."""
        model = build(llm_path, *args, **kwargs)
        source = kwargs.get("projector_from")
        seen.update(llm_from=str(llm_path), projector_from=None if source is None else str(source))
        if source is None or not str(source).endswith(".nemo"):
            return model
        rank = parallel_state.get_tensor_model_parallel_rank()
        with NemoArchive(source) as archive:
            stored = archive.load_legacy(rank)
        for part, state in (("llm", canonical_state(model.language_model)),
                            ("tower", canonical_state(model.vision_model, prefix=nemo_vision.PREFIX)),
                            ("projector", _gather_projector(model, kwargs["projector_type"]))):  # fmt: skip
            same = state.keys() & stored.keys()
            seen[part] = {"model": len(state), "stored": len(same),
                          "equal": all(torch.equal(state[k].float(), stored[k].float()) for k in same)}  # fmt: skip
        return model

    neva_io.build_neva = spy
    out = train(cfg)
    return {"nemo": str(out) if out else None, **seen}


def _losses(run: Path) -> list[float]:
    with (run / "logs" / "loss.csv").open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def _tower(path: Path) -> dict[str, torch.Tensor]:
    with NemoArchive(path) as archive:
        tower = nemo_vision.read_tower(archive)
    assert tower is not None, f"{path} stores no vision tower"
    return tower.tensors


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The inputs (``neva_tools.demo.prepare_next``, 16 images) and the three tiny stages run in order, TP 2."""
    from neva_tools.demo import prepare_next

    inputs = tmp_path_factory.mktemp("next")
    assets = prepare_next(inputs, train=16, heldout=2)
    results = {}
    for stage in STAGES:
        recipe = TINY / f"{stage}.yaml"
        overrides = [*_paths(recipe, inputs), "trainer.enable_progress_bar=false", "model.data.num_workers=0"]
        results[stage] = run_distributed(stage_job, 2, str(recipe), overrides, timeout=600)[0]
    return {"inputs": inputs, "assets": assets, "results": results}


def test_three_stages_write_their_nemo_with_finite_losses(stages: dict[str, Any]) -> None:
    for stage in STAGES:
        name = OmegaConf.load(TINY / f"{stage}.yaml").name
        run = stages["inputs"] / "runs" / name
        assert stages["results"][stage]["nemo"] == str(run / f"{name}.nemo") and (run / f"{name}.nemo").is_file()
        losses = _losses(run)
        assert losses and all(math.isfinite(x) and x > 0 for x in losses), (stage, losses)


def test_stage15_trains_the_tower_and_stores_it(stages: dict[str, Any]) -> None:
    from neva_tools.model.vision import read_clip_vision, vision_state_to_mcore

    runs = stages["inputs"] / "runs"
    with NemoArchive(runs / "tiny_next_stage1" / "tiny_next_stage1.nemo") as archive:
        assert archive.read_config()["vision"]["stored"] is False  # stage 1: the tower stayed frozen
    nemo = runs / "tiny_next_stage1.5" / "tiny_next_stage1.5.nemo"
    with NemoArchive(nemo) as archive:
        cfg = archive.read_config()
        state = archive.load_legacy(0)
    assert cfg["mm_cfg"]["vision_encoder"]["freeze"] is False and cfg["vision"]["stored"] is True
    assert cfg["vision"]["arch"]["model_type"] == "siglip" and NEWLINE.hf[0] in state  # spatial_unpad's row
    assert cfg["data"]["image_grid_pinpoints"] == [[56, 28], [28, 56], [56, 56], [28, 84], [84, 28]]
    tower = _tower(nemo)
    original = vision_state_to_mcore(*read_clip_vision(stages["assets"]["siglip"]), select_layer=-2)
    assert tower.keys() == original.keys()
    moved = [k for k in tower if not torch.equal(tower[k].float(), original[k].float())]
    assert "conv1.weight" in moved and len(moved) > len(tower) // 2, moved  # trained, at the tower's learning rate
    spied = stages["results"]["next_stage1.5_tower"]  # the LLM from llm.nemo, the projector from stage 1's .nemo
    assert spied["llm_from"] == str(stages["assets"]["llm"])
    assert spied["projector_from"] == str(runs / "tiny_next_stage1" / "tiny_next_stage1.nemo")
    projector = spied["projector"]  # all but image_newline, which stage 1 (square, flat) did not have
    assert projector["equal"] and projector["stored"] == projector["model"] - 1 > 0, projector
    assert spied["llm"]["stored"] == spied["tower"]["stored"] == 0  # stage 1 trained neither


def test_stage2_starts_from_stage15s_llm_projector_and_tower(stages: dict[str, Any]) -> None:
    runs = stages["inputs"] / "runs"
    stage15 = runs / "tiny_next_stage1.5" / "tiny_next_stage1.5.nemo"
    spied = stages["results"]["next_stage2_finetune"]
    assert spied["llm_from"] == spied["projector_from"] == str(stage15)
    for part in ("llm", "tower", "projector"):  # this rank's shards of the built model = the stored ones, all of them
        assert spied[part]["equal"] and spied[part]["stored"] == spied[part]["model"] > 0, (part, spied[part])
    final = runs / "tiny_next_stage2" / "tiny_next_stage2.nemo"
    with NemoArchive(final) as archive:
        cfg = archive.read_config()
    assert cfg["vision"]["stored"] is True and cfg["vision"]["weights_from"] == str(stage15)
    assert cfg["data"]["image_aspect_ratio"] == "anyres_max_4"
    assert cfg["mm_cfg"]["mm_patch_merge_type"] == "spatial_unpad"
    before, after = _tower(stage15), _tower(final)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # and went on training in stage 2


@pytest.mark.parametrize("stage", NEXT_STAGES)
@pytest.mark.parametrize("size", sorted(NEXT))
def test_gpu_recipes_hold_the_seeds_hyperparameters(size: str, stage: str, tmp_path: Path) -> None:
    """Every key scripts/llava_train.py derives from the seed's command line (--nproc: its GPUs) is the recipe's,
    but for paths, data and loader processes; the global batch is the seed's on 8 GPUs too."""
    import shlex

    gpus, flags = SEED[stage]
    (tmp_path / "LLM.nemo").touch()
    argv = [*shlex.split(flags.replace("LLM.nemo", str(tmp_path / "LLM.nemo"))), "--nproc", str(gpus)]
    seed = translate(argv).overrides
    cfg = load_config(NEXT[size] / f"{stage}.yaml")
    ignored = NOT_THE_SEEDS | ({"exp_manager.checkpoint_every_n_steps"} if stage == "stage1_pretrain" else set())
    differ = {}
    for key, value in seed.items():
        ours = OmegaConf.select(cfg, key)
        ours = OmegaConf.to_container(ours) if OmegaConf.is_config(ours) else ours
        if key == "model.mm_cfg.llm.model_type":  # LLaVA-NeXT's qwen_1_5 is our chatml
            value, ours = get_template(value).name, get_template(ours).name
        if key not in ignored and ours != value:
            differ[key] = (ours, value)
    assert differ == {}
    assert seed["model.global_batch_size"] == cfg.model.global_batch_size  # per-device × accumulation × GPUs


@pytest.mark.parametrize("stage", NEXT_STAGES)
@pytest.mark.parametrize("size", sorted(NEXT))
def test_gpu_recipes_fit_siglip_so400m_and_qwen(size: str, stage: str) -> None:
    """The rules ``neva train`` runs on the real encoder and LLM: TP divides SigLIP's and Qwen's heads, query
    groups and FFN; layer -2 exists; the largest image (AnyRes included) fits max_seq_length; DP 8 / TP divides."""
    from neva_tools.checkpoint import tp as tp_rules
    from neva_tools.config import derived
    from neva_tools.mappings.siglip import hf_vision_arch
    from neva_tools.train.validate import _vision_rules, check_config

    recipe = NEXT[size] / f"{stage}.yaml"
    cfg = load_config(recipe)
    arch = hf_vision_arch(SIGLIP_SO400M)
    assert _vision_rules(cfg, arch) + derived.vision_problems(cfg, arch) == []
    tp_rules.check_divisible(int(cfg.model.tensor_model_parallel_size), **QWEN[size])
    assert check_config(cfg, offline=True, devices=8) == []
    layout = ImageLayout.from_config(cfg.model.data, cfg.model.mm_cfg, arch.image_size, arch.patch_size)
    expected = {"stage1_pretrain": 729, "stage1.5_tower": 3699, "stage2_finetune": 8829}[stage]
    assert layout.max_tokens() == expected < cfg.model.data.max_seq_length


@pytest.mark.parametrize("aspect, pinpoints, size, patch", [
    ("anyres_max_4", "(1x1),...,(3x3)", 28, 7),  # the tiny stage 2
    ("anyres_max_9", "(1x1),...,(6x6)", 384, 14),  # the seed's stage 2
    ("anyres", [[768, 384], [384, 768], [768, 768], [384, 1152], [1152, 384]], 384, 14),  # the seed's stage 1.5
])  # fmt: skip
def test_max_tokens_bounds_every_image(aspect: str, pinpoints: Any, size: int, patch: int) -> None:
    """``max_tokens`` (the config check's bound) is at least what any image becomes. Under anyres_max_N the full grid
    is shrunk while a padded image within the 1.1 tolerance is not, so the most is not at a pinpoint's shape."""
    layout = ImageLayout.from_config({"image_aspect_ratio": aspect, "image_grid_pinpoints": pinpoints},
                                     {"mm_patch_merge_type": "spatial_unpad"}, size, patch)  # fmt: skip
    step = max(1, size // 28)
    sizes = range(size // 4, 7 * size, 3 * step)
    most = max(layout.tokens(h, w) for h in sizes for w in sizes)
    assert most <= layout.max_tokens() <= most + 3 * layout.side  # a bound: crops of grids an image may not select
    at_pinpoints = max(layout.tokens(h, w) for h, w in layout.pinpoints)
    if aspect.startswith("anyres_max"):
        assert most > at_pinpoints  # what max_tokens reported before
