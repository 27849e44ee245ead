"""The video keys of ``model.data`` (issue 22): documented defaults, value and cross-key checks, NeMo's Video NeVA
keys in the key table (LLaVA-NeXT's and Qwen-VL's video flags: tests/train/test_llava_flags.py)."""

from __future__ import annotations

import pytest

from neva_tools.config.load import load_config
from neva_tools.config.nemo_keys import NEMO_KEYS, Ours, Refused
from neva_tools.data.video import VideoSampling
from neva_tools.errors import NevaError
from neva_tools.train.validate import check_config


def test_defaults_are_qwen_vls_sampling() -> None:
    cfg = load_config(None, [])
    assert VideoSampling.from_config(cfg.model.data) == VideoSampling(2.0, 4, 8, None, None)
    assert cfg.model.data.video_folder is None and cfg.model.data.frames_upbound is None


def test_frames_upbound_is_video_max_frames() -> None:
    cfg = load_config(None, ["model.data.frames_upbound=32", "model.data.video_min_frames=1"])
    assert VideoSampling.from_config(cfg.model.data).max_frames == 32
    clash = load_config(None, ["model.data.frames_upbound=32", "model.data.video_max_frames=16"])
    with pytest.raises(NevaError, match=r"frames_upbound \(32\) and model.data.video_max_frames \(16\)"):
        VideoSampling.from_config(clash.model.data)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.data.base_interval=0", r"model.data.base_interval \(0\) must be a number > 0"),
        ("model.data.video_min_frames=0", r"model.data.video_min_frames \(0\) must be an integer ≥ 1"),
        ("model.data.video_max_frame_pixels=-5", r"model.data.video_max_frame_pixels \(-5\) must be an integer ≥ 1"),
    ],
)
def test_bad_values_are_refused_when_loading(override: str, expected: str) -> None:
    with pytest.raises(NevaError, match=expected):
        load_config(None, [override])


def test_cross_key_problems_are_reported_by_check_config() -> None:
    cfg = load_config(None, ["model.data.video_min_frames=9", "model.data.video_max_frames=8"])
    assert any("video_min_frames (9) must be at least 1 and at most video_max_frames" in p
               for p in check_config(cfg, offline=True))  # fmt: skip
    low_high = load_config(None, ["model.data.video_min_frame_pixels=100", "model.data.video_max_frame_pixels=10"])
    assert any("video_min_frame_pixels (100) must not exceed video_max_frame_pixels (10)" in p
               for p in check_config(low_high, offline=True))  # fmt: skip


def test_nemo_video_neva_keys() -> None:
    assert isinstance(NEMO_KEYS["model.data.video_folder"], Ours)
    media = NEMO_KEYS["model.data.media_type"]
    assert isinstance(media, Refused) and "video" in media.allowed
    for key in ("model.data.num_frames", "model.data.splice_single_frame"):
        assert isinstance(NEMO_KEYS[key], Refused) and "video_min_frames" in NEMO_KEYS[key].reason
