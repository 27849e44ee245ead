"""Repartitioning: split → merge bit-exact across TP/PP and layouts, NeMo legacy files, NeVA extras, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import build_tiny_llm, megatron_logits
from safetensors.torch import load_file

from neva_tools.checkpoint.nemo_archive import NemoArchive, artifact_name
from neva_tools.checkpoint.nemo_tensors import NemoTensors, load_arch
from neva_tools.checkpoint.nemo_writer import NemoWriter
from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
from neva_tools.convert.repartition import repartition
from neva_tools.errors import NevaError
from neva_tools.mappings.nemo_legacy import mcore_to_legacy
from neva_tools.tokenizer.train import train_sentencepiece

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def full_tensors(path: Path) -> dict[str, torch.Tensor]:
    with NemoArchive(path) as archive:
        _, arch = load_arch(archive)
        return dict(NemoTensors(archive, arch).items())


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = full_tensors(a), full_tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


@pytest.fixture(scope="module", params=["gqa", "mha"])
def model_tp1(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    """A TP=1 .nemo whose heads and KV groups all divide by 4 (GQA: 8 heads / 4 groups; MHA: 4 / 4)."""
    tmp = tmp_path_factory.mktemp(request.param)
    heads, kv = (8, 4) if request.param == "gqa" else (4, 4)
    hf = build_tiny_llm("llama", tmp / "hf", sp_model=sp_model, heads=heads, kv_heads=kv)
    nemo = tmp / "tp1.nemo"
    convert_hf_to_nemo(str(hf), nemo)
    return nemo


@pytest.mark.parametrize(
    "chain",
    [
        [(2, "legacy"), (4, "legacy"), (1, "legacy")],
        [(4, "legacy"), (2, "legacy")],
        [(2, "dist"), (4, "legacy"), (1, "dist"), (1, "legacy")],
    ],
    ids=["1-2-4-1", "1-4-2", "1-2dist-4-1dist-1"],
)
def test_split_merge_bit_exact(model_tp1: Path, tmp_path: Path, chain: list[tuple[int, str]]) -> None:
    current = model_tp1
    for i, (tp, fmt) in enumerate(chain):
        out = tmp_path / f"step{i}.nemo"
        repartition(current, out, tp=tp, fmt=fmt)
        with NemoArchive(out) as archive:
            assert archive.layout == fmt
            cfg = archive.read_config()
            assert cfg["tensor_model_parallel_size"] == tp and cfg["vocab_size"] == 300
            if fmt == "legacy":
                assert archive.legacy_ranks() == (tp, 1)
                emb = archive.load_legacy(tp - 1)["model.embedding.word_embeddings.weight"]
                assert emb.shape[0] * tp == -(-300 // (128 * tp)) * 128 * tp
        assert_same_tensors(model_tp1, out)
        current = out
    if chain[-1] == (1, "legacy"):  # back where we started: the same stored state dict, byte for byte
        with NemoArchive(model_tp1) as a, NemoArchive(current) as b:
            sa, sb = a.load_legacy(), b.load_legacy()
        assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pipeline_parallel_round_trip(model_tp1: Path, tmp_path: Path) -> None:
    pp = tmp_path / "tp2pp2.nemo"
    repartition(model_tp1, pp, tp=2, pp=2)
    with NemoArchive(pp) as archive:
        assert archive.legacy_ranks() == (2, 2)
        last = archive.load_legacy(1, 1)
        first = archive.load_legacy(0, 0)
    assert "model.decoder.layers.0.mlp.linear_fc2.weight" in last  # stage-local numbering
    assert "model.output_layer.weight" in last and "model.embedding.word_embeddings.weight" in first
    assert "model.decoder.final_layernorm.weight" not in first
    back = tmp_path / "back.nemo"
    repartition(pp, back, tp=1, pp=1)
    assert_same_tensors(model_tp1, back)


def test_tp2_model_from_repartitioned_file_matches_tp1(llama_hf: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
    from dist_helpers import run_distributed

    tp1 = tmp_path / "tp1.nemo"
    convert_hf_to_nemo(str(llama_hf), tp1)
    tp2 = tmp_path / "tp2.nemo"
    repartition(tp1, tp2, tp=2)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(5))
    ref = run_distributed(megatron_logits, 1, str(tp1), ids)[0]
    rank0, rank1 = run_distributed(megatron_logits, 2, str(tp2), ids)
    assert torch.equal(rank0, rank1)
    assert (rank0 - ref).abs().max().item() <= 1e-5


@pytest.fixture
def nemo_legacy_file(tmp_path: Path, corpus: list[str]) -> tuple[Path, Path]:
    """A NeMo-written-style legacy file: ``model.language_model.*`` names, per-head QKV built by hand,
    ``mcore_gpt: False``, no ``vocab_size`` (NeMo derives it from the tokenizer), TP=1."""
    sp = train_sentencepiece(corpus, tmp_path / "tok300.model", vocab_size=300)
    hf = build_tiny_llm("mistral", tmp_path / "hf", sp_model=sp)  # multi-head attention: 4 heads, 4 KV heads
    weights = load_file(str(hf / "model.safetensors"))
    d, heads = 16, 4
    state = {"model.language_model.embedding.word_embeddings.weight": weights["model.embed_tokens.weight"]}
    for i in range(2):
        h, p = f"model.layers.{i}.", f"model.language_model.encoder.layers.{i}."
        q, k, v = (weights[f"{h}self_attn.{n}_proj.weight"] for n in "qkv")
        per_head = [
            torch.cat([q[j * d : (j + 1) * d], k[j * d : (j + 1) * d], v[j * d : (j + 1) * d]]) for j in range(heads)
        ]
        state.update({
            p + "input_layernorm.weight": weights[h + "input_layernorm.weight"],
            p + "self_attention.query_key_value.weight": torch.cat(per_head),
            p + "self_attention.dense.weight": weights[h + "self_attn.o_proj.weight"],
            p + "post_attention_layernorm.weight": weights[h + "post_attention_layernorm.weight"],
            p + "mlp.dense_h_to_4h.weight": torch.cat([weights[h + "mlp.gate_proj.weight"],
                                                       weights[h + "mlp.up_proj.weight"]]),
            p + "mlp.dense_4h_to_h.weight": weights[h + "mlp.down_proj.weight"],
        })  # fmt: skip
    state["model.language_model.encoder.final_layernorm.weight"] = weights["model.norm.weight"]
    state["model.language_model.output_layer.weight"] = weights["lm_head.weight"]
    state["model.language_model.rotary_pos_emb.inv_freq"] = torch.ones(8)
    state = {k: torch.cat([v, v.new_zeros(84, v.shape[1])]) if "word_emb" in k or "output_layer" in k else v
             for k, v in state.items()}  # NeMo stores the vocabulary padded (300 → 384)  # fmt: skip
    tok = artifact_name("tokenizer.model")
    cfg = {
        "mcore_gpt": False, "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4,
        "num_query_groups": None, "kv_channels": None, "encoder_seq_length": 128, "max_position_embeddings": 128,
        "position_embedding_type": "rope", "normalization": "rmsnorm", "layernorm_epsilon": 1e-5,
        "activation": "fast-swiglu", "bias": False, "share_embeddings_and_output_weights": False,
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "make_vocab_size_divisible_by": 128,
        "precision": 32, "tokenizer": {"library": "sentencepiece", "model": f"nemo:{tok}"},
    }  # fmt: skip
    path = tmp_path / "nemo_legacy.nemo"
    with NemoWriter(path) as writer:
        writer.add_file(tok, sp)
        writer.add_yaml("model_config.yaml", cfg)
        writer.add_torch("model_weights.ckpt", state)
    return path, hf


def test_nemo_legacy_file_repartitions(nemo_legacy_file: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    legacy, hf = nemo_legacy_file
    kept = tmp_path / "legacy_tp2.nemo"
    repartition(legacy, kept, tp=2)
    with NemoArchive(kept) as archive:
        names = set(archive.load_legacy(1))
        assert archive.read_config()["mcore_gpt"] is False
    assert "model.language_model.encoder.layers.1.self_attention.query_key_value.weight" in names
    assert not any(n.startswith("model.decoder.") for n in names)
    renamed = tmp_path / "mcore_tp2.nemo"
    repartition(legacy, renamed, tp=2, to_mcore_names=True)
    with NemoArchive(renamed) as archive:
        assert archive.read_config()["mcore_gpt"] is True
        assert "model.decoder.layers.1.self_attention.linear_qkv.weight" in archive.load_legacy(0)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(hf)).eval()(ids).logits
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
    from dist_helpers import run_distributed

    ours = run_distributed(megatron_logits, 2, str(renamed), ids)[0]
    assert (ours - ref).abs().max().item() <= 1e-4
    assert all(mcore_to_legacy(n) in names for n in full_tensors(renamed))


def test_neva_extras_are_replicated_bit_exact(llama_hf: Path, tmp_path: Path) -> None:
    base = tmp_path / "llm.nemo"
    convert_hf_to_nemo(str(llama_hf), base)
    with NemoArchive(base) as archive:
        cfg, state = archive.read_config(), archive.load_legacy()
    projector = "model.embedding.word_embeddings.adapter_layer.mm_projector_adapter.mm_projector."
    extras = {projector + "0.weight": torch.randn(64, 32), projector + "0.bias": torch.randn(64),
              projector + "2.weight": torch.randn(64, 64), projector + "2.bias": torch.randn(64)}  # fmt: skip
    neva = tmp_path / "neva.nemo"
    with NemoWriter(neva) as writer:
        writer.add_yaml("model_config.yaml", cfg)
        writer.add_torch("model_weights.ckpt", {**state, **extras})
    out = tmp_path / "neva_tp2.nemo"
    repartition(neva, out, tp=2)
    with NemoArchive(out) as archive:
        for rank in range(2):
            shard = archive.load_legacy(rank)
            assert all(torch.equal(shard[k], v) for k, v in extras.items())
    back = tmp_path / "neva_tp1.nemo"
    repartition(out, back, tp=1)
    assert_same_tensors(neva, back)


def _rewrite(src: Path, dst: Path, edit) -> None:
    with NemoArchive(src) as archive:
        cfg = archive.read_config()
        tp, _ = archive.legacy_ranks()
        shards = [archive.load_legacy(t) for t in range(tp)]
    edit(shards)
    with NemoWriter(dst) as writer:
        writer.add_yaml("model_config.yaml", cfg)
        for t, shard in enumerate(shards):
            if shard is not None:
                writer.add_torch(f"mp_rank_{t:02d}/model_weights.ckpt", shard)


def test_errors(llama_hf: Path, tmp_path: Path) -> None:
    tp2 = tmp_path / "tp2.nemo"
    convert_hf_to_nemo(str(llama_hf), tp2, tp=2)
    norm = "model.decoder.layers.1.mlp.linear_fc1.layer_norm_weight"
    mismatch = tmp_path / "mismatch.nemo"
    _rewrite(tp2, mismatch, lambda shards: shards[1][norm].add_(1.0))
    with pytest.raises(NevaError, match=rf"replicated tensor {norm} differs between TP rank 0 and TP rank 1"):
        repartition(mismatch, tmp_path / "a.nemo", tp=1)
    missing = tmp_path / "missing.nemo"

    def gap_at_rank1(shards: list) -> None:  # writes mp_rank_00 and mp_rank_02 only
        shards[1] = None
        shards.append({})

    _rewrite(tp2, missing, gap_at_rank1)
    with pytest.raises(NevaError, match="missing the weights of TP rank 1"):
        repartition(missing, tmp_path / "b.nemo", tp=1)
    with pytest.raises(NevaError, match=r"tensor_model_parallel_size \(4\) must divide num_query_groups \(2\)"):
        repartition(tp2, tmp_path / "c.nemo", tp=4)
    with pytest.raises(NevaError, match=r"pipeline_model_parallel_size \(3\) must divide num_layers \(2\)"):
        repartition(tp2, tmp_path / "c.nemo", tp=1, pp=3)
    corrupt = tmp_path / "corrupt.nemo"
    corrupt.write_bytes(tp2.read_bytes()[:5000])
    with pytest.raises(NevaError, match=r"corrupt\.nemo"):
        repartition(corrupt, tmp_path / "d.nemo", tp=1)
    assert not any((tmp_path / n).exists() for n in ("a.nemo", "b.nemo", "c.nemo", "d.nemo"))


def test_megatron_change_num_partitions_dropin(llama_hf: Path, tmp_path: Path, corpus: list[str]) -> None:
    tp1 = tmp_path / "tp1.nemo"
    convert_hf_to_nemo(str(llama_hf), tp1)
    out = tmp_path / "tp2.nemo"
    tok = train_sentencepiece(corpus, tmp_path / "other.model", vocab_size=300)
    args = ["--model_file", str(tp1), "--target_file", str(out), "--tensor_model_parallel_size", "1",
            "--target_tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "1",
            "--target_pipeline_model_parallel_size", "1", "--tp_conversion_only",
            "--model_class", "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
            "--tokenizer_model_path", str(tok), "--precision", "bf16"]  # fmt: skip
    proc = subprocess.run([sys.executable, str(SCRIPTS / "megatron_change_num_partitions.py"), *args],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "ignoring NeMo options this tool does not need: --precision bf16" in proc.stderr
    with NemoArchive(out) as archive:
        assert archive.legacy_ranks() == (2, 1)
        ref = archive.read_config()["tokenizer"]["model"]
        assert archive.artifact(ref, tmp_path / "x").read_bytes() == tok.read_bytes()
        assert len([n for n in archive.names if n.endswith("_tokenizer.model")]) == 1
    assert_same_tensors(tp1, out)
    wrong = subprocess.run([sys.executable, str(SCRIPTS / "megatron_change_num_partitions.py"), "--model_file",
                            str(tp1), "--target_file", str(tmp_path / "w.nemo"), "--tensor_model_parallel_size", "2",
                            "--target_tensor_model_parallel_size", "1"], capture_output=True, text=True)  # fmt: skip
    assert wrong.returncode == 2 and "--tensor_model_parallel_size is 2 but" in wrong.stderr


def test_sources_without_file_offsets_give_the_same_file(model_tp1: Path, tmp_path: Path) -> None:
    """An extracted directory is copied from by offset too; a gzip-compressed .nemo is read through memory."""
    import tarfile

    tp2 = tmp_path / "tp2.nemo"
    repartition(model_tp1, tp2, tp=2)
    folder, gz = tmp_path / "extracted", tmp_path / "tp2.nemo.tgz"
    with tarfile.open(tp2) as tar:
        tar.extractall(folder, filter="data")
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(folder, arcname=".")
    for source, located in ((folder, True), (gz, False)):
        with NemoArchive(source) as archive:
            _, arch = load_arch(archive)
            stored = NemoTensors(archive, arch).stored("model.output_layer.weight")
            assert len(stored) == 2 and all((s.where is not None) is located for s in stored)
    outs = [tmp_path / f"tp4_{i}.nemo" for i in range(3)]
    for source, out in zip((tp2, folder, gz), outs, strict=True):
        repartition(source, out, tp=4)
        with NemoArchive(out) as archive, NemoArchive(outs[0]) as ref:
            for rank in range(4):
                got, want = archive.load_legacy(rank), ref.load_legacy(rank)
                assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert_same_tensors(model_tp1, outs[0])
