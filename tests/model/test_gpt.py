"""GPTModel from NeMo model keys: builds and runs on CPU, maps the config, and rejects bad configs early."""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from neva_tools.errors import NevaError
from neva_tools.model.cpu_compat import model_parallel_seed
from neva_tools.model.gpt import build_gpt_model, gather_logits, gpt_model_kwargs, transformer_config_from_nemo
from neva_tools.model.parallel import LaunchEnv, init_distributed, launch_env

sys.path.insert(0, str(Path(__file__).parent))
from neva_tiny import TINY_GPT

VOCAB = 256
TINY: dict[str, Any] = {
    **TINY_GPT,
    "apply_query_key_layer_scaling": True,
    "persist_layer_norm": True,
    "masked_softmax_fusion": True,
    "bias_activation_fusion": True,
    "bias_dropout_add_fusion": True,
}


def _inputs(batch: int = 2, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    return tokens, torch.arange(seq).expand(batch, -1)


def test_tiny_gpt_forward_and_backward(dist: None) -> None:
    model = build_gpt_model(TINY, padded_vocab_size=VOCAB)
    tokens, positions = _inputs()
    logits = model(tokens, positions, None)
    assert logits.shape == (2, 16, VOCAB)
    assert torch.equal(gather_logits(logits), logits)  # TP=1: already the full vocabulary
    loss = model(tokens, positions, None, labels=tokens.roll(-1, dims=1))
    assert loss.shape == (2, 16)
    loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    expected = F.cross_entropy(
        logits.detach().reshape(-1, VOCAB), tokens.roll(-1, dims=1).reshape(-1), reduction="none"
    )
    assert torch.allclose(loss.detach().reshape(-1), expected, atol=1e-5)


def test_dropout_runs_under_the_rng_tracker(dist: None) -> None:
    model = build_gpt_model({**TINY, "hidden_dropout": 0.3, "attention_dropout": 0.3}, padded_vocab_size=VOCAB)
    tokens, positions = _inputs()
    model.train()
    model_parallel_seed(7)
    first = model(tokens, positions, None)
    model_parallel_seed(7)
    assert torch.equal(model(tokens, positions, None), first)
    model.eval()
    assert not torch.allclose(model(tokens, positions, None), first)


def test_layernorm_gelu_bias_learned_positions(dist: None) -> None:
    cfg = {
        **TINY,
        "normalization": "layernorm",
        "activation": "gelu",
        "bias": True,
        "position_embedding_type": "learned_absolute",
        "share_embeddings_and_output_weights": True,
    }
    model = build_gpt_model(cfg, padded_vocab_size=VOCAB)
    layer = model.decoder.layers[0]
    assert isinstance(layer.input_layernorm, torch.nn.LayerNorm)
    assert layer.self_attention.linear_proj.bias is not None and layer.mlp.linear_fc1.bias is not None
    assert layer.mlp.linear_fc1.weight.shape == (128, 64)  # not gated
    assert model.embedding.position_embeddings.weight.shape == (32, 64)
    assert model.output_layer.weight is None  # shared with the word embeddings
    assert model(*_inputs(), None).shape == (2, 16, VOCAB)


def test_qkv_bias_only(dist: None) -> None:
    model = build_gpt_model({**TINY, "qkv_bias": True}, padded_vocab_size=VOCAB)
    attention = model.decoder.layers[0].self_attention
    assert attention.linear_qkv.bias is not None and attention.linear_qkv.bias.shape == (64 + 2 * 2 * 16,)
    assert attention.linear_proj.bias is None
    assert model.decoder.layers[0].mlp.linear_fc1.bias is None
    assert model.decoder.layers[0].mlp.linear_fc1.weight.shape == (2 * 128, 64)  # swiglu: gate and up


def test_transformer_config_mapping() -> None:
    cfg = OmegaConf.create(
        {"model": {**TINY, "num_query_groups": None, "kv_channels": None, "layernorm_epsilon": 1e-6}}
    )
    config = transformer_config_from_nemo(cfg)
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (2, 64, 128)
    assert config.num_query_groups == 4 and config.kv_channels == 16
    assert config.normalization == "RMSNorm" and config.layernorm_epsilon == 1e-6
    assert config.gated_linear_unit and config.activation_func is F.silu
    assert not config.add_bias_linear and not config.add_qkv_bias
    assert not config.apply_query_key_layer_scaling  # forced off for rmsnorm (llama-style)
    assert config.use_cpu_initialization and config.params_dtype == torch.float32
    fusions = ("persist_layer_norm", "masked_softmax_fusion", "bias_activation_fusion", "bias_dropout_fusion")
    assert not any(getattr(config, name) for name in fusions)  # off on CPU although the config asks for them
    assert transformer_config_from_nemo(TINY, params_dtype=torch.bfloat16).bf16


def test_cuda_branch_drops_fusions_the_local_spec_cannot_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """NeMo's LLaMA configs set ``persist_layer_norm: true``; megatron-core's torch norms assert against it on GPU.

    Only the config object is built with CUDA reported available (no model is run): the fusions the local spec
    cannot honour are off, those it can are kept, and one note says which were switched off.
    """
    import neva_tools.model.gpt as gpt
    from neva_tools.mappings import clip

    asked = {**TINY, "gradient_accumulation_fusion": True, "apply_rope_fusion": True}
    monkeypatch.setattr(gpt, "_NOTED", set())  # notes are logged once per process and setting
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.DEBUG, logger="neva_tools.model.gpt"):
        config = transformer_config_from_nemo(asked)
        transformer_config_from_nemo(asked)
        relu = transformer_config_from_nemo({**asked, "activation": "relu"})
        vision = clip.transformer_config(clip.ClipVisionArch(28, 7, 32, 2, 4, 64))
    monkeypatch.undo()
    assert not config.use_cpu_initialization  # the CUDA branch
    assert not (config.persist_layer_norm or config.gradient_accumulation_fusion or config.apply_rope_fusion)
    kernels = all(importlib.util.find_spec(name) for name in gpt.SOFTMAX_KERNELS)  # apex's softmax kernels
    assert config.masked_softmax_fusion == kernels == gpt.fused_softmax_available()
    assert config.bias_activation_fusion and config.bias_dropout_fusion  # SwiGLU and bias-dropout-add: plain torch
    assert not relu.bias_activation_fusion  # megatron-core has no fused bias-ReLU
    assert not vision.use_cpu_initialization and not vision.persist_layer_norm
    assert vision.masked_softmax_fusion == kernels and vision.bias_dropout_fusion
    notes = [r for r in caplog.records if r.name == "neva_tools.model.gpt" and "fusions switched off" in r.message]
    assert len(notes) == 2  # one per setting, not one per call or per flag
    assert notes[0].levelno == logging.INFO and "persist_layer_norm" in notes[0].message
    assert "bias_activation_fusion" not in notes[0].message and "bias_activation_fusion" in notes[1].message


