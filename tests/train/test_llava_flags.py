"""LLaVA's / Qwen-VL's training flags as ``neva train`` overrides (``neva_tools.train.llava_flags``): the mapping,
LLaVA's defaults, the flags refused at values not trained here, and every unknown flag named at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from neva_tools.config.load import load_config
from neva_tools.data.video import VideoSampling
from neva_tools.errors import NevaError
from neva_tools.train.llava_flags import translate
from neva_tools.train.validate import check_config


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "llm.nemo").write_bytes(b"")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    return tmp_path


BASE = ["--model_name_or_path", "llm.nemo", "--vision_tower", "clip", "--version", "plain", "--data_path", "d.json",
        "--output_dir", "out/run"]  # fmt: skip


def test_llava_defaults_and_run_directory(paths: Path) -> None:
    o = translate(BASE).overrides
    assert o["name"] == "run" and o["exp_manager.exp_dir"] == "out"
    assert (o["model.optim.lr"], o["model.optim.betas"], o["model.optim.weight_decay"]) == (5e-5, [0.9, 0.999], 0.0)
    assert (o["trainer.max_steps"], o["trainer.max_epochs"], o["model.global_batch_size"]) == (-1, 3, 8)
    assert (o["model.mm_cfg.llm.freeze"], o["model.mm_cfg.vision_encoder.freeze"],
            o["model.mm_cfg.freeze_mm_mlp_adapter"]) == (False, True, False)  # fmt: skip  # LLaVA trains LLM+projector
    assert o["model.data.image_aspect_ratio"] == "square" and o["trainer.precision"] == "32"
    assert o["model.mm_cfg.vision_encoder.from_hf"] is True


@pytest.mark.parametrize(
    ("flags", "llm", "vision", "projector"),
    [
        (["--mm_tunable_parts=mm_mlp_adapter"], True, True, False),
        (["--mm_tunable_parts", "mm_vision_tower,mm_mlp_adapter,mm_language_model"], False, False, False),
        (["--tune_mm_llm", "True", "--tune_mm_vision", "False", "--tune_mm_mlp", "False"], False, True, True),
        (["--tune_mm_mlp"], True, True, False),
        (["--tune_mm_mlp_adapter", "True"], True, True, False),
        (["--freeze_mm_mlp_adapter", "True"], False, True, True),
        (["--unfreeze_mm_vision_tower", "True"], False, False, False),
    ],
)  # fmt: skip
def test_trainable_parts(paths: Path, flags: list[str], llm: bool, vision: bool, projector: bool) -> None:
    o = translate([*BASE, *flags]).overrides
    assert (o["model.mm_cfg.llm.freeze"], o["model.mm_cfg.vision_encoder.freeze"],
            o["model.mm_cfg.freeze_mm_mlp_adapter"]) == (llm, vision, projector)  # fmt: skip


def test_qwen_vl_seed_flags(paths: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Qwen-VL finetune seed's flags that fit (its model is a HF dir there; here the LLM .nemo)."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    t = translate(["--model_name_or_path", "llm.nemo", "--vision_tower", "clip", "--version", "qwen_1_5",
                   "--tune_mm_llm", "True", "--tune_mm_vision", "False", "--tune_mm_mlp", "False",
                   "--dataset_use", "your_dataset%100", "--output_dir", "./checkpoints", "--cache_dir", "./cache",
                   "--bf16", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4",
                   "--learning_rate", "2e-7", "--mm_projector_lr", "1e-5", "--vision_tower_lr", "1e-6", "--optim",
                   "adamw_mindspore", "--model_max_length", "4096", "--data_flatten", "True", "--data_packing", "True",
                   "--max_pixels", "451584", "--min_pixels", "12544", "--num_train_epochs", "3", "--warmup_ratio",
                   "0.03", "--lr_scheduler_type", "cosine", "--weight_decay", "0.01", "--logging_steps", "10",
                   "--save_steps", "500", "--save_total_limit", "3", "--deepspeed", "zero3.json"])  # fmt: skip
    o = t.overrides
    assert o["model.data.data_path"] == "your_dataset%100" and o["model.data.packing"] is True
    assert o["model.global_batch_size"] == 4 * 4 * 8 and o["trainer.precision"] == "bf16"
    assert (o["model.optim.mm_projector_lr"], o["model.optim.vision_tower_lr"]) == (1e-5, 1e-6)
    assert o["model.optim.name"] == "distributed_fused_adam"
    assert (o["exp_manager.save_top_k"], o["trainer.max_epochs"]) == (3, 3)
    assert o["model.mm_cfg.freeze_mm_mlp_adapter"] is True and o["model.mm_cfg.llm.freeze"] is False
    assert "--cache_dir, --optim, --max_pixels, --min_pixels" in t.notes[-1]
    assert t.command_line().startswith("neva train model.mm_cfg.llm.from_pretrained=llm.nemo ")
    cfg = load_config(None, t.args())  # every override is a key of conf/neva_config.yaml
    assert cfg.model.optim.sched.warmup_ratio == 0.03 and cfg.trainer.max_steps == -1


def test_steps_and_warmup_follow_hugging_face(paths: Path) -> None:
    o = translate([*BASE, "--max_steps", "20", "--num_train_epochs", "1", "--warmup_steps", "4", "--warmup_ratio",
                   "0.1"]).overrides  # fmt: skip
    assert (o["trainer.max_steps"], o["trainer.max_epochs"]) == (20, None)  # max_steps wins, as in HF
    assert (o["model.optim.sched.warmup_steps"], o["model.optim.sched.warmup_ratio"]) == (4, None)
    assert check_config(load_config(None, translate(BASE).args()), offline=True) == []


def test_versions(paths: Path) -> None:
    assert translate([*BASE, "--version", "vicuna_v1"]).overrides["model.mm_cfg.llm.model_type"] == "v1"
    assert translate([*BASE, "--version", "llava_llama_3"]).overrides["model.mm_cfg.llm.model_type"] == "llava_llama_3"
    with pytest.raises(NevaError, match="pass --version llava_llama_2"):
        translate([*BASE, "--version", "llama_2"])
    with pytest.raises(NevaError, match="'gemma_instruct' renders a format no template here matches"):
        translate([*BASE, "--version", "gemma_instruct"])


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--image_aspect_ratio", "highres"], "--image_aspect_ratio highres is not trained here; use one of square"),
        (["--mm_use_im_patch_token", "True"], "--mm_use_im_patch_token True is not supported"),
        (["--mm_patch_merge_type", "maxpool2x2"], "--mm_patch_merge_type maxpool2x2 is not trained here"),
        (["--image_grid_pinpoints", "336,672"], "is neither LLaVA's list of (width, height) pixel pairs"),
        (["--evaluation_strategy", "steps"], "no evaluation during training"),
        (["--lr_scheduler_type", "linear"], "pass --lr_scheduler_type cosine"),
        (["--save_strategy", "epoch"], "--save_strategy epoch"),
        (["--bf16", "True", "--fp16", "True"], "choose one"),
        (["--bf16", "maybe"], "--bf16 'maybe' is not a boolean"),
        (["--data_path", "mix.yaml"], "LLaVA-NeXT's dataset YAML"),
        (["--dataset_use", "a%50"], "--data_path and --dataset_use are both given"),
        (["--nproc", "2", "--mm_tunable_parts", "mm_projector"], "unknown part(s) mm_projector"),
    ],
)  # fmt: skip
def test_refusals_say_why(paths: Path, flags: list[str], expected: str) -> None:
    with pytest.raises(NevaError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        translate([*BASE, *flags])


def test_model_must_be_a_nemo(paths: Path) -> None:
    hf = paths / "qwen2.5-0.5b-instr"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "qwen2"}')
    expected = r"Hugging Face model directory; convert it once with: neva convert hf-to-nemo --input .*qwen2"
    with pytest.raises(NevaError, match=expected + r"\.5-0\.5b-instr --output qwen2\.5-0\.5b-instr\.nemo"):
        translate(["--model_name_or_path", str(hf), *BASE[2:]])
    (hf / "config.json").write_text('{"model_type": "llava_qwen", "mm_vision_tower": "siglip"}')
    with pytest.raises(NevaError, match="is a LLaVA training checkpoint"):
        translate(["--model_name_or_path", str(hf), *BASE[2:]])
    with pytest.raises(NevaError, match=r"missing\.nemo does not exist"):
        translate(["--model_name_or_path", "missing.nemo", *BASE[2:]])


def test_unknown_flags_are_listed_at_once(paths: Path) -> None:
    with pytest.raises(NevaError, match=r"unknown LLaVA training flags: --mm_resampler_type, --mm_spatial_pool_mode, "
                                        r"--lora_r; "):  # fmt: skip
        translate([*BASE, "--mm_resampler_type", "x", "--mm_spatial_pool_mode", "average", "--lazy_preprocess", "True",
                   "--lora_r", "8"])  # fmt: skip


def test_group_by_modality_length_maps_to_its_key(paths: Path) -> None:
    t = translate([*BASE, "--group_by_modality_length", "True"])
    assert t.overrides["model.data.group_by_modality_length"] is True
    assert not any("--group_by_modality_length" in n for n in t.notes)  # no longer listed as a flag with no effect
    assert load_config(None, t.args()).model.data.group_by_modality_length is True
    assert translate([*BASE, "--group_by_modality_length", "False"]).overrides[
        "model.data.group_by_modality_length"] is False  # fmt: skip
    with pytest.raises(NevaError, match="--group_by_modality_length True with --data_flatten/--data_packing"):
        translate([*BASE, "--group_by_modality_length", "True", "--data_packing", "True"])
    packed = load_config(None, [*t.args(), "model.data.packing=true"])
    assert [p for p in check_config(packed, offline=True) if "group_by_modality_length" in p] == [
        "model.data.group_by_modality_length and model.data.packing are both true: a packed row already mixes image "
        "and text-only samples, so batches cannot hold one modality; set one of them to false"]  # fmt: skip


def test_mm_use_im_start_end_wraps_images_in_llavas_tokens(paths: Path) -> None:
    t = translate([*BASE, "--mm_use_im_start_end", "True", "--tokenizer", "tok_llava.model"])
    o = t.overrides
    assert o["model.mm_cfg.use_im_start_end"] is True and o["model.tokenizer.model"] == "tok_llava.model"
    assert o["model.mm_cfg.im_start_end_tokens"] == ["<im_start>", "<im_end>"]
    assert "model.mm_cfg.im_start_end_tokens=[<im_start>,<im_end>]" in t.command_line()
    cfg = load_config(None, t.args())  # what neva train reads
    assert list(cfg.model.mm_cfg.im_start_end_tokens) == ["<im_start>", "<im_end>"]
    (note,) = [n for n in t.notes if n.startswith("--mm_use_im_start_end")]
    assert "add-tokens --input TOKENIZER --output tok_llava.model --tokens '<im_start>' '<im_end>'" in note
    off = translate([*BASE, "--mm_use_im_start_end", "False"]).overrides
    assert off["model.mm_cfg.use_im_start_end"] is False and "model.mm_cfg.im_start_end_tokens" not in off


def test_llava_next_anyres_flags_map_to_their_keys(paths: Path) -> None:
    """The seed's LLaVA-NeXT stage 2 (SigLIP 384) and stage 1.5 (a pinpoint list, (width, height)) lines."""
    stage2 = translate([*BASE, "--image_aspect_ratio", "anyres_max_9", "--image_grid_pinpoints", "(1x1),...,(6x6)",
                        "--mm_patch_merge_type", "spatial_unpad"]).overrides  # fmt: skip
    assert stage2["model.data.image_aspect_ratio"] == "anyres_max_9"
    assert stage2["model.data.image_grid_pinpoints"] == "(1x1),...,(6x6)"
    assert stage2["model.mm_cfg.mm_patch_merge_type"] == "spatial_unpad"
    stage15 = translate([*BASE, "--image_aspect_ratio", "anyres", "--image_grid_pinpoints",
                         "[(384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152)]",
                         "--mm_patch_merge_type", "spatial_unpad"])  # fmt: skip
    assert stage15.overrides["model.data.image_grid_pinpoints"] == [[768, 384], [384, 768], [768, 768], [384, 1152],
                                                                     [1152, 384]]  # fmt: skip
    for t in (translate([*BASE, "--image_aspect_ratio", "anyres_max_9", "--image_grid_pinpoints", "(1x1),...,(6x6)",
                         "--mm_patch_merge_type", "spatial_unpad"]), stage15):  # fmt: skip
        cfg = load_config(None, t.args())  # what neva train reads, through the command line
        assert [p for p in check_config(cfg, offline=True) if "image" in p or "merge" in p] == []
    assert translate(BASE).overrides["model.mm_cfg.mm_patch_merge_type"] == "flat"  # LLaVA's default
    flat_max = load_config(None, translate([*BASE, "--image_aspect_ratio", "anyres_max_9", "--image_grid_pinpoints",
                                            "(1x1),...,(6x6)"]).args())  # fmt: skip
    assert any("anyres_max_9 shrinks large tile grids only with model.mm_cfg.mm_patch_merge_type spatial_unpad" in p
               for p in check_config(flat_max, offline=True))  # fmt: skip


def test_llava_next_and_qwen_video_flags_map_to_their_keys(paths: Path) -> None:
    next_ = translate([*BASE, "--video_folder", "videos", "--frames_upbound", "32"]).overrides
    assert (next_["model.data.video_folder"], next_["model.data.frames_upbound"]) == ("videos", 32)
    qwen = translate([*BASE, "--base_interval", "2", "--video_max_frames", "8", "--video_min_frames", "4",
                      "--video_max_frame_pixels", str(1664 * 28 * 28), "--video_min_frame_pixels",
                      str(256 * 28 * 28)])  # fmt: skip
    o = qwen.overrides
    assert (o["model.data.base_interval"], o["model.data.video_min_frames"], o["model.data.video_max_frames"]) == (
        2.0, 4, 8)  # fmt: skip
    assert (o["model.data.video_max_frame_pixels"], o["model.data.video_min_frame_pixels"]) == (1304576, 200704)
    assert not any("base_interval" in note for note in qwen.notes)  # mapped, not inert
    cfg = load_config(None, qwen.args())  # every override is a key of conf/neva_config.yaml
    assert VideoSampling.from_config(cfg.model.data) == VideoSampling(2.0, 4, 8, 1304576, 200704)
