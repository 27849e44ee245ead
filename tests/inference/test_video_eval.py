"""``neva eval`` on video records (issue 22): a tiny OneVision-style NeVA (SigLIP, AnyRes, spatial_unpad, ChatML)
scored on two moving-square clips and one image. The clips' frames are sampled with the model's training settings
(its config's ``data``: 3 frames, not the defaults' 4); the loss equals a plain forward pass per record, the choice
NLLs equal the same forward's, and a batched generation equals ``neva generate --video``'s answer."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import in_process_distributed, run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from anyres_models import build_hf_siglip, build_qwen2, image
from neva_models import IMAGE, build_neva_nemo
from video_clips import moving_square, write_clip

from neva_tools.data.records import Turn
from neva_tools.data.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX, tokenize_conversation
from neva_tools.data.video import VideoSampling, video_pixels
from neva_tools.inference.evaluate import EvalSettings, evaluate
from neva_tools.inference.load import LoadedNeva, load_neva

QUESTION = "Which way does the square move?"
DIRECTIONS = ["left", "right", "up", "down"]
VIDEO_DATA = {"base_interval": 0.5, "video_min_frames": 3, "video_max_frames": 3}  # the model's training settings
FRAMES = 3  # a 1 s clip, one frame per 0.5 s = 2, raised to video_min_frames


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("video_eval")
    data = {"image_grid_pinpoints": "(1x1),...,(3x3)", **VIDEO_DATA}
    nemo = build_neva_nemo(build_qwen2(root), root / "ov.nemo", build_hf_siglip(root / "siglip"), template="chatml",
                           aspect="anyres_max_2", merge="spatial_unpad", data=data, select_layer=-1,
                           seed=21)  # fmt: skip
    videos, images = root / "videos", root / "images"
    images.mkdir()
    for direction in ("right", "down"):
        write_clip(videos / f"{direction}.mp4", 10, width=IMAGE, height=IMAGE,
                   frame=moving_square(direction, 10, size=IMAGE, side=IMAGE // 4))  # fmt: skip
    image(40, 30).save(images / "still.png")
    records = [
        {"id": f"clip-{d}", "video": f"{d}.mp4", "kind": "motion", "candidates": DIRECTIONS,
         "conversations": [{"from": "human", "value": f"<video>\n{QUESTION}"}, {"from": "gpt", "value": d}]}
        for d in ("right", "down")
    ] + [{"id": "still", "image": "still.png", "kind": "colour", "candidates": ["red", "blue"],
          "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                            {"from": "gpt", "value": "red"}]}]  # fmt: skip
    path = root / "records.json"
    path.write_text(json.dumps(records))
    return {"root": root, "nemo": nemo, "videos": videos, "images": images, "data": path, "records": records}


@pytest.fixture(scope="module")
def loaded(assets: dict[str, Any]) -> Iterator[LoadedNeva]:
    with in_process_distributed():
        yield load_neva(assets["nemo"])


@torch.no_grad()
def plain_nll(loaded: LoadedNeva, assets: dict[str, Any], record: dict[str, Any]) -> tuple[float, int]:
    """(summed NLL, count) of a record's supervised tokens: one forward pass, log-softmax over the true vocabulary,
    each text token's position counted by hand (a clip: 3 frames × 2×2 pooled features + one newline)."""
    model = loaded.model
    question, reply = (turn["value"] for turn in record["conversations"])
    turns = [Turn("user", question.replace("<video>", "<image>")), Turn("assistant", reply)]
    tok = tokenize_conversation(turns, loaded.template, loaded.tokenizer)
    if "video" in record:
        sampling = VideoSampling(base_interval=0.5, min_frames=FRAMES, max_frames=FRAMES)
        pixels = video_pixels(assets["videos"] / record["video"], sampling, loaded.image_processor)
        assert len(pixels) == FRAMES
        tiles, sizes, width = torch.tensor([FRAMES], dtype=torch.int), torch.tensor([[IMAGE, IMAGE, 1]]), 3 * 4 + 1
    else:
        batch = loaded.image_processor.batch([assets["images"] / record["image"]])
        pixels, tiles, sizes, width = batch.pixels, batch.tiles, batch.sizes, int(batch.tokens[0])
    ids = torch.tensor([tok.input_ids])
    logits = model(pixels, ids, torch.arange(ids.shape[1])[None], None, num_image_tiles=tiles, image_sizes=sizes,
                   runtime_gather_output=True)[0][0]  # fmt: skip
    logp = torch.log_softmax(logits[:, : loaded.vocab_size].double(), dim=-1)
    position, nll, count = -1, 0.0, 0
    for i, token in enumerate(tok.input_ids):  # the logits at a token's last position predict the next token
        if i and tok.labels[i] != IGNORE_INDEX:
            nll -= float(logp[position, token])
            count += 1
        position += width if token == IMAGE_TOKEN_INDEX else 1
    assert position == logits.shape[0] - 1
    return nll, count


