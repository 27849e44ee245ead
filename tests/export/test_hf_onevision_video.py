"""``neva export hf-llava`` of a OneVision-style model on a video prompt: the exported
``LlavaOnevisionForConditionalGeneration`` and its processor (``<video>`` token, video processor) give our token
ids, our frame pixels and our logits (≤ 1e-4) for the same sampled frames."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from anyres_models import QUESTION, SYSTEM, expand, hf_model
from dist_helpers import in_process_distributed
from neva_models import IMAGE, build_neva_nemo

from neva_tools.data.records import Turn
from neva_tools.data.templates import tokenize_conversation
from neva_tools.data.video import VideoSampling, clip_tokens, decode_frames, video_pixels
from neva_tools.export.hf_llava import export_hf_llava

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from video_clips import moving_square, write_clip

ANSWER = "The square moves right."


@pytest.fixture(scope="module")
def dist() -> Iterator[None]:
    with in_process_distributed(tp=1):
        yield


@pytest.fixture(scope="module")
def video_nemo(export_root: Path, qwen2_nemo: Path, hf_siglip: Path) -> Path:
    data = {"image_grid_pinpoints": "(1x1),...,(3x3)"}
    return build_neva_nemo(qwen2_nemo, export_root / "ov_video.nemo", hf_siglip, template="chatml",
                           aspect="anyres_max_2", merge="spatial_unpad", data=data, select_layer=-1,
                           seed=21)  # fmt: skip


@pytest.fixture(scope="module")
def video_hf(export_root: Path, video_nemo: Path) -> Path:
    return export_hf_llava(video_nemo, export_root / "hf_ov_video")


@pytest.fixture(scope="module")
def clip(export_root: Path) -> Path:
    """Frames at the encoder's size (no resampling on either side): a square moving right, 20 frames at 10 fps."""
    frame = moving_square("right", 20, size=IMAGE, side=IMAGE // 4)
    return write_clip(export_root / "right.mp4", 20, width=IMAGE, height=IMAGE, frame=frame)


def test_the_export_has_a_video_token_and_processor(video_hf: Path) -> None:
    from transformers import AutoProcessor

    config = json.loads((video_hf / "config.json").read_text())
    provenance = json.loads((video_hf / "neva_export.json").read_text())
    assert config["video_token_index"] == provenance["video_token_index"] != config["image_token_index"]
    processor = AutoProcessor.from_pretrained(str(video_hf), local_files_only=True)
    assert processor.tokenizer.convert_tokens_to_ids("<video>") == config["video_token_index"]
    assert type(processor.video_processor).__name__ == "LlavaOnevisionVideoProcessor"
    assert provenance["appended_rows"] == config["text_config"]["vocab_size"] - provenance["llm_vocab_size"]


def test_import_removes_the_media_rows(export_root: Path, video_hf: Path, video_nemo: Path) -> None:
    from neva_tools.export.import_llava import import_hf_llava
    from neva_tools.inference.load import neva_config

    back = import_hf_llava(video_hf, export_root / "ov_video_back.nemo")
    assert neva_config(back)["vocab_size"] == neva_config(video_nemo).get("vocab_size", 640)


@pytest.mark.parametrize("frames", [4, 6])
def test_video_logits_equal_ours(dist: None, video_nemo: Path, video_hf: Path, clip: Path, frames: int) -> None:
    from transformers import AutoProcessor

    from neva_tools.inference.load import load_neva

    loaded = load_neva(video_nemo)
    sampling = VideoSampling(base_interval=0.5, min_frames=frames, max_frames=frames)
    pixels = video_pixels(clip, sampling, loaded.image_processor)  # [frames, 3, S, S]
    turns = [Turn("system", SYSTEM), Turn("user", f"<image>\n{QUESTION}"), Turn("assistant", ANSWER)]
    ids = tokenize_conversation(turns, loaded.template, loaded.tokenizer).input_ids  # <video> is the media token
    layout = loaded.model.image_layout
    count = clip_tokens(frames, layout, loaded.model.img_seq_len)
    sizes = torch.tensor([[IMAGE, IMAGE, 1]])
    with torch.no_grad():
        ours, _ = loaded.model(pixels, torch.tensor([ids]), torch.arange(len(ids))[None], None,
                               num_image_tiles=torch.tensor([frames], dtype=torch.int), image_sizes=sizes,
                               runtime_gather_output=True)  # fmt: skip
    ours = ours[..., : loaded.vocab_size]

    sampled, _ = decode_frames(clip, sampling)  # transformers gets the frames our sampling chose
    video = np.stack([np.asarray(f) for f in sampled])
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}]  # fmt: skip
    processor = AutoProcessor.from_pretrained(str(video_hf), local_files_only=True)
    text = processor.apply_chat_template(messages, tokenize=False)
    inputs = processor(text=text, videos=[video], return_tensors="pt")
    video_id = json.loads((video_hf / "config.json").read_text())["video_token_index"]
    assert inputs["input_ids"][0].tolist() == expand(ids, video_id, count)
    assert count == frames * 4 + 1  # SigLIP 28/7: 4x4 features pooled to 2x2, one newline
    torch.testing.assert_close(inputs["pixel_values_videos"][0], pixels, rtol=0, atol=1e-5)
    with torch.no_grad():
        theirs = hf_model(video_hf)(**inputs).logits
    assert theirs.shape[1] == ours.shape[1]
    diff = (ours - theirs[..., : loaded.vocab_size]).abs().max().item()
    assert diff <= 1e-4, diff


def generate_job(rank: int, world_size: int, args: list[str]) -> dict:
    """``neva generate`` in its own process (it sets up its own parallel state); its exit status and --json output."""
    import contextlib
    import io

    from neva_tools.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(args)
    return {"status": status, "output": out.getvalue()}


def test_neva_generate_video_equals_transformers_greedy(video_nemo: Path, video_hf: Path, clip: Path) -> None:
    from dist_helpers import run_distributed
    from transformers import AutoProcessor

    args = ["generate", "--model", str(video_nemo), "--video", str(clip), "--prompt", f"<video>\n{QUESTION}",
            "--system", SYSTEM, "--max-new-tokens", "6", "--json", "--dtype", "fp32"]  # fmt: skip
    result = run_distributed(generate_job, 1, args)[0]
    assert result["status"] == 0
    ours = json.loads(result["output"].strip().splitlines()[-1])
    sampled, _ = decode_frames(clip, VideoSampling())  # the model's config has no video keys: the defaults
    assert len(sampled) == 4  # 2 s at 10 fps, one frame per 2 s, raised to video_min_frames 4
    processor = AutoProcessor.from_pretrained(str(video_hf), local_files_only=True)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]  # fmt: skip
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=text, videos=[np.stack([np.asarray(f) for f in sampled])], return_tensors="pt")
    model = hf_model(video_hf)
    with torch.no_grad():
        tokens = model.generate(**inputs, do_sample=False, max_new_tokens=ours["new_tokens"], pad_token_id=0)
    new = tokens[0, inputs["input_ids"].shape[1] :].tolist()
    theirs = processor.tokenizer.decode(new, skip_special_tokens=True)
    assert len(new) == ours["new_tokens"] and theirs.strip() == ours["answer"].strip()  # ours strips the answer
