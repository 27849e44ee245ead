"""``neva export hf-llava`` of a LLaVA-OneVision-style model (SigLIP + Qwen2, ``anyres_max_N`` + ``spatial_unpad``,
the tower trained and stored in the ``.nemo``) → ``LlavaOnevisionForConditionalGeneration``: our logits and greedy
tokens at TP=1 and TP=2, and ``neva import`` back to the same tensors."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from anyres_models import expand, hf_greedy, hf_logits, hf_model, image, logits_job, our_ids, our_logits
from dist_helpers import in_process_distributed, run_distributed
from neva_models import build_neva_nemo, safetensors_of, state_of

from neva_tools.export.hf_llava import export_hf_llava
from neva_tools.export.import_llava import import_hf_llava
from neva_tools.mappings.projector import NEWLINE

PINPOINTS = "(1x1),...,(3x3)"
ASPECT = "anyres_max_2"  # grids beyond 2 tiles' worth of features are shrunk (bilinear), as OneVision's anyres_max_9
#: (width, height): 3 x 3 tiles shrunk to 5 x 5 features; 1 x 3 tiles (12 feature columns, shrunk); 2 x 1, kept
SIZES = [(80, 75), (80, 25), (25, 50)]


@pytest.fixture(scope="module")
def dist() -> Iterator[None]:
    with in_process_distributed(tp=1):
        yield


@pytest.fixture(scope="module")
def trained_tower(hf_siglip: Path) -> tuple[object, dict[str, torch.Tensor]]:
    """The SigLIP tower as ``neva train`` stores it after training it (all layers: vision_select_layer -1)."""
    from neva_tools.model.vision import read_clip_vision, vision_state_to_mcore

    state, arch, kind = read_clip_vision(hf_siglip)
    full = vision_state_to_mcore(state, arch, kind, select_layer=-1)
    g = torch.Generator().manual_seed(5)
    return arch, {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in full.items()}


@pytest.fixture(scope="module")
def ov_nemo(export_root: Path, qwen2_nemo: Path, hf_siglip: Path, trained_tower: tuple) -> Path:
    return build_neva_nemo(qwen2_nemo, export_root / "ov.nemo", hf_siglip, template="chatml", aspect=ASPECT,
                           merge="spatial_unpad", data={"image_grid_pinpoints": PINPOINTS}, select_layer=-1,
                           tower=trained_tower, seed=12)  # fmt: skip


@pytest.fixture(scope="module")
def ov_tp2(export_root: Path, ov_nemo: Path) -> Path:
    from neva_tools.convert.repartition import repartition

    repartition(ov_nemo, export_root / "ov_tp2.nemo", tp=2)
    return export_root / "ov_tp2.nemo"


@pytest.fixture(scope="module")
def ov_hf(export_root: Path, ov_nemo: Path) -> Path:
    return export_hf_llava(ov_nemo, export_root / "hf_ov")


@pytest.fixture(scope="module")
def ov_hf_tp2(export_root: Path, ov_tp2: Path) -> Path:
    return export_hf_llava(ov_tp2, export_root / "hf_ov_tp2", hf_format="llava_onevision")


@pytest.fixture(scope="module")
def loaded(dist: None, ov_nemo: Path) -> object:
    from neva_tools.inference.load import load_neva

    return load_neva(ov_nemo)


def _image_id(directory: Path) -> int:
    return json.loads((directory / "config.json").read_text())["image_token_index"]


def test_directory_is_a_llava_onevision_model(ov_hf: Path, ov_nemo: Path, trained_tower: tuple) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaOnevisionForConditionalGeneration

    from neva_tools.mappings.siglip import mcore_state_to_hf_siglip

    model, info = AutoModelForImageTextToText.from_pretrained(str(ov_hf), local_files_only=True,
                                                              output_loading_info=True)  # fmt: skip
    assert isinstance(model, LlavaOnevisionForConditionalGeneration)
    assert not any(info.values()), info
    cfg = model.config
    assert (cfg.vision_aspect_ratio, cfg.vision_feature_select_strategy, cfg.vision_feature_layer) == (
        ASPECT,
        "full",
        -1,
    )
    assert cfg.vision_config.model_type == "siglip_vision_model" and cfg.text_config.model_type == "qwen2"
    assert cfg.image_grid_pinpoints[:3] == [[28, 28], [56, 28], [84, 28]] and len(cfg.image_grid_pinpoints) == 9
    assert cfg.tie_word_embeddings and cfg.image_token_index < cfg.text_config.vocab_size == 640  # a free id
    assert torch.equal(model.model.image_newline.detach(), state_of(ov_nemo)[NEWLINE.hf[0]])
    arch, tensors = trained_tower  # the trained tower, not the one training started from
    trained = mcore_state_to_hf_siglip(tensors, arch)
    state = model.model.vision_tower.state_dict()  # transformers 5: no vision_model level
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    processor = AutoProcessor.from_pretrained(str(ov_hf), local_files_only=True)
    assert type(processor).__name__ == "LlavaOnevisionProcessor" and processor.num_image_tokens == 16
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]  # SigLIP's normalisation
    assert "<|im_start|>assistant" in (ov_hf / "chat_template.jinja").read_text()


@pytest.mark.parametrize("size", SIZES, ids=["3x3", "1x3", "2x1"])
def test_logits_equal_ours(loaded: object, ov_hf: Path, size: tuple[int, int]) -> None:
    img = image(*size)
    ids, ours, batch = our_logits(loaded, img)
    theirs, inputs = hf_logits(ov_hf, img)
    layout = loaded.model.image_layout
    tokens = layout.tokens(size[1], size[0])
    assert len(batch.pixels) == layout.num_tiles(size[1], size[0]) > 2
    assert inputs["input_ids"][0].tolist() == expand(ids, _image_id(ov_hf), tokens)
    torch.testing.assert_close(inputs["pixel_values"][0], batch.pixels, rtol=0, atol=1e-6)
    diff = (ours - theirs).abs().max().item()
    print(f"llava_onevision {size}: max |logit difference| {diff:.3g}")
    assert diff <= 1e-4


def test_large_grids_are_shrunk_as_onevision_does(loaded: object) -> None:
    layout = loaded.model.image_layout
    assert layout.unpadded(75, 80).resize == (5, 5) and layout.unpadded(25, 80).resize is not None
    assert layout.unpadded(50, 25).resize is None


def test_tp2_logits_and_tokens(ov_tp2: Path, ov_hf: Path, ov_hf_tp2: Path) -> None:
    """Our model at TP=2 (two gloo processes, the TP=2 file's shards: LLM and trained tower) against the export of
    that file, which equals the TP=1 file's."""
    a, b = safetensors_of(ov_hf), safetensors_of(ov_hf_tp2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    size = SIZES[0]
    results = run_distributed(logits_job, 2, str(ov_tp2), *size, timeout=300)
    img = image(*size)
    theirs, inputs = hf_logits(ov_hf_tp2, img)
    greedy = hf_greedy(ov_hf_tp2, img)
    expected = inputs["input_ids"][0].tolist()
    for result in results:
        count = len(expected) - len(result["ids"]) + 1
        assert count == 16 + 5 * 6 and expected == expand(result["ids"], _image_id(ov_hf_tp2), count)
        diff = (result["logits"] - theirs).abs().max().item()
        print(f"llava_onevision TP=2 {size}: max |logit difference| {diff:.3g}", file=sys.stderr)
        assert diff <= 1e-4
        assert result["tokens"] == greedy


def test_greedy_20_tokens_equal_transformers(loaded: object, ov_hf: Path) -> None:
    from neva_tools.inference.generate import generate

    img = image(*SIZES[1])
    batch = loaded.image_processor.batch([img])
    ours = generate(loaded.model, loaded.tokenizer, our_ids(loaded, None), batch, max_new_tokens=20, stop_ids=(),
                    vocab_size=loaded.vocab_size)  # fmt: skip
    theirs = hf_greedy(ov_hf, img)
    assert len(ours.tokens) == len(theirs) == 20
    assert ours.tokens == theirs and len(set(theirs)) > 1


@pytest.mark.parametrize("tp", [1, 2])
def test_import_of_export_is_the_original(ov_nemo: Path, ov_tp2: Path, ov_hf: Path, ov_hf_tp2: Path,
                                          export_root: Path, tp: int) -> None:  # fmt: skip
    from neva_tools.checkpoint.nemo_archive import NemoArchive

    original_nemo, hf = (ov_nemo, ov_hf) if tp == 1 else (ov_tp2, ov_hf_tp2)
    back = import_hf_llava(hf, export_root / f"ov_back_tp{tp}.nemo", tp=tp)
    for rank in range(tp):
        original, imported = state_of(original_nemo, rank), state_of(back, rank)
        assert original.keys() == imported.keys()  # LLM, projector, image_newline and the stored tower's shard
        assert all(torch.equal(original[k], imported[k]) for k in original), rank
    with NemoArchive(back) as archive:
        cfg = archive.read_config()
    assert (cfg["data"]["image_aspect_ratio"], cfg["mm_cfg"]["mm_patch_merge_type"]) == (ASPECT, "spatial_unpad")
    assert len(cfg["data"]["image_grid_pinpoints"]) == 9 and cfg["data"]["conv_template"] == "chatml"
    assert (
        cfg["vision"]["arch"]["model_type"] == "siglip" and cfg["mm_cfg"]["vision_encoder"]["vision_select_layer"] == -1
    )


def test_imported_model_runs_from_its_nemo(dist: None, ov_hf: Path, export_root: Path) -> None:
    from neva_tools.inference.load import load_neva

    nemo = import_hf_llava(ov_hf, export_root / "ov_imported.nemo", vision_dir=export_root / "ov_imported_siglip")
    img = image(*SIZES[2])
    _, ours, _ = our_logits(load_neva(nemo), img)
    theirs, _ = hf_logits(ov_hf, img)
    assert (ours - theirs).abs().max().item() <= 1e-4
    vision = json.loads((export_root / "ov_imported_siglip" / "config.json").read_text())
    assert vision["architectures"] == ["SiglipVisionModel"] and vision["num_hidden_layers"] == 3


def test_a_transformers_made_onevision_imports(dist: None, ov_hf: Path, export_root: Path) -> None:
    """A LlavaOnevisionForConditionalGeneration saved by transformers (no neva_export.json): ChatML is the Qwen2
    default template, and its logits are ours."""
    from transformers import AutoProcessor

    from neva_tools.checkpoint.nemo_archive import NemoArchive
    from neva_tools.inference.load import load_neva

    torch.manual_seed(8)
    model = hf_model(ov_hf)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    source = export_root / "hf_ov_made"
    model.save_pretrained(str(source))
    AutoProcessor.from_pretrained(str(ov_hf), local_files_only=True).save_pretrained(str(source))
    nemo = import_hf_llava(source, export_root / "hf_ov_made.nemo")
    with NemoArchive(nemo) as archive:
        assert archive.read_config()["data"]["conv_template"] == "chatml"
    img = image(*SIZES[0])
    _, ours, _ = our_logits(load_neva(nemo), img)
    theirs, _ = hf_logits(source, img)
    assert (ours - theirs).abs().max().item() <= 1e-4
