"""``neva export hf-llava`` of an AnyRes (``anyres`` + ``spatial_unpad``) CLIP + LLaMA model →
``LlavaNextForConditionalGeneration``: the same logits and greedy tokens as ours, from TP=1 and TP=2 ``.nemo`` files,
and ``neva import`` back to the same tensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from anyres_models import expand, hf_greedy, hf_logits, hf_model, image, our_ids, our_logits
from dist_helpers import in_process_distributed
from neva_models import build_neva_nemo, safetensors_of, state_of

from neva_tools.errors import NevaError
from neva_tools.export.hf_llava import export_hf_llava
from neva_tools.export.import_llava import import_hf_llava
from neva_tools.mappings.projector import NEWLINE

PINPOINTS = "(1x1),...,(2x2)"  # LLaVA-NeXT's range form: 28x28, 56x28, 28x56 and 56x56 canvases
#: (width, height): wide (1 x 2 tiles, padding rows cut), tall (2 x 1, padding columns cut), square (2 x 2)
SIZES = [(50, 20), (20, 45), (40, 40)]


@pytest.fixture(scope="module")
def dist() -> Iterator[None]:
    with in_process_distributed(tp=1):
        yield


@pytest.fixture(scope="module")
def next_nemo(export_root: Path, llama512_nemo: Path, hf_clip: Path) -> Path:
    return build_neva_nemo(llama512_nemo, export_root / "next.nemo", hf_clip, aspect="anyres", merge="spatial_unpad",
                           data={"image_grid_pinpoints": PINPOINTS}, seed=11)  # fmt: skip


@pytest.fixture(scope="module")
def next_tp2(export_root: Path, next_nemo: Path) -> Path:
    from neva_tools.convert.repartition import repartition

    repartition(next_nemo, export_root / "next_tp2.nemo", tp=2)
    return export_root / "next_tp2.nemo"


@pytest.fixture(scope="module")
def next_hf(export_root: Path, next_nemo: Path) -> Path:
    return export_hf_llava(next_nemo, export_root / "hf_next")


@pytest.fixture(scope="module")
def next_hf_tp2(export_root: Path, next_tp2: Path) -> Path:
    return export_hf_llava(next_tp2, export_root / "hf_next_tp2", hf_format="llava_next")


@pytest.fixture(scope="module")
def loaded(dist: None, next_nemo: Path) -> object:
    from neva_tools.inference.load import load_neva

    return load_neva(next_nemo)


def test_directory_is_a_llava_next_model(next_hf: Path, next_nemo: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaNextForConditionalGeneration

    model, info = AutoModelForImageTextToText.from_pretrained(str(next_hf), local_files_only=True,
                                                              output_loading_info=True)  # fmt: skip
    assert isinstance(model, LlavaNextForConditionalGeneration)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    cfg = model.config
    assert cfg.image_grid_pinpoints == [[28, 28], [56, 28], [28, 56], [56, 56]]  # [height, width]
    assert (cfg.vision_feature_select_strategy, cfg.vision_feature_layer) == ("default", -2)
    assert torch.equal(model.model.image_newline.detach(), state_of(next_nemo)[NEWLINE.hf[0]])
    processor = AutoProcessor.from_pretrained(str(next_hf), local_files_only=True)
    assert type(processor).__name__ == "LlavaNextProcessor"
    assert type(processor.image_processor).__name__.startswith("LlavaNextImageProcessor")
    provenance = json.loads((next_hf / "neva_export.json").read_text())
    assert provenance["hf_format"] == "llava_next" and provenance["image_aspect_ratio"] == "anyres"


@pytest.mark.parametrize("size", SIZES, ids=["wide", "tall", "square"])
def test_logits_equal_ours(loaded: object, next_hf: Path, size: tuple[int, int]) -> None:
    img = image(*size)
    ids, ours, batch = our_logits(loaded, img)
    theirs, inputs = hf_logits(next_hf, img)
    tokens = loaded.model.image_layout.tokens(size[1], size[0])
    assert len(batch.pixels) > 2 and tokens > 16 + 1  # tiled, unpadded with newlines
    assert inputs["input_ids"][0].tolist() == expand(ids, 300, tokens)  # the processor counts our tokens
    torch.testing.assert_close(inputs["pixel_values"][0], batch.pixels, rtol=0, atol=1e-6)  # our tiles
    assert inputs["image_sizes"][0].tolist() == [size[1], size[0]]
    diff = (ours - theirs[..., :300]).abs().max().item()
    print(f"llava_next {size}: max |logit difference| {diff:.3g}")
    assert diff <= 1e-4
    assert torch.allclose(theirs[..., 300], theirs[..., :300].mean(-1), atol=1e-5)  # appended <image> row


def test_tp2_nemo_exports_the_same_model(dist: None, next_tp2: Path, next_hf: Path, next_hf_tp2: Path) -> None:
    """The TP=2 file's export equals the TP=1 file's tensor for tensor, and our model loaded from the TP=2 file
    (shards merged by our loader at TP=1) gives its logits."""
    from neva_tools.inference.load import load_neva

    a, b = safetensors_of(next_hf), safetensors_of(next_hf_tp2)
    assert a.keys() == b.keys() and "image_newline" in a and all(torch.equal(a[k], b[k]) for k in a)
    img = image(*SIZES[0])
    _, ours, _ = our_logits(load_neva(next_tp2), img)
    theirs, _ = hf_logits(next_hf_tp2, img)
    assert (ours - theirs[..., :300]).abs().max().item() <= 1e-4


def test_greedy_20_tokens_equal_transformers(loaded: object, next_hf: Path) -> None:
    from neva_tools.inference.generate import generate

    img = image(*SIZES[1])
    prompt = our_ids(loaded, None)
    batch = loaded.image_processor.batch([img])
    ours = generate(loaded.model, loaded.tokenizer, prompt, batch, max_new_tokens=20, stop_ids=(),
                    vocab_size=loaded.vocab_size)  # fmt: skip
    theirs = hf_greedy(next_hf, img)
    assert len(ours.tokens) == len(theirs) == 20
    assert ours.tokens == theirs and len(set(theirs)) > 1


@pytest.mark.parametrize("tp", [1, 2])
def test_import_of_export_is_the_original(next_nemo: Path, next_tp2: Path, next_hf: Path, next_hf_tp2: Path,
                                          hf_clip: Path, export_root: Path, tp: int) -> None:  # fmt: skip
    from neva_tools.checkpoint import nemo_vision
    from neva_tools.checkpoint.nemo_archive import NemoArchive

    original_nemo, hf = (next_nemo, next_hf) if tp == 1 else (next_tp2, next_hf_tp2)
    back = import_hf_llava(hf, export_root / f"next_back_tp{tp}.nemo", tp=tp)
    for rank in range(tp):
        original, imported = state_of(original_nemo, rank), state_of(back, rank)
        assert NEWLINE.hf[0] in original and original.keys() <= imported.keys()
        assert all(torch.equal(original[k], imported[k]) for k in original), rank  # LLM, projector, image_newline
        extra = imported.keys() - original.keys()  # the CLIP tower (the layers up to the select layer), this rank's
        assert extra and all(k.startswith(nemo_vision.PREFIX) for k in extra)
    with NemoArchive(back) as archive:
        cfg = archive.read_config()
    assert cfg["data"]["image_aspect_ratio"] == "anyres" and cfg["mm_cfg"]["mm_patch_merge_type"] == "spatial_unpad"
    assert cfg["data"]["image_grid_pinpoints"] == [[28, 28], [56, 28], [28, 56], [56, 56]]
    assert cfg["vision"]["stored"] is True and cfg["vision"]["arch"]["model_type"] == "clip"
    again = export_hf_llava(back, export_root / f"next_again_tp{tp}")  # the stored tower, nothing else needed
    a, b = safetensors_of(hf), safetensors_of(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_imported_model_runs_from_its_nemo(dist: None, next_hf: Path, export_root: Path) -> None:
    """The imported .nemo alone (tower stored in it, AnyRes keys in its config) gives the exported model's logits."""
    from neva_tools.inference.load import load_neva

    nemo = import_hf_llava(next_hf, export_root / "next_imported.nemo")
    img = image(*SIZES[2])
    _, ours, _ = our_logits(load_neva(nemo), img)
    theirs, _ = hf_logits(next_hf, img)
    assert (ours - theirs[..., :300]).abs().max().item() <= 1e-4


