"""Building and loading never depend on torch's default device (GitHub issue #16, point 1).

On a GPU, Lightning builds the model in ``configure_model`` with the GPU as torch's *default device*. A reader that
allocates a tensor without ``device=`` then gets GPU memory (``.numpy()`` fails on it), and a comparison with a
tensor read to CPU mixes devices. Here the default device is ``meta`` while loading: a tensor created without an
explicit device is a meta tensor, which cannot be read into, turned into numpy, compared or copied from, so a
loader that depends on the default device fails or loads nothing.

Harness: megatron-core's model construction itself works on a meta default device, but it then builds meta
parameters, and a copy into a meta parameter is a no-op that cannot be checked. So the builders the loaders call
(``build_gpt_model``, ``build_neva_model``, ``build_clip_vit``) are wrapped to run under ``torch.device("cpu")``
(the parameters are built on the CPU, *outside* the harness) and then filled with NaN; everything else, i.e. the
reading and loading, runs under ``torch.device("meta")``. Every tensor loaded so must equal, bit for bit, the one
loaded without the harness, and no parameter that a loader should fill may keep its NaN.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mappings"))
from builders import build_tiny_llm, caption_corpus
from siglip_tiny import OPEN_CLIP_CFG, hf_vision, perturb

PROJECTOR = "mlp2x_gelu"
BUILDERS = (("neva_tools.model.gpt", "build_gpt_model"), ("neva_tools.model.neva", "build_neva_model"),
            ("neva_tools.model.vision", "build_clip_vit"))  # fmt: skip


def _built_on_cpu(build: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
    """``build`` run with the CPU as default device, its parameters then set to NaN (so unloaded ones show)."""

    @functools.wraps(build)
    def wrapper(*args: Any, **kwargs: Any) -> torch.nn.Module:
        with torch.device("cpu"):  # the model is built outside the meta harness: see the module docstring
            model = build(*args, **kwargs)
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(float("nan"))
        return model

    return wrapper


@pytest.fixture
def cpu_builders(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model builders the loaders call build on the CPU (NaN parameters), whatever the default device."""
    import importlib

    for module, name in BUILDERS:
        target = importlib.import_module(module)
        monkeypatch.setattr(target, name, _built_on_cpu(getattr(target, name)))


@contextlib.contextmanager
def meta_default() -> Iterator[None]:
    """torch's default device is ``meta`` inside: what a default-device tensor would be on the GPU in training."""
    with torch.device("meta"):
        assert torch.empty(1).device.type == "meta"
        yield


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}  # fmt: skip


