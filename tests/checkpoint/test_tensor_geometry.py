"""Every stored tensor checked against the config before anything is written: shapes (per TP rank and merged),
dtypes, storage geometry (no stride-0 or overlapping views), layer counts; for .nemo (legacy and dist) and HF input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from builders import build_tiny_llm
from safetensors.torch import load_file

from neva_tools.checkpoint.nemo_archive import NemoArchive, weights_member
from neva_tools.checkpoint.nemo_writer import NemoWriter
from neva_tools.checkpoint.torch_lazy import StorageRef, TensorRef
from neva_tools.cli.main import main
from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
from neva_tools.convert.repartition import repartition
from neva_tools.errors import NevaError

EMB = "model.embedding.word_embeddings.weight"
QKV = "model.decoder.layers.0.self_attention.linear_qkv.weight"
FC2 = "model.decoder.layers.1.mlp.linear_fc2.weight"
NORM = "model.decoder.final_layernorm.weight"
PROJECTOR = "model.embedding.word_embeddings.adapter_layer.mm_projector_adapter.mm_projector."


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA: hidden 128, 2 layers, 4 heads, 2 KV groups (head dim 32), vocabulary 300, untied."""
    return build_tiny_llm("llama", tmp_path_factory.mktemp("geom") / "hf", hidden=128)


@pytest.fixture(scope="module")
def tp1(hf_dir: Path) -> Path:
    out = hf_dir.parent / "tp1.nemo"
    convert_hf_to_nemo(str(hf_dir), out)
    return out


@pytest.fixture(scope="module")
def tp2(hf_dir: Path) -> Path:
    out = hf_dir.parent / "tp2.nemo"
    convert_hf_to_nemo(str(hf_dir), out, tp=2)
    return out


def rewrite(src: Path, dst: Path, state: Callable[[list[dict]], None] | None = None,
            config: Callable[[dict], None] | None = None) -> Path:  # fmt: skip
    """``src`` with its rank files' state dicts and/or its config edited in place by the callbacks."""
    with NemoArchive(src) as archive:
        cfg = archive.read_config()
        tp, _ = archive.legacy_ranks()
        shards = [archive.load_legacy(t) for t in range(tp)]
    if state is not None:
        state(shards)
    if config is not None:
        config(cfg)
    with NemoWriter(dst) as writer:
        writer.add_yaml("model_config.yaml", cfg)
        for t, shard in enumerate(shards):
            writer.add_torch(weights_member(t, tp), shard)
    return dst


def refused(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *wanted: str) -> None:
    """``neva repartition`` and ``neva convert nemo-to-hf`` both exit 2 naming ``wanted`` and write nothing."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    commands = (
        ["repartition", "--input", str(source), "--output", str(out / "re.nemo"), "--tp", "1"],
        ["convert", "nemo-to-hf", "--input", str(source), "--output", str(out / "hf")],
    )
    for argv in commands:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err
        for text in wanted:
            assert text in err, (argv, err)
        assert os.listdir(out) == [], argv  # neither the output nor a temporary file


def test_config_wider_than_the_tensors(tp1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's case: model_config.yaml says hidden 256, the tensors are 128 wide."""
    bad = rewrite(tp1, tmp_path / "wide.nemo", config=lambda cfg: cfg.update(hidden_size=256))
    refused(bad, tmp_path, capsys, "do not fit model_config.yaml (num_layers 2, hidden_size 256,",
            f"{EMB} has shape [384, 128], expected [300 to 384, 256]",
            f"{QKV} has shape [256, 128], expected [256, 256]", "fix model_config.yaml")  # fmt: skip


