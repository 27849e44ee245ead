"""Video sampling and decoding (neva_tools.data.video) on tiny MP4s written with PyAV, and the token count against
transformers' LLaVA-OneVision."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from video_clips import write_clip

from neva_tools.data.images import ImageProcessor
from neva_tools.data.video import (
    VideoError,
    VideoSampling,
    decode_frames,
    pool_frames,
    probe,
    video_pixels,
    video_tokens,
)
from neva_tools.errors import NevaError


def _uniform(frames: int, count: int) -> list[int]:
    """⌊i·(F-1)/(n-1)⌋ in exact integer arithmetic: the hand computation of a uniform spread."""
    return [0] if count == 1 else [i * (frames - 1) // (count - 1) for i in range(count)]


@pytest.mark.parametrize(
    ("frames", "fps", "interval", "low", "high", "count"),
    [
        (23, 10, 2.0, 4, 8, 4),  # 2.3 s / 2 s → 1 frame, raised to the minimum 4
        (100, 10, 2.0, 4, 8, 5),  # 10 s / 2 s → 5, within [4, 8]
        (300, 30, 0.5, 4, 8, 8),  # 10 s / 0.5 s → 20, lowered to the maximum 8
        (5, 0.5, 1.0, 4, 8, 5),  # 10 s / 1 s → 10 → 8, but the clip has only 5 frames: all of them
        (600, 30, 0.5, 1, 32, 32),  # frames_upbound 32: 20 s / 0.5 s → 40 → 32
        (90, 30, 1.0, 1, 32, 3),  # 3 s / 1 s → 3
        (61, 24, 0.25, 2, 16, 10),  # 2.54 s / 0.25 s = 10.17 → 10
    ],
)
def test_sampled_indices_match_a_hand_computation(frames: int, fps: float, interval: float, low: int, high: int,
                                                  count: int) -> None:  # fmt: skip
    sampling = VideoSampling(interval, low, high)
    assert sampling.count(frames, fps) == count
    assert sampling.indices(frames, fps) == _uniform(frames, count)


def test_a_clip_shorter_than_the_minimum_is_refused() -> None:
    with pytest.raises(VideoError, match=r"3 frames, fewer than video_min_frames \(4\)") as err:
        VideoSampling().indices(3, 10)
    assert err.value.kind == "video_too_short"


BAD_SAMPLING = [dict(base_interval=0), dict(min_frames=0), dict(min_frames=9, max_frames=8),
                dict(min_frame_pixels=100, max_frame_pixels=10), dict(max_frame_pixels=0)]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_SAMPLING)
def test_bad_sampling_settings_name_the_key(bad: dict) -> None:
    with pytest.raises(NevaError, match=r"model\.data\.(base_interval|video_m)"):
        VideoSampling(**bad)


def test_decoded_frames_are_the_sampled_ones(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "a.mp4", 23, fps=10)
    info = probe(clip)
    assert (info.frames, info.fps, info.width, info.height) == (23, 10.0, 32, 24)
    assert math.isclose(info.duration, 2.3)
    frames, _ = decode_frames(clip, VideoSampling())
    assert [round(float(np.asarray(f).mean()) / 8) for f in frames] == [0, 7, 14, 22]  # frame i is grey 8·i
    assert all(f.size == (32, 24) and f.mode == "RGB" for f in frames)


def test_frames_are_scaled_into_the_pixel_limits(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "b.mp4", 4, width=64, height=48)
    small, _ = decode_frames(clip, VideoSampling(max_frame_pixels=768))  # 3072 px → ×½ per side
    assert {f.size for f in small} == {(32, 24)}
    large, _ = decode_frames(clip, VideoSampling(min_frame_pixels=12288))  # 3072 px → ×2 per side
    assert {f.size for f in large} == {(128, 96)}


def test_frames_go_through_the_image_processor(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "c.mp4", 4, width=32, height=24)
    processor = ImageProcessor(image_size=28, aspect="pad")
    pixels = video_pixels(clip, VideoSampling(), processor)
    frames, _ = decode_frames(clip, VideoSampling())
    assert pixels.shape == (4, 3, 28, 28)
    torch.testing.assert_close(pixels, torch.stack([processor(f) for f in frames]), rtol=0, atol=0)
    top = pixels[:, :, 0, 14]  # the pad rows above a 32x24 frame have the mean colour → about 0 after normalising
    assert top.abs().max() < 0.02


def _truncated(tmp_path: Path) -> Path:
    import av

    clip = tmp_path / "full.mp4"
    with av.open(str(clip), "w", options={"movflags": "faststart"}) as container:  # index first, then the data
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(20):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = clip.read_bytes()
    out = tmp_path / "cut.mp4"
    out.write_bytes(data[: len(data) // 3])
    return out


@pytest.mark.parametrize(
    ("make", "match", "kind"),
    [
        (lambda p: p.write_bytes(b""), "cannot be opened", "video_unreadable"),
        (lambda p: p.write_bytes(bytes(range(256)) * 40), "cannot be opened", "video_unreadable"),
        (lambda p: write_clip(p, 2), r"too short \(0\.20 s, 2 frames at 10 fps, 32x24\)", "video_too_short"),
        (lambda p: None, "does not exist", "video_missing"),
    ],
    ids=["empty", "garbage", "too_short", "missing"],
)
def test_unusable_videos_are_video_errors(tmp_path: Path, make: Callable[[Path], object], match: str,
                                          kind: str) -> None:  # fmt: skip
    path = tmp_path / "v.mp4"
    make(path)
    with pytest.raises(VideoError, match=match) as err:
        decode_frames(path, VideoSampling())
    assert err.value.kind == kind and str(path) in str(err.value)


def test_a_truncated_clip_names_its_frame_count(tmp_path: Path) -> None:
    cut = _truncated(tmp_path)
    with pytest.raises(VideoError, match=r"corrupt.*20 frames at 10 fps") as err:
        decode_frames(cut, VideoSampling())
    assert err.value.kind == "video_unreadable"


def test_pooling_equals_transformers_onevision() -> None:
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    torch.manual_seed(0)
    for side in (4, 5, 27):
        features = torch.randn(3, side * side, 8)
        config = SimpleNamespace(vision_config=SimpleNamespace(image_size=side * 14, patch_size=14))
        reference = LlavaOnevisionModel.apply_pooling(SimpleNamespace(config=config), features)
        torch.testing.assert_close(pool_frames(features, side), reference, rtol=0, atol=0)
        assert pool_frames(features, side).shape[1] == video_tokens(1, side, newline=False)


@pytest.mark.parametrize(("frames", "side"), [(4, 4), (8, 5), (32, 27)])
def test_video_tokens_equal_the_onevision_processor(tmp_path: Path, hf_tokenizer_dir: Path, frames: int,
                                                    side: int) -> None:  # fmt: skip
    from transformers import (
        AutoTokenizer,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tok = AutoTokenizer.from_pretrained(str(hf_tokenizer_dir))
    tok.add_tokens(["<image>", "<video>"], special_tokens=True)
    size = side * 14
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": size, "width": size}),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": size, "width": size}),
        tokenizer=tok,
        num_image_tokens=side * side,
        vision_feature_select_strategy="full",
    )
    clip = np.zeros((frames, 24, 32, 3), np.uint8)
    ids = processor(text="<video> what moves?", videos=[clip], return_tensors="pt")["input_ids"][0]
    found = int((ids == tok.convert_tokens_to_ids("<video>")).sum())
    assert found == video_tokens(frames, side, newline=True)


def test_synthetic_clips_move_the_way_their_answer_says(tmp_path: Path) -> None:
    from neva_tools.data import synthetic

    paths = synthetic.make_video_dataset(tmp_path, train=8, heldout=4)
    records = json.loads(paths["video_train"].read_text()) + json.loads(paths["video_heldout"].read_text())
    assert [r["conversations"][1]["value"] for r in records[:4]] == list(synthetic.MOTIONS)  # balanced
    for record in records:
        frames, info = decode_frames(paths["videos"] / record["video"], VideoSampling())
        assert (info.frames, info.fps) == (8, 4.0) and len(frames) == 4  # 2 s: the minimum of 4 frames
        centres = []
        for frame in frames:
            ys, xs = np.nonzero(np.asarray(frame).astype(int).sum(-1) < 600)  # the shape, darker than the background
            centres.append((xs.mean(), ys.mean()))
        dx, dy = synthetic.MOTIONS[record["conversations"][1]["value"]]
        moved = np.subtract(centres[-1], centres[0])
        assert moved[0] * dx + moved[1] * dy > 8 and abs(moved[0] * dy + moved[1] * dx) < 2, (record["id"], moved)


def test_neva_data_validate_takes_the_sampling_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from neva_tools.cli.main import main

    write_clip(tmp_path / "videos" / "short.mp4", 3, fps=5)
    ask = [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "nothing"}]
    data = tmp_path / "v.jsonl"
    data.write_text(json.dumps({"id": "s", "video": "short.mp4", "conversations": ask}) + "\n")
    args = ["data", "validate", str(data), "--video-folder", str(tmp_path / "videos"), "--no-progress"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "line 1 (id s): video_too_short" in out and "0.60 s, 3 frames at 5 fps, 32x24" in out
    assert main([*args, "--video-min-frames", "2", "--frames-upbound", "3"]) == 0
    assert "OK: every record is valid" in capsys.readouterr().out