def _assert_same(loaded: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], unloaded: str = "\0") -> None:
    """Bit-exact equality on the CPU; names starting with ``unloaded`` are not loaded (NaN on both sides)."""
    assert loaded.keys() == reference.keys()
    for name, want in reference.items():
        got = loaded[name]
        assert got.device.type == "cpu" and got.dtype == want.dtype, name
        if name.startswith(unloaded):
            assert torch.isnan(got).all() and torch.isnan(want).all(), name
            continue
        assert not torch.isnan(want).any(), f"{name} was not loaded"
        assert torch.equal(got, want), name


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny LLaMA as ``.nemo`` (legacy and dist, TP 1 and 2), tiny SigLIP towers, a small tokenizer."""
    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
    from neva_tools.tokenizer.train import train_sentencepiece

    root = tmp_path_factory.mktemp("device_agnostic")
    hf = build_tiny_llm("llama", root / "hf")
    nemo = {}
    for fmt, tp in (("legacy", 1), ("legacy", 2), ("dist", 1), ("dist", 2)):
        nemo[fmt, tp] = root / f"{fmt}_tp{tp}.nemo"
        convert_hf_to_nemo(str(hf), nemo[fmt, tp], tp=tp, fmt=fmt)
    tokenizer = train_sentencepiece(caption_corpus(), root / "tok.model", vocab_size=120, byte_fallback=False)
    return {"nemo": nemo, "siglip": _siglip_towers(root), "tokenizer": tokenizer, "root": root}


def _siglip_towers(root: Path) -> dict[str, Path]:
    """The tiny SigLIP of ``siglip_tiny`` as a Hugging Face directory and as an open_clip (timm) directory."""
    import json

    import open_clip

    hf_vision().save_pretrained(root / "hf_vision")
    torch.manual_seed(1)
    oc_dir = root / "open_clip"
    oc_dir.mkdir()
    (oc_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG}))
    torch.save(perturb(open_clip.model.CLIP(**OPEN_CLIP_CFG)).state_dict(), oc_dir / "open_clip_pytorch_model.bin")
    return {"hf_vision": root / "hf_vision", "open_clip": oc_dir}


@pytest.mark.parametrize(("fmt", "saved_tp"), [("legacy", 1), ("legacy", 2), ("dist", 1), ("dist", 2)])
def test_gpt_from_nemo(dist: None, assets: dict[str, Any], cpu_builders: None, fmt: str, saved_tp: int) -> None:
    """legacy TP 1: ``torch.load``; legacy TP 2 at TP 1: the lazy reader and the merge; dist TP 1: megatron-core's
    sharded load; dist TP 2 (other vocabulary padding): the full tensors of ``checkpoint.dist.load_full``."""
    from neva_tools.model.from_nemo import load_gpt_from_nemo

    path = assets["nemo"][fmt, saved_tp]
    reference = _state(load_gpt_from_nemo(path)[0])
    with meta_default():
        model = load_gpt_from_nemo(path)[0]
    _assert_same(_state(model), reference)


def test_nemo_readers_read_to_cpu(assets: dict[str, Any]) -> None:
    """The readers themselves hand out CPU tensors under a meta default device (legacy, lazy, dist, HF)."""
    from neva_tools.checkpoint.hf_reader import HFCheckpoint
    from neva_tools.checkpoint.nemo_archive import NemoArchive
    from neva_tools.checkpoint.nemo_tensors import NemoTensors, load_arch

    for key in (("legacy", 1), ("legacy", 2), ("dist", 2)):
        with NemoArchive(assets["nemo"][key]) as archive:
            _, arch = load_arch(archive)
            reference = dict(NemoTensors(archive, arch).items())
            with meta_default():
                tensors = NemoTensors(archive, arch)
                loaded = dict(tensors.items())
                part = tensors.part("model.embedding.word_embeddings.weight", 2, 1, 384)
        _assert_same(loaded, reference)
        assert part.device.type == "cpu"
    with meta_default(), HFCheckpoint(assets["root"] / "hf") as ckpt:
        assert all(ckpt.get(name).device.type == "cpu" for name in ckpt.names())


@pytest.mark.parametrize("source", ["hf_vision", "open_clip"])
def test_siglip_vision(dist: None, assets: dict[str, Any], cpu_builders: None, source: str) -> None:
    """SigLIP from Hugging Face safetensors and from open_clip (timm), read and loaded under a meta default."""
    from neva_tools.model.vision import load_clip_vision

    path = assets["siglip"][source]
    reference = _state(load_clip_vision(path)[0])
    with meta_default():
        model, _ = load_clip_vision(path)
    _assert_same(_state(model), reference)


def _vision(assets: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
    from neva_tools.model.vision import read_clip_vision, vision_state_to_mcore

    state, arch, kind = read_clip_vision(assets["siglip"]["hf_vision"])
    full = vision_state_to_mcore(state, arch, kind, select_layer=-2)
    assert all(t.device.type == "cpu" for t in full.values())
    return arch, full


def _neva(assets: dict[str, Any], projector_from: Path | None) -> Any:
    from neva_tools.model import neva_io

    llm = assets["nemo"]["legacy", 2]  # read lazily and merged at this TP (1)
    cfg, vocab = neva_io.llm_config(llm)
    arch, full = _vision(assets)
    return neva_io.build_neva(llm, cfg, vocab, arch, full, select_layer=-2, projector_type=PROJECTOR,
                              projector_from=projector_from)  # fmt: skip


@pytest.fixture(scope="module")
def stage1(dist: None, assets: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A stage-1 NeVA ``.nemo`` (projector and tokenizer, the LLM frozen) and the projector it holds."""
    from neva_tools.model import neva_io

    model = _neva(assets, None)  # random projector
    llm = assets["nemo"]["legacy", 1]
    cfg, _ = neva_io.llm_config(llm)
    config = {**cfg, "data": {"conv_template": "vicuna_v1"},
              "mm_cfg": {"mm_mlp_adapter_type": PROJECTOR, "llm": {"from_pretrained": str(llm)},
                         "vision_encoder": {"from_pretrained": str(assets["siglip"]["hf_vision"])}}}  # fmt: skip
    out = tmp_path_factory.mktemp("stage1") / "stage1.nemo"
    assert neva_io.save_neva_nemo(model, out, config, include_llm=False, projector_type=PROJECTOR,
                                  tokenizer=assets["tokenizer"]) == out  # fmt: skip
    return {"nemo": out, "projector": _state(model.vision_projection)}