def test_seven_element_embedding(tp1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = rewrite(tp1, tmp_path / "seven.nemo", state=lambda s: s[0].update({EMB: torch.randn(7)}))
    refused(bad, tmp_path, capsys, f"{EMB} has shape [7], expected [300 to 384, 128]")


def test_vocabulary_rows_beyond_the_padding(tp1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = rewrite(tp1, tmp_path / "rows.nemo", state=lambda s: s[0].update({EMB: torch.randn(1000, 128)}))
    refused(bad, tmp_path, capsys, f"{EMB} has shape [1000, 128], expected [300 to 384, 128]", "vocab_size 300")


def test_integer_weights(tp1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = rewrite(tp1, tmp_path / "int.nemo", state=lambda s: s[0].update({NORM: s[0][NORM].long()}))
    refused(bad, tmp_path, capsys, f"{NORM} on TP rank 0 has dtype torch.int64, not a floating-point dtype")


def test_ranks_disagree_on_dtype_and_shape(tp2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def edit(shards: list[dict]) -> None:
        shards[1][FC2] = shards[1][FC2].to(torch.bfloat16)
        shards[1][QKV] = torch.cat([shards[1][QKV], torch.zeros(2, 128)])

    bad = rewrite(tp2, tmp_path / "ranks.nemo", state=edit)
    refused(bad, tmp_path, capsys, "2 TP rank(s) in the file",
            f"{QKV} has shape [128, 128] on TP rank 0 but [130, 128] on TP rank 1",
            f"{FC2} is torch.float32 on TP rank 0 but torch.bfloat16 on TP rank 1")  # fmt: skip


def test_merged_shape_names_the_shards(tp2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = rewrite(tp2, tmp_path / "narrow.nemo", config=lambda cfg: cfg.update(ffn_hidden_size=96))
    refused(bad, tmp_path, capsys, f"{FC2} has shape [128, 192] (2 TP shards of [128, 96]), expected [128, 96]")


def test_expanded_view_of_the_right_shape(tp1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 1-element storage viewed as the embedding's own shape passes every shape check: only geometry catches it."""
    bad = rewrite(tp1, tmp_path / "expanded.nemo", state=lambda s: s[0].update({EMB: torch.ones(1).expand(384, 128)}))
    refused(bad, tmp_path, capsys, f"{EMB} on TP rank 0", "stride-0 (expanded) view of shape [384, 128]", "re-save the")


def test_transposed_view(tp1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = "model.decoder.layers.0.self_attention.linear_proj.weight"
    bad = rewrite(tp1, tmp_path / "t.nemo", state=lambda s: s[0].update({name: s[0][name].t().contiguous().t()}))
    refused(bad, tmp_path, capsys, f"{name} on TP rank 0", "strides [1, 128] are not the contiguous [128, 1]")


def test_views_into_one_shared_buffer_are_fine(tp1: Path, tmp_path: Path) -> None:
    """Parameters saved as views of one flat buffer (megatron's contiguous parameter buffers) are stored weights."""
    norms: dict[str, torch.Tensor] = {}

    def edit(shards: list[dict]) -> None:
        names = [n for n in shards[0] if n.endswith(("layer_norm_weight", "final_layernorm.weight"))]
        buffer = torch.cat([shards[0][n] for n in names])
        for i, n in enumerate(names):
            shards[0][n] = buffer[i * 128 : (i + 1) * 128]
            norms[n] = shards[0][n].clone()

    shared = rewrite(tp1, tmp_path / "shared.nemo", state=edit)
    assert main(["repartition", "--input", str(shared), "--output", str(tmp_path / "tp2.nemo"), "--tp", "2"]) == 0
    with NemoArchive(tmp_path / "tp2.nemo") as archive:
        state = archive.load_legacy(1)
    assert len(norms) == 5 and all(torch.equal(state[n], t) for n, t in norms.items())


def test_num_layers_far_beyond_the_file_is_refused_at_once(tp1: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    bad = rewrite(tp1, tmp_path / "layers.nemo", config=lambda cfg: cfg.update(num_layers=10**9))
    start = time.perf_counter()
    refused(bad, tmp_path, capsys, "says num_layers 1000000000 but the weights hold layers 0 to 1")
    assert time.perf_counter() - start < 30


def test_projector_shapes_follow_the_llm(tp1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extras = {PROJECTOR + "0.weight": torch.randn(128, 32), PROJECTOR + "0.bias": torch.randn(128),
              PROJECTOR + "2.weight": torch.randn(64, 64), PROJECTOR + "2.bias": torch.randn(128)}  # fmt: skip
    bad = rewrite(tp1, tmp_path / "neva.nemo", state=lambda s: s[0].update(extras))
    with pytest.raises(NevaError, match=r"mm_projector\.2\.weight has shape \[64, 64\], expected \[128, 128\]"):
        repartition(bad, tmp_path / "x.nemo", tp=2)


def _extracted(source: Path, folder: Path, config: Callable[[dict], None]) -> Path:
    with tarfile.open(source) as tar:
        tar.extractall(folder, filter="data")
    cfg_path = folder / "model_config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    config(cfg)
    cfg_path.write_text(yaml.safe_dump(cfg))
    return folder


def test_dist_checkpoint_is_checked_from_its_metadata(tp1: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    dist = tmp_path / "dist.nemo"
    repartition(tp1, dist, tp=1, fmt="dist")
    wide = _extracted(dist, tmp_path / "wide", lambda cfg: cfg.update(hidden_size=256))
    refused(
        wide, tmp_path, capsys, "1 TP rank(s) in the file", f"{EMB} has shape [384, 128], expected [300 to 384, 256]"
    )
    deep = _extracted(dist, tmp_path / "deep", lambda cfg: cfg.update(num_layers=3))
    refused(deep, tmp_path, capsys, "says num_layers 3 but model_weights/ stores model.decoder.layers.")


def test_geometry_rules() -> None:
    def ref(numel: int, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> TensorRef:
        return TensorRef(StorageRef("0", torch.float32, numel), torch.float32, offset, size, stride)

    assert ref(12, 0, (3, 4), (4, 1)).geometry_problem(48) is None
    assert ref(100, 40, (3, 4), (4, 1)).geometry_problem(400) is None  # a view into a larger buffer
    assert ref(12, 0, (1, 12), (99, 1)).geometry_problem(48) is None  # size-1 dims may have any stride
    assert ref(0, 0, (0, 4), (4, 1)).geometry_problem(0) is None
    assert "holds 40 bytes but the storage needs 48" in ref(12, 0, (3, 4), (4, 1)).geometry_problem(40)
    assert "is missing" in ref(12, 0, (3, 4), (4, 1)).geometry_problem(None)
    assert "stride-0" in ref(1, 0, (20000, 20000), (0, 0)).geometry_problem(4)
    assert "has 16 elements but its storage holds only 9" in ref(9, 0, (4, 4), (1, 1)).geometry_problem(36)
    assert "reaches past the end" in ref(12, 4, (3, 4), (4, 1)).geometry_problem(48)
    assert "are not the contiguous [3, 1]" in ref(9, 0, (3, 3), (1, 1)).geometry_problem(36)
    assert ref(9, 0, (3, 3), (1, 3)).geometry_problem(36, contiguous=False) is None


def test_huge_stride_zero_embedding_is_refused_fast_in_little_memory(tp1: Path, tmp_path: Path) -> None:
    """The issue's 1.6 MB file viewing a 1-element storage as 20000×20000 (1.6 GB as float32): refused from the
    pickle before any data is read; the child's peak memory stays far below the tensor's size."""
    bad = rewrite(tp1, tmp_path / "bomb.nemo", state=lambda s: s[0].update({EMB: torch.zeros(1).expand(20000, 20000)}))
    assert bad.stat().st_size < 2_000_000
    out = tmp_path / "out.nemo"
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "neva_tools", "--no-progress", "repartition", "--input", str(bad),
                              "--output", str(out), "--tp", "2"], stderr=subprocess.PIPE, text=True)  # fmt: skip
    err = child.stderr.read() if child.stderr else ""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    assert child.returncode == 2, err
    assert "stride-0 (expanded) view of shape [20000, 20000]" in err and "Traceback" not in err
    # KiB on Linux; reading the tensor would add 1.49 GiB to the ~0.6-1.3 GiB a neva process starts with
    assert usage.ru_maxrss * 1024 < 2.0 * 2**30, usage.ru_maxrss
    assert seconds < 60 and not out.exists()


# -- Hugging Face input -----------------------------------------------------------------------------------------


def _to_bin(hf: Path, edit: Callable[[dict], None]) -> Path:
    """``hf`` with its safetensors weights re-saved as ``pytorch_model.bin`` after ``edit``."""
    state = load_file(str(hf / "model.safetensors"))
    edit(state)
    (hf / "model.safetensors").unlink()
    torch.save(state, hf / "pytorch_model.bin")
    return hf


def test_hf_bin_with_an_expanded_tensor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = build_tiny_llm("llama", tmp_path / "hf")
    _to_bin(hf, lambda s: s.update({"model.norm.weight": torch.ones(1).expand(64)}))
    assert main(["convert", "hf-to-nemo", "--input", str(hf), "--output", str(tmp_path / "o.nemo")]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin: tensor model.norm.weight of shape [64] is a view with strides [0]" in err
    assert not (tmp_path / "o.nemo").exists()


def test_hf_integer_weights_and_layer_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = build_tiny_llm("llama", tmp_path / "hf")
    _to_bin(hf, lambda s: s.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    argv = ["convert", "hf-to-nemo", "--input", str(hf), "--output", str(tmp_path / "o.nemo")]
    assert main(argv) == 2
    assert "model.norm.weight is stored as torch.int32" in capsys.readouterr().err
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**9}))
    start = time.perf_counter()
    assert main(argv) == 2
    assert "says num_hidden_layers 1000000000 but the weights hold layers 0 to 1" in capsys.readouterr().err
    assert time.perf_counter() - start < 30 and not (tmp_path / "o.nemo").exists()


def test_hf_safetensors_header_larger_than_its_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A safetensors header may not claim a 20000×20000 tensor over 4 bytes (the library checks; we name the file)."""
    hf = build_tiny_llm("llama", tmp_path / "hf")
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [20000, 20000], "data_offsets": [0, 4]}})
    path = hf / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + bytes(4))
    assert main(["convert", "hf-to-nemo", "--input", str(hf), "--output", str(tmp_path / "o.nemo")]) == 2
    assert f"{path} is not a readable safetensors file" in capsys.readouterr().err