def _llama31_inv_freq(dim: int, base: float, factor: float, low: float, high: float, old: int) -> torch.Tensor:
    """LLaMA-3.1 RoPE scaling written out independently (per frequency, as in Meta's reference code)."""
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / base ** (i / dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(freq)
        elif wavelen > old / low:
            out.append(freq / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(out)


@pytest.mark.parametrize(
    "rope_keys",
    [
        {"scale_positional_embedding": True, "rope_scaling_factor": 8.0},
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}},
    ],
)  # fmt: skip
def test_llama31_rope_scaling(dist: None, rope_keys: dict[str, Any]) -> None:
    model = build_gpt_model({**TINY, **rope_keys}, padded_vocab_size=VOCAB)
    expected = _llama31_inv_freq(16, 10000.0, 8.0, 1.0, 4.0, 8192)
    wavelengths = 2 * math.pi / expected
    assert wavelengths.min() < 2048 and wavelengths.max() > 8192  # all three bands are exercised
    assert torch.allclose(model.rotary_pos_emb.inv_freq, expected, rtol=1e-5)
    plain = build_gpt_model(TINY, padded_vocab_size=VOCAB)
    assert not torch.allclose(plain.rotary_pos_emb.inv_freq, expected)


def test_rope_kwargs() -> None:
    kwargs = gpt_model_kwargs({**TINY, "rotary_base": 500000, "rotary_percentage": 0.5, "rope_scaling": {"factor": 32}})
    assert kwargs["rotary_base"] == 500000 and kwargs["rotary_percent"] == 0.5
    assert kwargs["rope_scaling"] is True and kwargs["rope_scaling_factor"] == 32.0
    assert kwargs["max_sequence_length"] == 32 and kwargs["position_embedding_type"] == "rope"
    assert gpt_model_kwargs(TINY)["rope_scaling"] is False


