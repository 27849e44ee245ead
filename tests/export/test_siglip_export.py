"""``neva export hf-llava`` of a one-view (``pad``) SigLIP + LLaMA model → ``LlavaForConditionalGeneration`` with a
``SiglipVisionModel`` (``vision_feature_select_strategy: full``, no class token): our logits and greedy tokens, the
processor's ids and pixels, ``neva import`` back to the same tensors, and SigLIP towers from every source."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from anyres_models import expand, hf_greedy, hf_logits, image, our_ids, our_logits
from dist_helpers import in_process_distributed
from neva_models import build_neva_nemo, safetensors_of, state_of

from neva_tools.export.hf_llava import export_hf_llava
from neva_tools.export.import_llava import import_hf_llava

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mappings"))

SIZES = [(40, 30), (20, 50), (28, 28)]  # (width, height): padded to a square with SigLIP's mean colour, or as is


@pytest.fixture(scope="module")
def dist() -> Iterator[None]:
    with in_process_distributed(tp=1):
        yield


@pytest.fixture(scope="module")
def siglip_nemo(export_root: Path, llama512_nemo: Path, hf_siglip: Path) -> Path:
    return build_neva_nemo(llama512_nemo, export_root / "siglip_llava.nemo", hf_siglip, seed=13)


@pytest.fixture(scope="module")
def siglip_hf(export_root: Path, siglip_nemo: Path) -> Path:
    return export_hf_llava(siglip_nemo, export_root / "hf_siglip_llava")


@pytest.fixture(scope="module")
def siglip_tp2(export_root: Path, siglip_nemo: Path) -> Path:
    from neva_tools.convert.repartition import repartition

    repartition(siglip_nemo, export_root / "siglip_llava_tp2.nemo", tp=2)
    return export_root / "siglip_llava_tp2.nemo"


@pytest.fixture(scope="module")
def loaded(dist: None, siglip_nemo: Path) -> object:
    from neva_tools.inference.load import load_neva

    return load_neva(siglip_nemo)


def test_directory_is_llava_with_a_siglip_tower(siglip_hf: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    model, info = AutoModelForImageTextToText.from_pretrained(str(siglip_hf), local_files_only=True,
                                                              output_loading_info=True)  # fmt: skip
    assert isinstance(model, LlavaForConditionalGeneration) and not any(info.values()), info
    cfg = model.config
    assert type(model.model.vision_tower).__name__ == "SiglipVisionModel"
    assert (cfg.vision_feature_select_strategy, cfg.vision_feature_layer, cfg.image_seq_length) == ("full", -2, 16)
    assert cfg.vision_config.hidden_act == "gelu_pytorch_tanh" and cfg.vision_config.vision_use_head is False
    processor = AutoProcessor.from_pretrained(str(siglip_hf), local_files_only=True)
    assert (processor.patch_size, processor.num_additional_image_tokens) == (7, 0)
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5] and processor.image_processor.do_pad


@pytest.mark.parametrize("size", SIZES, ids=["wide", "tall", "square"])
def test_logits_equal_ours(loaded: object, siglip_hf: Path, size: tuple[int, int]) -> None:
    img = image(*size)
    ids, ours, batch = our_logits(loaded, img)
    theirs, inputs = hf_logits(siglip_hf, img)
    assert inputs["input_ids"][0].tolist() == expand(ids, 300, 16)  # 16 patches, no class token
    assert torch.equal(inputs["pixel_values"], batch.pixels)  # PIL backend: bit-identical to ours
    diff = (ours - theirs[..., :300]).abs().max().item()
    print(f"llava + siglip {size}: max |logit difference| {diff:.3g}")
    assert diff <= 1e-4


def test_greedy_20_tokens_equal_transformers(loaded: object, siglip_hf: Path) -> None:
    from neva_tools.inference.generate import generate

    img = image(*SIZES[0])
    batch = loaded.image_processor.batch([img])
    ours = generate(loaded.model, loaded.tokenizer, our_ids(loaded, None), batch, max_new_tokens=20, stop_ids=(),
                    vocab_size=loaded.vocab_size)  # fmt: skip
    theirs = hf_greedy(siglip_hf, img)
    assert len(ours.tokens) == len(theirs) == 20
    assert ours.tokens == theirs and len(set(theirs)) > 1


def test_tp2_nemo_exports_the_same_model(siglip_tp2: Path, siglip_hf: Path, export_root: Path) -> None:
    out = export_hf_llava(siglip_tp2, export_root / "hf_siglip_llava_tp2")
    a, b = safetensors_of(siglip_hf), safetensors_of(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("tp", [1, 2])
def test_import_of_export_is_the_original(siglip_nemo: Path, siglip_tp2: Path, siglip_hf: Path, export_root: Path,
                                          tp: int) -> None:  # fmt: skip
    from neva_tools.checkpoint import nemo_vision

    back = import_hf_llava(siglip_hf, export_root / f"siglip_back_tp{tp}.nemo", tp=tp)
    for rank in range(tp):
        original, imported = state_of(siglip_nemo if tp == 1 else siglip_tp2, rank), state_of(back, rank)
        assert original.keys() <= imported.keys() and all(torch.equal(original[k], imported[k]) for k in original)
        tower = imported.keys() - original.keys()  # SigLIP: stored as neva train stores a tower (this rank's shard)
        assert tower and all(k.startswith(nemo_vision.PREFIX) for k in tower)


def test_imported_model_runs_and_exports_again(dist: None, siglip_hf: Path, export_root: Path) -> None:
    from neva_tools.checkpoint.nemo_archive import NemoArchive
    from neva_tools.inference.load import load_neva

    back = import_hf_llava(siglip_hf, export_root / "siglip_back.nemo", tp=2)
    with NemoArchive(back) as archive:
        cfg = archive.read_config()
    assert cfg["vision"]["arch"]["model_type"] == "siglip" and cfg["data"]["image_aspect_ratio"] == "pad"
    img = image(*SIZES[1])
    _, ours, _ = our_logits(load_neva(back), img)  # the TP=2 file alone, at TP=1
    theirs, _ = hf_logits(siglip_hf, img)
    assert (ours - theirs[..., :300]).abs().max().item() <= 1e-4
    again = export_hf_llava(back, export_root / "hf_siglip_again")
    a, b = safetensors_of(siglip_hf), safetensors_of(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (siglip_hf / "config.json").read_text() == (again / "config.json").read_text()


def test_siglip_towers_from_every_source(tmp_path: Path) -> None:
    """HF SiglipVisionModel and SiglipModel directories and an open_clip (timm) SigLIP become HF SiglipVisionModel
    tensors with the source's features (``hidden_states[-2]``; timm's final ``norm`` → ``post_layernorm``)."""
    from siglip_tiny import IMAGE, build_checkpoints
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from neva_tools.export.vision import read_tower

    found = build_checkpoints(tmp_path)
    towers = {name: read_tower(str(found[name])) for name in ("hf_vision", "hf_siglip", "open_clip")}
    a, b = towers["hf_vision"].state, towers["hf_siglip"].state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the text tower is left out
    tower = towers["open_clip"]
    assert tower.arch.image_size == IMAGE and tower.arch.activation == "gelu"  # timm's exact GELU
    model = SiglipVisionModel(SiglipVisionConfig(**tower.arch.to_hf_config())).eval()
    model.load_state_dict(tower.state, strict=True)  # transformers 5 names: no vision_model. prefix
    with torch.no_grad():
        features = model(pixel_values=found["images"], output_hidden_states=True).hidden_states[-2]
    assert (features - found["open_clip_ref"]).abs().max().item() <= 1e-5
    assert not torch.equal(tower.state["post_layernorm.weight"], torch.ones(64))  # timm's trained norm


def test_written_config_is_siglip(siglip_hf: Path) -> None:
    cfg = json.loads((siglip_hf / "config.json").read_text())
    assert cfg["vision_config"]["model_type"] == "siglip_vision_model" and cfg["architectures"] == [
        "LlavaForConditionalGeneration"
    ]
