"""What ``hf-to-nemo`` writes: config, TP shards with vocabulary padding, tokenizer artifacts, CLI summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neva_tools.checkpoint.nemo_archive import NemoArchive
from neva_tools.cli.main import main
from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
from neva_tools.convert.nemo_to_hf import convert_nemo_to_hf
from neva_tools.mappings import transforms


def test_config_and_tp2_shards(llama_hf: Path, tmp_path: Path) -> None:
    nemo = tmp_path / "m.nemo"
    convert_hf_to_nemo(str(llama_hf), nemo, tp=2)
    hf = load_file(str(llama_hf / "model.safetensors"))
    with NemoArchive(nemo) as archive:
        cfg = archive.read_config()
        r0, r1 = archive.load_legacy(0), archive.load_legacy(1)
        assert cfg["tokenizer"]["library"] == "sentencepiece"
        assert cfg["tokenizer"]["model"].startswith("nemo:") and cfg["tokenizer"]["model"].endswith("_tokenizer.model")
        sp = archive.artifact(cfg["tokenizer"]["model"], tmp_path / "x")
        assert sp.read_bytes() == (llama_hf / "tokenizer.model").read_bytes()
    expected = {"mcore_gpt": True, "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96,
                "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 16, "normalization": "rmsnorm",
                "activation": "fast-swiglu", "bias": False, "share_embeddings_and_output_weights": False,
                "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
                "make_vocab_size_divisible_by": 128, "vocab_size": 300, "precision": 32}  # fmt: skip
    assert {k: cfg[k] for k in expected} == expected
    # vocabulary padded to a multiple of 128 x 2 with zero rows, then split
    emb = torch.cat([r0["model.embedding.word_embeddings.weight"], r1["model.embedding.word_embeddings.weight"]])
    assert emb.shape == (512, 64)
    assert torch.equal(emb[:300], hf["model.embed_tokens.weight"]) and not emb[300:].any()
    # QKV by whole KV groups: rank 1 holds group 1 (q heads 2-3, k_1, v_1)
    q, k, v = (hf[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    expected_r1 = torch.cat([q[32:64], k[16:32], v[16:32]])
    assert torch.equal(r1["model.decoder.layers.0.self_attention.linear_qkv.weight"], expected_r1)
    # gate/up split separately: rank 0 holds [gate_0; up_0]
    gate, up = hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]
    fc1 = r0["model.decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([gate[:48], up[:48]]))
    assert torch.equal(transforms.fuse_gated(gate, up)[:48], gate[:48])
    # row-parallel on dim 1, norms replicated
    o = hf["model.layers.0.self_attn.o_proj.weight"]
    assert torch.equal(r1["model.decoder.layers.0.self_attention.linear_proj.weight"], o[:, 32:])
    name = "model.decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    assert torch.equal(r0[name], r1[name])


def test_hf_tokenizer_files_round_trip(llama_hf: Path, hf_tokenizer_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "hf"
    model.mkdir()
    for item in llama_hf.iterdir():
        if item.name != "tokenizer.model":
            (model / item.name).write_bytes(item.read_bytes())
    for item in hf_tokenizer_dir.iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    nemo = tmp_path / "m.nemo"
    convert_hf_to_nemo(str(model), nemo)
    with NemoArchive(nemo) as archive:
        section = archive.read_config()["tokenizer"]
    assert section["library"] == "huggingface" and section["type"] == section["hf_files"]
    back = tmp_path / "back"
    convert_nemo_to_hf(nemo, back)
    for item in hf_tokenizer_dir.iterdir():
        assert (back / item.name).read_bytes() == item.read_bytes(), item.name
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(back)).encode("a red circle") == AutoTokenizer.from_pretrained(
        str(hf_tokenizer_dir)
    ).encode("a red circle")


def test_cli_json_summary_and_dtype(llama_hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nemo = tmp_path / "m.nemo"
    argv = ["convert", "hf-to-nemo", "--input", str(llama_hf), "--output", str(nemo), "--dtype", "bf16", "--json"]
    assert main([*argv, "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["parameters"] == sum(t.numel() for t in load_file(str(llama_hf / "model.safetensors")).values())
    assert summary["bytes_written"] == nemo.stat().st_size and summary["peak_rss"] > 0
    with NemoArchive(nemo) as archive:
        assert archive.read_config()["precision"] == "bf16"
        assert {t.dtype for t in archive.load_legacy().values()} == {torch.bfloat16}
    assert main([*argv, "--no-progress"]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    back = tmp_path / "back"
    assert main(["convert", "nemo-to-hf", "--input", str(nemo), "--output", str(back), "--no-progress"]) == 0
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"


def _rank_states(nemo: Path) -> list[dict[str, torch.Tensor]]:
    with NemoArchive(nemo) as archive:
        return [archive.load_legacy(rank) for rank in range(archive.legacy_ranks()[0])]


def _assert_same_states(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for sa, sb in zip(a, b, strict=True):
        assert list(sa) == list(sb)  # same keys in the same order
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("tp", [1, 2])
def test_file_copies_equal_parts_built_in_memory(
    tiny_llm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tp: int
) -> None:
    """Parts copied file to file (the fast path) are the tensors the split rules build in memory."""
    from neva_tools.convert import legacy_writer

    copied = tmp_path / "copied.nemo"
    convert_hf_to_nemo(str(tiny_llm), copied, tp=tp)
    calls = []
    monkeypatch.setattr(legacy_writer, "copyable", lambda *args: calls.append(args) and False)
    built = tmp_path / "built.nemo"
    convert_hf_to_nemo(str(tiny_llm), built, tp=tp)
    assert calls  # the in-memory path really ran
    _assert_same_states(_rank_states(copied), _rank_states(built))


def test_dtype_conversion_matches_torch(llama_hf: Path, tmp_path: Path) -> None:
    fp32, bf16 = tmp_path / "fp32.nemo", tmp_path / "bf16.nemo"
    convert_hf_to_nemo(str(llama_hf), fp32, tp=2)
    convert_hf_to_nemo(str(llama_hf), bf16, tp=2, dtype="bf16")
    want = [{k: v.to(torch.bfloat16) for k, v in state.items()} for state in _rank_states(fp32)]
    _assert_same_states(_rank_states(bf16), want)