def test_neva_stage1_fresh_projector(dist: None, assets: dict[str, Any], cpu_builders: None) -> None:
    """LLM (lazy TP 2 → 1) and SigLIP loaded under a meta default; the fresh projector is left as built."""
    reference = _state(_neva(assets, None))
    with meta_default():
        model = _neva(assets, None)
    _assert_same(_state(model), reference, unloaded="vision_projection.")


def test_neva_stage2_projector_from_stage1(dist: None, assets: dict[str, Any], stage1: dict[str, Any],
                                           cpu_builders: None) -> None:  # fmt: skip
    """Stage 2: the projector comes from the stage-1 ``.nemo`` (lazy reader, then a comparison on the CPU)."""
    reference = _state(_neva(assets, stage1["nemo"]))
    with meta_default():
        model = _neva(assets, stage1["nemo"])
    loaded = _state(model)
    _assert_same(loaded, reference)
    _assert_same(_state(model.vision_projection), stage1["projector"])


def test_inference_load_of_stage1(dist: None, assets: dict[str, Any], stage1: dict[str, Any],
                                  cpu_builders: None) -> None:  # fmt: skip
    """``load_neva``: config, LLM from ``mm_cfg.llm.from_pretrained``, vision, projector and tokenizer."""
    from neva_tools.inference.load import load_images, load_neva

    reference = _state(load_neva(stage1["nemo"]).model)
    with meta_default():
        loaded = load_neva(stage1["nemo"])
        images = load_images([], loaded.image_processor)
    _assert_same(_state(loaded.model), reference)
    _assert_same(_state(loaded.model.vision_projection), stage1["projector"])
    assert images.device.type == "cpu" and images.shape[0] == 0


def test_padded_vocab_mask_is_made_on_the_cpu(dist: None) -> None:
    """The mask of padded vocabulary columns is built on the CPU and moved to the logits' device when used."""
    from neva_tools.model.vocab_mask import mask_padded_vocab

    layer = torch.nn.Linear(4, 8, bias=False)
    layer.output_size_per_partition = 8
    layer.register_forward_hook(lambda m, i, o: (o, None))  # a ColumnParallelLinear returns (logits, bias)
    with meta_default():
        handle = mask_padded_vocab(layer, vocab_size=5)
    assert handle is not None
    logits, _ = layer(torch.ones(2, 4))
    assert torch.isfinite(logits[:, :5]).all() and (logits[:, 5:] == torch.finfo(logits.dtype).min).all()


def test_conversion_helpers_work_in_cpu_memory(tmp_path: Path) -> None:
    """The part tracer (``.numpy()`` of row numbers), the range writer's scratch buffer and the skeleton writer."""
    from neva_tools.checkpoint.fill import RangeWriter
    from neva_tools.checkpoint.nemo_archive import NemoArchive
    from neva_tools.checkpoint.nemo_writer import NemoWriter
    from neva_tools.checkpoint.parts import Stored, part_runs
    from neva_tools.checkpoint.tp import merge
    from neva_tools.mappings.base import Split

    stored = [Stored(("file", 0), (4, 3), torch.float32)] * 2
    column = torch.arange(12.0).view(3, 4).t()  # a non-contiguous tensor: written through the scratch buffer
    with meta_default():
        runs = part_runs(stored, lambda parts: merge(parts, Split.COLUMN, name="t"), Split.COLUMN, 2, 1, None)
        with NemoWriter(tmp_path / "skeleton.nemo") as writer:
            writer.add_yaml("model_config.yaml", {"num_layers": 1})
            offsets = writer.add_torch_skeleton("model_weights.ckpt", {"t": ((4, 3), torch.float32)})
            with RangeWriter(writer.fileno()) as fill:
                fill.write(column, offsets["t"])
    assert runs == [(1, 0, 4)]
    with NemoArchive(tmp_path / "skeleton.nemo") as archive:
        assert torch.equal(archive.load_legacy()["t"], column)
