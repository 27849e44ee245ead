"""Fixtures for the export tests: a tiny NeVA ``.nemo`` (TP=1 and TP=2), its CLIP towers and its export."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))

from builders import build_tiny_llm, caption_corpus
from neva_models import build_hf_clip, build_neva_nemo, build_open_clip


@pytest.fixture(scope="session")
def export_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="session")
def tokenizer300(export_root: Path) -> Path:
    """A 300-piece sentencepiece model: as many tokens as the tiny LLM's vocabulary (``<image>`` needs a new row)."""
    from neva_tools.tokenizer.train import train_sentencepiece

    return train_sentencepiece(caption_corpus(), export_root / "tok300.model", vocab_size=300)


@pytest.fixture(scope="session")
def llm_nemo(export_root: Path, tokenizer300: Path) -> Path:
    """The tiny LLaMA (GQA, untied, vocabulary 300, random norms) as a TP=1 ``.nemo``."""
    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo

    hf = build_tiny_llm("llama", export_root / "llm_hf", sp_model=tokenizer300)
    convert_hf_to_nemo(str(hf), export_root / "llm.nemo")
    return export_root / "llm.nemo"


@pytest.fixture(scope="session")
def hf_clip(export_root: Path) -> Path:
    return build_hf_clip(export_root / "clip_hf")


@pytest.fixture(scope="session")
def open_clip_dir(export_root: Path) -> Path:
    return build_open_clip(export_root / "clip_open")


@pytest.fixture(scope="session")
def neva_nemo(export_root: Path, llm_nemo: Path, hf_clip: Path) -> Path:
    """A stage-2 NeVA ``.nemo`` (LLM + projector, vicuna_v1, pad) with the HF CLIP as its vision encoder."""
    return build_neva_nemo(llm_nemo, export_root / "neva.nemo", hf_clip)


@pytest.fixture(scope="session")
def neva_tp2(export_root: Path, neva_nemo: Path) -> Path:
    """The same NeVA ``.nemo`` split for TP=2 (legacy ``mp_rank_XX`` layout) by ``neva repartition``."""
    from neva_tools.convert.repartition import repartition

    repartition(neva_nemo, export_root / "neva_tp2.nemo", tp=2)
    return export_root / "neva_tp2.nemo"


@pytest.fixture(scope="session")
def exported(export_root: Path, neva_nemo: Path) -> Path:
    """``export_hf_llava`` of the TP=1 NeVA ``.nemo``."""
    from neva_tools.export.hf_llava import export_hf_llava

    return export_hf_llava(neva_nemo, export_root / "hf_llava")


@pytest.fixture(scope="session")
def exported_tp2(export_root: Path, neva_tp2: Path) -> Path:
    """``export_hf_llava`` of the TP=2 NeVA ``.nemo``."""
    from neva_tools.export.hf_llava import export_hf_llava

    return export_hf_llava(neva_tp2, export_root / "hf_llava_from_tp2")


@pytest.fixture(scope="session")
def hf_siglip(export_root: Path) -> Path:
    """A tiny random HF SigLIP tower (28 px, 7 px patches, hidden 32: the projector's input)."""
    from anyres_models import build_hf_siglip

    return build_hf_siglip(export_root / "siglip_hf")


@pytest.fixture(scope="session")
def qwen2_nemo(export_root: Path) -> Path:
    """A tiny Qwen2 (tied, QKV biases, vocabulary 640) with a byte-level ChatML tokenizer, as a TP=1 ``.nemo``."""
    from anyres_models import build_qwen2

    return build_qwen2(export_root / "qwen2")


@pytest.fixture(scope="session")
def llama512_nemo(export_root: Path, tokenizer300: Path) -> Path:
    """A tiny LLaMA like ``llm_nemo`` with 512 positions (room for AnyRes images), as a TP=1 ``.nemo``."""
    from anyres_models import build_llama

    return build_llama(export_root / "llama512", tokenizer300)
