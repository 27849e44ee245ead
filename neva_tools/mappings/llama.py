"""LLaMA-style decoder LLMs (LLaMA-2/3/3.1, Vicuna, Mistral, Qwen2/2.5): architecture and weight table.

The table maps megatron-core names (as NeMo writes them, with Transformer-Engine layer-norm names) to
Hugging Face names; ``LlamaArch`` derives both configs (NeMo ``model:`` section and HF ``config.json``)
from each other so nothing is typed by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from neva_tools.errors import NevaError
from neva_tools.mappings.base import Entry, Split

#: HF architecture class → family name. Vicuna and LLaMA-2/3/3.1 use ``LlamaForCausalLM``.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
MODEL_TYPES = {family: arch for arch, family in ARCHITECTURES.items()}

_L = "model.decoder.layers.{i}."
_H = "model.layers.{i}."

TABLE: tuple[Entry, ...] = (
    Entry("model.embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Split.VOCAB),
    Entry(_L + "self_attention.linear_qkv.layer_norm_weight", (_H + "input_layernorm.weight",), Split.REPLICATED),
    Entry(
        _L + "self_attention.linear_qkv.weight",
        (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
        Split.QKV,
    ),
    Entry(
        _L + "self_attention.linear_qkv.bias",
        (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
        Split.QKV,
        when="qkv_bias",
    ),
    Entry(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), Split.ROW),
    Entry(_L + "mlp.linear_fc1.layer_norm_weight", (_H + "post_attention_layernorm.weight",), Split.REPLICATED),
    Entry(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), Split.GATED_MLP),
    Entry(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), Split.ROW),
    Entry("model.decoder.final_layernorm.weight", ("model.norm.weight",), Split.REPLICATED),
    Entry("model.output_layer.weight", ("lm_head.weight",), Split.VOCAB, when="untied"),
)

#: HF tensors that carry no weights (recomputed buffers in old checkpoints); accepted and not converted.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)

#: Megatron-core local-spec names of the two layer norms that NeMo writes with Transformer-Engine names.
LOCAL_SPEC_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def _rope(cfg: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from a transformers 4 (``rope_theta``/``rope_scaling``) or 5 config."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {}) or {k: v for k, v in params.items() if k != "rope_theta"}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind not in ("linear", "llama3"):
        raise NevaError(f"rope scaling type {kind!r} in config.json is not supported; supported: linear, llama3")
    return theta, {**scaling, "rope_type": kind}


@dataclass(frozen=True)
class LlamaArch:
    """The architecture facts of a LLaMA-style model, independent of checkpoint format."""

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tied: bool
    qkv_bias: bool

    @property
    def untied(self) -> bool:
        """True when the output layer has its own weights."""
        return not self.tied

    # -- Hugging Face side -------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], source: str = "config.json") -> LlamaArch:
        """Read a HF ``config.json``; unsupported families and features are refused with what was found."""
        archs = list(cfg.get("architectures") or [])
        family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        family = family or (cfg.get("model_type") if cfg.get("model_type") in MODEL_TYPES else None)
        if family is None:
            found = archs or cfg.get("model_type")
            supported = ", ".join(f"{a} ({f})" for a, f in ARCHITECTURES.items())
            raise NevaError(f"{source}: architecture {found!r} is not supported; supported families: {supported}")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise NevaError(f"{source}: {flag}=true is not supported for {family} (megatron-core biases differ)")
        heads = int(cfg["num_attention_heads"])
        theta, scaling = _rope(cfg)
        try:
            return cls(
                family=family,
                num_layers=int(cfg["num_hidden_layers"]),
                hidden_size=int(cfg["hidden_size"]),
                ffn_hidden_size=int(cfg["intermediate_size"]),
                num_heads=heads,
                num_groups=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
                vocab_size=int(cfg["vocab_size"]),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                tied=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=family == "qwen2",
            )
        except KeyError as exc:
            raise NevaError(f"{source}: required key {exc.args[0]!r} is missing") from None

    def to_hf_config(self, base: Mapping[str, Any] | None = None, dtype: str = "float32") -> dict[str, Any]:
        """A HF ``config.json`` dict: ``base`` (the original config, if known) with every architecture field set."""
        cfg = dict(base or {})
        for stale in ("rope_scaling", "rope_theta", "rope_parameters", "torch_dtype"):
            cfg.pop(stale, None)
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
        cfg.update(
            architectures=[MODEL_TYPES[self.family]],
            model_type=self.family,
            num_hidden_layers=self.num_layers,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_groups,
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.norm_eps,
            rope_parameters=rope,
            tie_word_embeddings=self.tied,
            hidden_act="silu",
            dtype=dtype,
        )
        return cfg

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of every HF tensor."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_groups * self.head_dim
        layer = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.weight": (h, q),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (self.ffn_hidden_size, h),
            "mlp.up_proj.weight": (self.ffn_hidden_size, h),
            "mlp.down_proj.weight": (h, self.ffn_hidden_size),
        }
        shapes = {
            "model.embed_tokens.weight": (self.vocab_size, h),
            "model.norm.weight": (h,),
            "lm_head.weight": (self.vocab_size, h),
        }
        for i in range(self.num_layers):
            shapes.update({f"model.layers.{i}.{k}": v for k, v in layer.items()})
        return shapes

    # -- NeMo side ---------------------------------------------------------------------------------------
    def to_nemo_model_config(self) -> dict[str, Any]:
        """The architecture part of NeMo's ``model:`` section (megatron-core GPT, LLaMA style)."""
        cfg: dict[str, Any] = {
            "mcore_gpt": True,
            "transformer_engine": False,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "ffn_hidden_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_heads,
            "num_query_groups": self.num_groups,
            "kv_channels": self.head_dim,
            "encoder_seq_length": self.max_position_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "position_embedding_type": "rope",
            "rotary_base": self.rope_theta,
            "rotary_percentage": 1.0,
            "seq_len_interpolation_factor": None,
            "scale_positional_embedding": False,
            "normalization": "rmsnorm",
            "layernorm_epsilon": self.norm_eps,
            "activation": "fast-swiglu",
            "bias": False,
            "qkv_bias": self.qkv_bias,
            "share_embeddings_and_output_weights": self.tied,
            "apply_query_key_layer_scaling": False,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "vocab_size": self.vocab_size,
            "hf_model_family": self.family,
        }
        if self.rope_scaling and self.rope_scaling["rope_type"] == "linear":
            cfg["seq_len_interpolation_factor"] = float(self.rope_scaling["factor"])
        elif self.rope_scaling:
            cfg.update(
                scale_positional_embedding=True,
                rope_scaling_factor=float(self.rope_scaling["factor"]),
                rope_scaling={k: v for k, v in self.rope_scaling.items() if k != "type"},
            )
        return cfg

    @classmethod
    def from_nemo_model_config(cls, cfg: Mapping[str, Any], vocab_size: int | None = None) -> LlamaArch:
        """Read the architecture back from a NeMo ``model:`` section (ours or NeMo's own)."""
        heads = int(cfg["num_attention_heads"])
        if cfg.get("seq_len_interpolation_factor"):
            scaling = {"rope_type": "linear", "factor": float(cfg["seq_len_interpolation_factor"])}
        elif cfg.get("scale_positional_embedding") or cfg.get("rope_scaling"):
            scaling = {  # NeMo's defaults are LLaMA-3.1's
                "rope_type": "llama3",
                "factor": float(cfg.get("rope_scaling_factor") or 8.0),
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
                **dict(cfg.get("rope_scaling") or {}),
            }
        else:
            scaling = None
        vocab = vocab_size or cfg.get("vocab_size")
        if vocab is None:
            raise NevaError("the model config has no vocab_size; pass the tokenizer so the vocabulary size is known")
        return cls(
            family=str(cfg.get("hf_model_family", "qwen2" if cfg.get("qkv_bias") else "llama")),
            num_layers=int(cfg["num_layers"]),
            hidden_size=int(cfg["hidden_size"]),
            ffn_hidden_size=int(cfg["ffn_hidden_size"]),
            num_heads=heads,
            num_groups=int(cfg.get("num_query_groups") or heads),
            head_dim=int(cfg.get("kv_channels") or int(cfg["hidden_size"]) // heads),
            vocab_size=int(vocab),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or cfg["encoder_seq_length"]),
            norm_eps=float(cfg.get("layernorm_epsilon", 1e-5)),
            rope_theta=float(cfg.get("rotary_base", 10000.0)),
            rope_scaling=scaling,
            tied=bool(cfg.get("share_embeddings_and_output_weights", False)),
            qkv_bias=bool(cfg.get("qkv_bias", False)),
        )

    def entries(self) -> list[tuple[str, tuple[str, ...], Split]]:
        """Every (nemo name, hf names, split) of this model, layers expanded, conditional entries resolved."""
        out = []
        for entry in TABLE:
            if entry.when is not None and not getattr(self, entry.when):
                continue
            layers = range(self.num_layers) if entry.per_layer else [None]
            out.extend((*entry.expand(i), entry.split) for i in layers)
        return out

    def replace(self, **changes: Any) -> LlamaArch:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)
