"""LLaMA-style decoder LLMs (LLaMA-2/3/3.1, Vicuna, Mistral, Qwen2/2.5): architecture and weight table.

The table maps megatron-core names (as NeMo writes them, with Transformer-Engine layer-norm names) to
Hugging Face names; ``LlamaArch`` derives both configs (NeMo ``model:`` section and HF ``config.json``)
from each other so nothing is typed by hand.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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


_MISSING = object()
_FIX = "correct it, or use the config file written with these weights"


def _required(cfg: Mapping[str, Any], key: str, source: str) -> Any:
    """``cfg[key]``, or our error naming the file and the key."""
    value = cfg.get(key)
    if value is None:
        raise NevaError(f"{source}: required key {key!r} is missing; add the model's {key}, or use the config file "
                        "written with these weights")  # fmt: skip
    return value


def _count(value: Any, key: str, source: str, minimum: int = 1) -> int:
    """A config value that must be an integer of at least ``minimum`` (``"32"`` and ``32.0`` pass), or our error
    naming the file, the key and the value."""
    try:
        number = int(value) if not isinstance(value, (bool, float)) or value == int(value) else None
    except (TypeError, ValueError, OverflowError):
        number = None
    if isinstance(value, bool) or number is None or number < minimum:
        raise NevaError(f"{source}: {key} is {value!r}; it must be an integer of at least {minimum}: {_FIX}")
    return number


def _int_key(cfg: Mapping[str, Any], key: str, default: Any = _MISSING, *, source: str) -> int:
    """``cfg[key]`` as a positive integer; ``default`` when it is missing, None or 0 (required without one)."""
    value = _required(cfg, key, source) if default is _MISSING else (cfg.get(key) or default)
    return _count(value, key, source)


def _real(value: Any, key: str, source: str) -> float:
    """A config value that must be a finite number, or our error naming the file, the key and the value."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number):
        raise NevaError(f"{source}: {key} is {value!r}; it must be a number: {_FIX}")
    return number


def _mapping(value: Any, key: str, source: str) -> dict[str, Any]:
    """A config value that must be a mapping (None: empty), or our error naming the file, the key and the value."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise NevaError(f"{source}: {key} is {value!r}; it must be a mapping: {_FIX}")
    return dict(value)


def _rope(cfg: Mapping[str, Any], source: str = "config.json") -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from a transformers 4 (``rope_theta``/``rope_scaling``) or 5 config."""
    params = _mapping(cfg.get("rope_parameters"), "rope_parameters", source)
    scaling = _mapping(cfg.get("rope_scaling"), "rope_scaling", source)
    scaling = scaling or {k: v for k, v in params.items() if k != "rope_theta"}
    theta = _real(params.get("rope_theta", cfg.get("rope_theta", 10000.0)), "rope_theta", source)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind not in ("linear", "llama3"):
        raise NevaError(f"{source}: rope scaling type {kind!r} is not supported; supported: linear, llama3")
    _real(scaling.get("factor"), "rope_scaling.factor", source)
    return theta, {**scaling, "rope_type": kind}


def _family(cfg: Mapping[str, Any], source: str) -> str:
    """The Hugging Face family a NeMo section names (``hf_model_family``, ours), else guessed from ``qkv_bias``."""
    family = cfg.get("hf_model_family")
    if family is None:
        return "qwen2" if cfg.get("qkv_bias") else "llama"
    if not isinstance(family, str) or family not in MODEL_TYPES:
        raise NevaError(f"{source}: hf_model_family is {family!r}; it must be one of {', '.join(sorted(MODEL_TYPES))} "
                        "(or be left out): fix the value")  # fmt: skip
    return family