def test_loss_on_video_records_equals_a_plain_forward(loaded: LoadedNeva, assets: dict[str, Any]) -> None:
    report, _ = evaluate(loaded, assets["data"], assets["images"], EvalSettings(metrics=("loss",), batch_size=3),
                         video_folder=assets["videos"])  # fmt: skip
    per_record = [plain_nll(loaded, assets, r) for r in assets["records"]]
    tokens = sum(n for _, n in per_record)
    assert report["loss"]["records"] == 3 and report["loss"]["tokens"] == tokens
    assert report["loss"]["value"] == pytest.approx(sum(v for v, _ in per_record) / tokens, rel=1e-5)


def test_choice_on_video_records(loaded: LoadedNeva, assets: dict[str, Any]) -> None:
    report, rows = evaluate(loaded, assets["data"], assets["images"], EvalSettings(metrics=("choice",)),
                            video_folder=assets["videos"])  # fmt: skip
    assert report["choice"]["by_kind"]["motion"]["questions"] == 2
    assert report["choice"]["by_kind"]["motion"]["chance"] == 0.25
    for row, record in zip(rows, assets["records"], strict=True):
        assert list(row["nll"]) == record["candidates"] and row["choice"] == min(row["nll"], key=row["nll"].get)
        reference = record["conversations"][1]["value"]
        want, _ = plain_nll(loaded, assets, record)  # the reference's answer tokens are the record's supervised ones
        assert row["nll"][reference] == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_a_video_without_its_folder_is_an_error(loaded: LoadedNeva, assets: dict[str, Any]) -> None:
    from neva_tools.errors import NevaError

    with pytest.raises(NevaError, match=r"right\.mp4"):
        evaluate(loaded, assets["data"], assets["images"], EvalSettings(metrics=("choice",)))


def cli_job(rank: int, world_size: int, commands: list[list[str]]) -> list[dict[str, Any]]:
    """``neva`` commands in this process (each sets up its own parallel state): exit status and stdout of each."""
    from neva_tools.cli.main import main

    results = []
    for args in commands:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = main(args)
        results.append({"status": status, "output": out.getvalue()})
    return results


def test_eval_generation_equals_neva_generate_video(assets: dict[str, Any]) -> None:
    """``neva eval`` answers the clips and the image two per forward pass (a clip beside an image, left-padded);
    the clip's answer is ``neva generate --video``'s for the same clip and prompt."""
    root, nemo = assets["root"], str(assets["nemo"])
    report, predictions = root / "eval.json", root / "predictions.jsonl"
    evaluate_args = ["eval", "--model", nemo, "--data", str(assets["data"]), "--image-folder", str(assets["images"]),
                     "--video-folder", str(assets["videos"]), "--metrics", "generation", "--batch-size", "2",
                     "--max-new-tokens", "6", "--output", str(report), "--predictions", str(predictions),
                     "--dtype", "fp32"]  # fmt: skip
    generate_args = [["generate", "--model", nemo, "--video", str(assets["videos"] / f"{d}.mp4"), "--prompt",
                      f"<video>\n{QUESTION}", "--max-new-tokens", "6", "--json", "--dtype", "fp32"]
                     for d in ("right", "down")]  # fmt: skip
    results = run_distributed(cli_job, 1, [evaluate_args, *generate_args], timeout=600)[0]
    assert [r["status"] for r in results] == [0, 0, 0]
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert json.loads(report.read_text())["generation"]["questions"] == 3
    for row, result in zip(rows[:2], results[1:], strict=True):
        ours = json.loads(result["output"].strip().splitlines()[-1])
        assert ours["new_tokens"] > 0, "the tiny model's answer is empty; the comparison needs a non-empty one"
        assert row["generated"] == ours["answer"]