@pytest.mark.parametrize(
    ("overrides", "vocab", "fragments"),
    [
        ({"num_query_groups": 3}, VOCAB, ["num_attention_heads (4)", "num_query_groups (3)"]),
        ({"tensor_model_parallel_size": 3}, VOCAB, ["tensor_model_parallel_size (3)", "num_attention_heads (4)"]),
        (
            {"num_attention_heads": 8, "num_query_groups": 2, "tensor_model_parallel_size": 4},
            VOCAB,
            ["tensor_model_parallel_size (4)", "num_query_groups (2)"],
        ),
        ({"tensor_model_parallel_size": 2}, 255, ["padded_vocab_size (255)", "tensor_model_parallel_size (2)"]),
        ({"num_layers": None}, VOCAB, ["num_layers"]),
        ({"normalization": "layernorm1p"}, VOCAB, ["'layernorm1p'", "rmsnorm"]),
        ({"activation": "squared-relu"}, VOCAB, ["'squared-relu'", "swiglu"]),
        ({"position_embedding_type": "alibi"}, VOCAB, ["'alibi'", "rope"]),
        (
            {"rope_scaling": {"factor": 8.0, "original_max_position_embeddings": 4096}},
            VOCAB,
            ["original_max_position_embeddings is 4096", "8192"],
        ),
        ({"rope_scaling": {"factor": 8.0, "high_freq_factor": 2.0}}, VOCAB, ["high_freq_factor is 2.0", "4.0"]),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, VOCAB, ["'yarn'", "llama3"]),
        ({"rope_scaling": {"factor": 8.0}, "rope_scaling_factor": 4.0}, VOCAB, ["(8.0)", "(4.0)"]),
        (
            {"position_embedding_type": "learned_absolute", "scale_positional_embedding": True},
            VOCAB,
            ["'learned_absolute'", "rope"],
        ),
    ],
)
def test_config_errors_name_the_values(overrides: dict[str, Any], vocab: int, fragments: list[str]) -> None:
    with pytest.raises(NevaError) as info:
        build_gpt_model({**TINY, **overrides}, padded_vocab_size=vocab)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_config_tp_must_match_initialized_tp(dist: None) -> None:
    with pytest.raises(NevaError, match=r"tensor_model_parallel_size is 2 .* initialized with 1"):
        build_gpt_model({**TINY, "tensor_model_parallel_size": 2}, padded_vocab_size=VOCAB)


def test_world_size_must_be_divisible_by_tp_times_pp(dist: None) -> None:
    with pytest.raises(NevaError, match=r"world size \(1\).*\(2 × 1 = 2\)"):
        init_distributed(tp=2)


def test_launch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert launch_env() == LaunchEnv(0, 1, 0, "single")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launch_env() == LaunchEnv(5, 8, 1, "slurm")
    monkeypatch.setenv("RANK", "3")  # torchrun inside a SLURM allocation: torchrun's variables win
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert launch_env() == LaunchEnv(3, 4, 3, "torchrun")
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(NevaError, match=r"WORLD_SIZE.*'four'"):
        launch_env()