def _check_groups(heads: int, groups: int, source: str) -> None:
    if heads % groups:
        raise NevaError(f"{source}: the number of attention heads ({heads}) must be a multiple of the number of "
                        f"key/value heads ({groups}): {_FIX}")  # fmt: skip


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
        """Read a HF ``config.json``; unsupported families and features are refused with what was found, and
        missing or ill-typed values with the key and the value."""
        if not isinstance(cfg, Mapping):
            raise NevaError(f"{source} holds a JSON {type(cfg).__name__}, not an object of model settings")
        listed = cfg.get("architectures") or []
        archs = [listed] if isinstance(listed, str) else listed if isinstance(listed, list) else []
        family = next((ARCHITECTURES[a] for a in archs if isinstance(a, str) and a in ARCHITECTURES), None)
        model_type = cfg.get("model_type")
        family = family or (model_type if isinstance(model_type, str) and model_type in MODEL_TYPES else None)
        if family is None:
            found = listed or model_type
            supported = ", ".join(f"{a} ({f})" for a, f in ARCHITECTURES.items())
            raise NevaError(f"{source}: architecture {found!r} is not supported; supported families: {supported}")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise NevaError(f"{source}: {flag}=true is not supported for {family} (megatron-core biases differ)")
        count = functools.partial(_int_key, cfg, source=source)
        heads, hidden = count("num_attention_heads"), count("hidden_size")
        groups = count("num_key_value_heads", heads)
        _check_groups(heads, groups, source)
        theta, scaling = _rope(cfg, source)
        return cls(
            family=family,
            num_layers=count("num_hidden_layers"),
            hidden_size=hidden,
            ffn_hidden_size=count("intermediate_size"),
            num_heads=heads,
            num_groups=groups,
            head_dim=count("head_dim", max(hidden // heads, 1)),
            vocab_size=count("vocab_size"),
            max_position_embeddings=count("max_position_embeddings", 4096),
            norm_eps=_real(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", source),
            rope_theta=theta,
            rope_scaling=scaling,
            tied=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2",
        )

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

    def mcore_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected full (TP=1, vocabulary unpadded) shape of every megatron-core tensor, read off the table: a
        tensor fused from several HF tensors (QKV, gate/up) stacks them along dim 0."""
        hf = self.hf_shapes()
        return {nemo: (sum(hf[n][0] for n in names), *hf[names[0]][1:]) for nemo, names, _ in self.entries()}

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
    def from_nemo_model_config(
        cls, cfg: Mapping[str, Any], vocab_size: int | None = None, source: str = "model_config.yaml"
    ) -> LlamaArch:
        """Read the architecture back from a NeMo ``model:`` section (ours or NeMo's own); missing or ill-typed
        values are our error naming ``source``, the key and the value."""
        if not isinstance(cfg, Mapping):
            raise NevaError(f"{source} holds a {type(cfg).__name__}, not a mapping of model settings")
        count = functools.partial(_int_key, cfg, source=source)
        heads, hidden = count("num_attention_heads"), count("hidden_size")
        groups = count("num_query_groups", heads)
        _check_groups(heads, groups, source)
        if cfg.get("seq_len_interpolation_factor"):
            factor = _real(cfg["seq_len_interpolation_factor"], "seq_len_interpolation_factor", source)
            scaling: dict[str, Any] | None = {"rope_type": "linear", "factor": factor}
        elif cfg.get("scale_positional_embedding") or cfg.get("rope_scaling"):
            scaling = {  # NeMo's defaults are LLaMA-3.1's
                "rope_type": "llama3",
                "factor": _real(cfg.get("rope_scaling_factor") or 8.0, "rope_scaling_factor", source),
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
                **_mapping(cfg.get("rope_scaling"), "rope_scaling", source),
            }
        else:
            scaling = None
        vocab = vocab_size or cfg.get("vocab_size")
        if vocab is None:
            raise NevaError(f"{source} has no vocab_size; pass the tokenizer so the vocabulary size is known")
        positions = cfg.get("max_position_embeddings") or _required(cfg, "encoder_seq_length", source)
        return cls(
            family=_family(cfg, source),
            num_layers=count("num_layers"),
            hidden_size=hidden,
            ffn_hidden_size=count("ffn_hidden_size"),
            num_heads=heads,
            num_groups=groups,
            head_dim=count("kv_channels", max(hidden // heads, 1)),
            vocab_size=_count(vocab, "vocab_size", source),
            max_position_embeddings=_count(positions, "max_position_embeddings", source),
            norm_eps=_real(cfg.get("layernorm_epsilon", 1e-5), "layernorm_epsilon", source),
            rope_theta=_real(cfg.get("rotary_base", 10000.0), "rotary_base", source),
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