def test_a_transformers_made_llava_next_imports(dist: None, next_hf: Path, export_root: Path) -> None:
    """A LlavaNextForConditionalGeneration saved by transformers itself (its own layout, no neva_export.json)."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoProcessor

    from neva_tools.inference.load import load_neva

    torch.manual_seed(7)
    model = hf_model(next_hf)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    source = export_root / "hf_next_made"
    model.save_pretrained(str(source))
    AutoProcessor.from_pretrained(str(next_hf), local_files_only=True).save_pretrained(str(source))
    nemo = import_hf_llava(source, export_root / "hf_next_made.nemo", template="vicuna_v1")
    img = image(*SIZES[0])
    _, ours, _ = our_logits(load_neva(nemo), img)
    theirs, _ = hf_logits(source, img)
    assert (ours - theirs).abs().max().item() <= 1e-4  # 301 rows: the <image> row is a real row here
    # transformers 5's own names (model.language_model.*, model.vision_tower.*, lm_head, model.image_newline)
    v5 = export_root / "hf_next_v5"
    shutil.copytree(source, v5)
    renames = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.vision_model.", "model.vision_tower."),
               ("multi_modal_projector.", "model.multi_modal_projector."),
               ("image_newline", "model.image_newline"))  # fmt: skip
    state = {}
    for name, tensor in safetensors_of(source).items():
        old, new = next((o, n) for o, n in renames if name.startswith(o))
        state[new + name[len(old) :]] = tensor
    for file in v5.glob("*.safetensors*"):
        file.unlink()
    save_file(state, str(v5 / "model.safetensors"), metadata={"format": "pt"})
    a, b = state_of(nemo), state_of(import_hf_llava(v5, export_root / "hf_next_v5.nemo", template="vicuna_v1"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_classes_follow_the_config(llama512_nemo: Path, hf_clip: Path, next_nemo: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from neva_tools.cli.main import main

    argv = ["export", "hf-llava", "--input", str(next_nemo), "--output", str(tmp_path / "a"), "--format", "llava"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("neva: error:") and "--format llava cannot run" in err and "Traceback" not in err
    assert main([*argv[:-1], "llava_onevision"]) == 2  # anyres without a limit is LLaVA-NeXT
    assert "its class is LlavaNextForConditionalGeneration (--format llava_next or auto)" in capsys.readouterr().err
    with pytest.raises(NevaError, match=r"--format llava cannot run .*LlavaNextForConditionalGeneration"):
        export_hf_llava(next_nemo, tmp_path / "a", hf_format="llava")
    flat = build_neva_nemo(llama512_nemo, tmp_path / "flat.nemo", hf_clip, aspect="anyres", merge="flat",
                           data={"image_grid_pinpoints": PINPOINTS})  # fmt: skip
    with pytest.raises(NevaError, match=r"mm_patch_merge_type flat; Hugging Face LLaVA-NeXT .* spatial_unpad only"):
        export_hf_llava(flat, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_asymmetric_pinpoints_keep_their_orientation(dist: None, llama512_nemo: Path, hf_clip: Path,
                                                     export_root: Path) -> None:  # fmt: skip
    """One wide canvas ([height, width] = [28, 56]) and a square one: a 40 x 30 image goes on the wide 1 x 2 grid in
    both; a (width, height) mix-up would offer a tall canvas and give it one tile."""
    from neva_tools.inference.load import load_neva

    nemo = build_neva_nemo(llama512_nemo, export_root / "next_wide.nemo", hf_clip, aspect="anyres",
                           merge="spatial_unpad", data={"image_grid_pinpoints": [[28, 56], [28, 28]]})  # fmt: skip
    out = export_hf_llava(nemo, export_root / "hf_next_wide")
    assert json.loads((out / "config.json").read_text())["image_grid_pinpoints"] == [[28, 56], [28, 28]]
    loaded = load_neva(nemo)
    img = image(40, 30)
    assert loaded.model.image_layout.grid(30, 40) == (1, 2)
    ids, ours, _ = our_logits(loaded, img)
    theirs, inputs = hf_logits(out, img)
    assert inputs["input_ids"][0].tolist() == expand(ids, 300, loaded.model.image_layout.tokens(30, 40))
    assert (ours - theirs[..., :300]).abs().max().item() <= 1e-4
