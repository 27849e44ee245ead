"""Build a megatron-core ``GPTModel`` (local spec, no Transformer Engine) from a NeMo-style ``model:`` config.

Supported NeMo keys (others are ignored): ``num_layers, hidden_size, ffn_hidden_size, num_attention_heads,
num_query_groups, kv_channels, encoder_seq_length, max_position_embeddings, position_embedding_type, rotary_base,
rotary_percentage, seq_len_interpolation_factor, scale_positional_embedding, rope_scaling_factor, rope_scaling,
normalization, layernorm_epsilon, activation, bias, qkv_bias, share_embeddings_and_output_weights, hidden_dropout,
attention_dropout, init_method_std, tensor_model_parallel_size, pipeline_model_parallel_size,
virtual_pipeline_model_parallel_size, apply_query_key_layer_scaling, persist_layer_norm, masked_softmax_fusion,
bias_activation_fusion, bias_dropout_add_fusion, gradient_accumulation_fusion, apply_rope_fusion`` and the
activation-checkpointing keys of :mod:`neva_tools.model.recompute`. Defaults are NeMo's.

Kernel fusions: the model is built with megatron-core's local (non-Transformer-Engine) spec, on CPU and GPU alike,
so a fusion the config asks for is kept only where that spec can run it (see :func:`fusion_flags`); the others are
switched off with one logged note (NeMo's LLaMA configs set ``persist_layer_norm: true``, which megatron-core's
torch norms assert against).

LLaMA-3.1 RoPE scaling: megatron-core 0.16.1 takes ``rope_scaling`` (on/off) and ``rope_scaling_factor`` as
``GPTModel`` arguments, but ``RotaryEmbedding`` calls ``_apply_scaling(inv_freq, factor=...)`` only, so
``low_freq_factor=1``, ``high_freq_factor=4`` and ``original_max_position_embeddings=8192`` are fixed (these are
LLaMA-3.1's and LLaMA-3.2's values). A config asking for other values is rejected rather than silently mis-built.
The scaling is switched on by NeMo's ``scale_positional_embedding: true`` (factor from ``rope_scaling_factor``,
default 8) or by a Hugging Face style ``rope_scaling: {rope_type: llama3, factor, low_freq_factor, high_freq_factor,
original_max_position_embeddings}`` mapping.

Pipeline stages: with ``pipeline_model_parallel_size`` > 1 :func:`build_gpt_model` builds this rank's stage (the
embedding on the first, the final norm and output layer on the last, ``num_layers / PP`` layers numbered from the
stage's offset, as megatron-core's ``TransformerBlock`` does); with ``virtual_pipeline_model_parallel_size`` V it
builds one of the rank's V interleaved chunks (``vp_stage``), ``num_layers / (PP × V)`` layers each
(:func:`build_gpt_chunks` builds them all).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from neva_tools.errors import NevaError
from neva_tools.model.recompute import recompute_settings

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

logger = logging.getLogger(__name__)

# What megatron-core 0.16.1's RotaryEmbedding._apply_scaling uses whatever the config says (only `factor` is passed).
MCORE_FIXED_ROPE_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
DEFAULT_ROPE_SCALING_FACTOR = 8.0

NORMALIZATIONS = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}

# NeMo activation name -> (activation function, gated linear unit)
ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], bool]] = {
    "gelu": (F.gelu, False),
    "geglu": (F.gelu, True),
    "fast-geglu": (F.gelu, True),
    "swiglu": (F.silu, True),
    "fast-swiglu": (F.silu, True),
    "relu": (F.relu, False),
    "reglu": (F.relu, True),
    "fast-reglu": (F.relu, True),
}

POSITION_EMBEDDING_TYPES = ("rope", "learned_absolute")

#: megatron-core fusion flag → (NeMo key, NeMo's default). The first three are never possible with the local spec:
#: its torch norms assert ``not persist_layer_norm``; gradient-accumulation fusion needs apex's
#: ``fused_weight_gradient_mlp_cuda`` or Transformer Engine linears; RoPE fusion needs Transformer Engine (and
#: :mod:`neva_tools.model.rope` applies RoPE itself).
FUSIONS: dict[str, tuple[str, bool]] = {
    "persist_layer_norm": ("persist_layer_norm", False),
    "gradient_accumulation_fusion": ("gradient_accumulation_fusion", False),
    "apply_rope_fusion": ("apply_rope_fusion", False),
    "masked_softmax_fusion": ("masked_softmax_fusion", True),
    "bias_activation_fusion": ("bias_activation_fusion", True),
    "bias_dropout_fusion": ("bias_dropout_add_fusion", True),
}
#: The compiled softmax kernels (apex's) that ``masked_softmax_fusion`` calls in megatron-core's softmax, which the
#: local spec's attention falls back to (sliding windows, softmax offsets; see :mod:`neva_tools.model.attention`).
SOFTMAX_KERNELS = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda", "scaled_softmax_cuda")
_NOTED: set[tuple[bool, tuple[str, ...]]] = set()  # fusion notes already logged (one per process and setting)


def fused_softmax_available() -> bool:
    """True where the softmax kernels ``masked_softmax_fusion`` calls (:data:`SOFTMAX_KERNELS`) are installed."""
    return all(importlib.util.find_spec(name) is not None for name in SOFTMAX_KERNELS)


def _as_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of the model section of a NeMo config (a dict or DictConfig, with or without ``model:``)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise NevaError(f"the model config must be a mapping of NeMo `model:` keys, found {type(cfg).__name__}")
    cfg = dict(cfg)
    if "num_layers" not in cfg and isinstance(cfg.get("model"), Mapping):
        cfg = dict(cfg["model"])
    return cfg


def _positive_int(cfg: Mapping[str, Any], key: str, default: int | None = None) -> int:
    """``cfg[key]`` (or ``default`` when absent/null) checked to be a positive integer."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise NevaError(f"the model config has no `{key}`; set model.{key} (a positive integer)")
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise NevaError(f"model.{key} must be a positive integer, found {value!r}")
    return value


def _get(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    """``cfg[key]``, or ``default`` when it is absent or null."""
    value = cfg.get(key)
    return default if value is None else value


def _rope_scaling(cfg: Mapping[str, Any]) -> tuple[bool, float]:
    """(rope_scaling, rope_scaling_factor) for ``GPTModel``; NevaError for values megatron-core cannot represent."""
    flag = cfg.get("scale_positional_embedding")
    mapping = cfg.get("rope_scaling")
    factor = cfg.get("rope_scaling_factor")
    if mapping is None:
        return bool(flag), float(DEFAULT_ROPE_SCALING_FACTOR if factor is None else factor)
    if not isinstance(mapping, Mapping):
        raise NevaError(f"model.rope_scaling must be a mapping (LLaMA-3.1 style) or null, found {mapping!r}")
    if flag is False:
        raise NevaError(
            f"model.scale_positional_embedding is false but model.rope_scaling is set ({dict(mapping)}); "
            "remove one of them"
        )
    rope_type = mapping.get("rope_type", mapping.get("type", "llama3"))
    if rope_type != "llama3":
        raise NevaError(
            f"model.rope_scaling.rope_type is {rope_type!r}; megatron-core's RotaryEmbedding only implements 'llama3'"
        )
    if mapping.get("factor") is not None:
        if factor is not None and float(factor) != float(mapping["factor"]):
            raise NevaError(
                f"model.rope_scaling.factor ({mapping['factor']}) and model.rope_scaling_factor ({factor}) differ; "
                "keep one"
            )
        factor = mapping["factor"]
    for key, fixed in MCORE_FIXED_ROPE_SCALING.items():
        if key in mapping and mapping[key] is not None and float(mapping[key]) != float(fixed):
            raise NevaError(
                f"model.rope_scaling.{key} is {mapping[key]} but megatron-core 0.16.1 hard-codes {key}={fixed} "
                "in RotaryEmbedding._apply_scaling; this RoPE scaling cannot be built"
            )
    return True, float(DEFAULT_ROPE_SCALING_FACTOR if factor is None else factor)


def gpt_model_kwargs(cfg: Any) -> dict[str, Any]:
    """The ``GPTModel`` constructor arguments that are not part of ``TransformerConfig`` (positions, sharing).

    ``max_sequence_length`` is ``encoder_seq_length`` as in NeMo's megatron-core path (else
    ``max_position_embeddings``, else 512); it sizes the learned position table and nothing else.
    """
    cfg = _as_dict(cfg)
    position_embedding_type = _get(cfg, "position_embedding_type", "learned_absolute")
    if position_embedding_type not in POSITION_EMBEDDING_TYPES:
        raise NevaError(
            f"model.position_embedding_type is {position_embedding_type!r}; "
            f"supported: {', '.join(POSITION_EMBEDDING_TYPES)}"
        )
    rope_scaling, rope_scaling_factor = _rope_scaling(cfg)
    if rope_scaling and position_embedding_type != "rope":
        raise NevaError(
            f"RoPE scaling is requested but model.position_embedding_type is {position_embedding_type!r}; "
            "set position_embedding_type: rope"
        )
    max_sequence_length = _get(cfg, "encoder_seq_length", _get(cfg, "max_position_embeddings", 512))
    return {
        "max_sequence_length": max_sequence_length,
        "share_embeddings_and_output_weights": bool(_get(cfg, "share_embeddings_and_output_weights", True)),
        "position_embedding_type": position_embedding_type,
        "rotary_percent": float(_get(cfg, "rotary_percentage", 1.0)),
        "rotary_base": _get(cfg, "rotary_base", 10000),
        "rope_scaling": rope_scaling,
        "rope_scaling_factor": rope_scaling_factor,
        "seq_len_interpolation_factor": cfg.get("seq_len_interpolation_factor"),
    }


def fusion_flags(cfg: Mapping[str, Any], *, cuda: bool, activation_func: Callable[..., Any], gated: bool,
                 bias: bool) -> dict[str, bool]:  # fmt: skip
    """megatron-core's fusion flags (:data:`FUSIONS`) for the local spec: what ``cfg`` asks for, less what cannot run.

    On CPU every fusion is off. On CUDA ``persist_layer_norm``, ``gradient_accumulation_fusion`` and
    ``apply_rope_fusion`` are off too; ``masked_softmax_fusion`` stays only where apex's softmax kernels are
    installed, ``bias_activation_fusion`` only for an activation megatron-core fuses (GELU with a bias or gated,
    SwiGLU), ``bias_dropout_add_fusion`` (plain torch) always. Flags asked for and switched off are logged once.
    """
    fusable_activation = (activation_func is F.gelu and (gated or bias)) or (activation_func is F.silu and gated)
    possible = {
        "persist_layer_norm": False,
        "gradient_accumulation_fusion": False,
        "apply_rope_fusion": False,
        "masked_softmax_fusion": cuda and fused_softmax_available(),
        "bias_activation_fusion": cuda and fusable_activation,
        "bias_dropout_fusion": cuda,
    }
    asked = {name: bool(_get(cfg, key, default)) for name, (key, default) in FUSIONS.items()}
    dropped = tuple(FUSIONS[name][0] for name in FUSIONS if asked[name] and not possible[name])
    if dropped and (cuda, dropped) not in _NOTED:
        _NOTED.add((cuda, dropped))
        where = "on CUDA" if cuda else "on CPU, where none is available"
        logger.log(logging.INFO if cuda else logging.DEBUG,
                   "kernel fusions switched off (megatron-core's local, non-Transformer-Engine layer spec cannot "
                   "use them %s): %s", where, ", ".join(dropped))  # fmt: skip
    return {name: asked[name] and possible[name] for name in FUSIONS}


def transformer_config_from_nemo(cfg: Any, *, params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """A megatron-core ``TransformerConfig`` from NeMo ``model:`` keys, validated early with ``NevaError``.

    Kernel fusions are those of :func:`fusion_flags` (all off on CPU); without CUDA, weights are initialized on
    the CPU.
    """
    from megatron.core.transformer import TransformerConfig

    cfg = _as_dict(cfg)
    num_layers = _positive_int(cfg, "num_layers")
    hidden_size = _positive_int(cfg, "hidden_size")
    heads = _positive_int(cfg, "num_attention_heads")
    groups = _positive_int(cfg, "num_query_groups", heads)
    tp = _positive_int(cfg, "tensor_model_parallel_size", 1)
    pp = _positive_int(cfg, "pipeline_model_parallel_size", 1)
    vpp = virtual_pipeline_size(cfg)
    if heads % groups != 0:
        raise NevaError(f"num_attention_heads ({heads}) must be divisible by num_query_groups ({groups})")
    if heads % tp != 0:
        raise NevaError(f"tensor_model_parallel_size ({tp}) must divide num_attention_heads ({heads})")
    if groups % tp != 0:
        raise NevaError(f"tensor_model_parallel_size ({tp}) must divide num_query_groups ({groups})")
    if num_layers % pp != 0:
        raise NevaError(f"pipeline_model_parallel_size ({pp}) must divide num_layers ({num_layers})")
    if vpp is not None and num_layers % (pp * vpp) != 0:
        raise NevaError(f"pipeline_model_parallel_size × virtual_pipeline_model_parallel_size ({pp} × {vpp}) must "
                        f"divide num_layers ({num_layers})")  # fmt: skip
    kv_channels = cfg.get("kv_channels")
    if kv_channels is None and hidden_size % heads != 0:
        raise NevaError(
            f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({heads}), or set kv_channels"
        )

    normalization = str(_get(cfg, "normalization", "layernorm")).lower()
    if normalization not in NORMALIZATIONS:
        raise NevaError(f"model.normalization is {normalization!r}; supported: {', '.join(NORMALIZATIONS)}")
    activation = str(_get(cfg, "activation", "gelu")).lower()
    if activation not in ACTIVATIONS:
        raise NevaError(f"model.activation is {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    activation_func, gated = ACTIVATIONS[activation]
    gpt_model_kwargs(cfg)  # validate position-embedding keys early too

    cuda = torch.cuda.is_available()
    bias = bool(_get(cfg, "bias", True))
    fusions = fusion_flags(cfg, cuda=cuda, activation_func=activation_func, gated=gated, bias=bias)
    qk_layer_scaling = bool(_get(cfg, "apply_query_key_layer_scaling", False)) and normalization != "rmsnorm"
    try:
        return TransformerConfig(
            num_layers=num_layers,
            hidden_size=hidden_size,
            ffn_hidden_size=cfg.get("ffn_hidden_size"),
            num_attention_heads=heads,
            num_query_groups=groups,
            kv_channels=kv_channels,
            normalization=NORMALIZATIONS[normalization],
            layernorm_epsilon=float(_get(cfg, "layernorm_epsilon", 1e-5)),
            activation_func=activation_func,
            gated_linear_unit=gated,
            add_bias_linear=bias,
            add_qkv_bias=bool(_get(cfg, "qkv_bias", False)),
            hidden_dropout=float(_get(cfg, "hidden_dropout", 0.1)),
            attention_dropout=float(_get(cfg, "attention_dropout", 0.1)),
            init_method_std=float(_get(cfg, "init_method_std", 0.02)),
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            pipeline_dtype=params_dtype,  # what the stages send each other
            apply_query_key_layer_scaling=qk_layer_scaling,
            use_cpu_initialization=not cuda,
            params_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            **fusions,
            **recompute_settings(cfg, num_layers // (pp * (vpp or 1))),
        )
    except (AssertionError, ValueError) as err:
        raise NevaError(f"megatron-core rejected the model config: {err}") from err


def virtual_pipeline_size(cfg: Mapping[str, Any]) -> int | None:
    """``virtual_pipeline_model_parallel_size`` (None when absent, null or 1: no interleaving); it needs PP > 1."""
    vpp = cfg.get("virtual_pipeline_model_parallel_size")
    if vpp is None or vpp == 1:
        return None
    if not isinstance(vpp, int) or isinstance(vpp, bool) or vpp < 1:
        raise NevaError(f"model.virtual_pipeline_model_parallel_size must be a positive integer or null, found {vpp!r}")
    if _get(cfg, "pipeline_model_parallel_size", 1) < 2:
        pp = _get(cfg, "pipeline_model_parallel_size", 1)
        raise NevaError(f"model.virtual_pipeline_model_parallel_size is {vpp} but pipeline_model_parallel_size is "
                        f"{pp}: interleaving needs pipeline stages (PP ≥ 2)")  # fmt: skip
    return vpp


def stage_flags(vp_stage: int | None = None) -> tuple[bool, bool]:
    """(pre_process, post_process) of this rank's pipeline stage, or of its interleaved chunk ``vp_stage``: whether
    it holds the input embedding (the first stage, first chunk) and the output layer (the last stage, last chunk)."""
    from megatron.core import parallel_state

    first = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    return first, last


def build_gpt_model(
    cfg: Any,
    *,
    padded_vocab_size: int,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    params_dtype: torch.dtype = torch.float32,
    vp_stage: int | None = None,
) -> GPTModel:
    """A megatron-core ``GPTModel`` with the local layer spec, built with ``parallel_output=True``.

    Needs megatron's parallel state (``neva_tools.model.parallel.init_distributed``) with the config's TP/PP sizes.
    ``pre_process``/``post_process`` default to this rank's pipeline stage (:func:`stage_flags`; both True without
    pipeline parallelism); ``vp_stage`` is the interleaved chunk to build (``virtual_pipeline_model_parallel_size``).
    Forward returns vocab-parallel logits ``[b, s, V / TP]``; pass ``runtime_gather_output=True`` or use
    :func:`gather_logits` for the full vocabulary (labels work with the parallel logits).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from neva_tools.model.specs import gpt_block_spec

    config = transformer_config_from_nemo(cfg, params_dtype=params_dtype)
    tp = config.tensor_model_parallel_size
    if padded_vocab_size < 1 or padded_vocab_size % tp != 0:
        raise NevaError(
            f"padded_vocab_size ({padded_vocab_size}) must be a positive multiple of "
            f"tensor_model_parallel_size ({tp}); pad it with neva_tools.tokenizer.vocab.padded_vocab_size"
        )
    if not parallel_state.model_parallel_is_initialized():
        raise NevaError("megatron parallel state is not initialized; call neva_tools.model.parallel.init_distributed()")
    initialized_sizes = {
        "tensor_model_parallel_size": (tp, parallel_state.get_tensor_model_parallel_world_size()),
        "pipeline_model_parallel_size": (
            config.pipeline_model_parallel_size,
            parallel_state.get_pipeline_model_parallel_world_size(),
        ),
    }
    if config.virtual_pipeline_model_parallel_size is not None:
        initialized_sizes["virtual_pipeline_model_parallel_size"] = (
            config.virtual_pipeline_model_parallel_size,
            parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        )
        if vp_stage is None or not 0 <= vp_stage < config.virtual_pipeline_model_parallel_size:
            vpp = config.virtual_pipeline_model_parallel_size
            raise NevaError(f"vp_stage is {vp_stage!r}: with virtual_pipeline_model_parallel_size {vpp} build "
                            "each chunk (build_gpt_chunks)")  # fmt: skip
    for name, (want, have) in initialized_sizes.items():
        if want != have:
            raise NevaError(
                f"model.{name} is {want} but the process group was initialized with {have}; "
                f"call init_distributed with the same sizes as the config"
            )
    kwargs = gpt_model_kwargs(cfg)
    spec = gpt_block_spec(config)
    first, last = stage_flags(vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size,
        pre_process=first if pre_process is None else pre_process,
        post_process=last if post_process is None else post_process,
        parallel_output=True,
        vp_stage=vp_stage,
        **kwargs,
    )
    logger.debug("built GPTModel: %d parameters on this rank", sum(p.numel() for p in model.parameters()))
    return model


def build_gpt_chunks(cfg: Any, *, padded_vocab_size: int, params_dtype: torch.dtype = torch.float32) -> list[GPTModel]:
    """This rank's model chunks: one ``GPTModel`` (its pipeline stage), or one per interleaved virtual stage."""
    vpp = virtual_pipeline_size(_as_dict(cfg))
    stages = [None] if vpp is None else list(range(vpp))
    return [build_gpt_model(cfg, padded_vocab_size=padded_vocab_size, params_dtype=params_dtype, vp_stage=stage)
            for stage in stages]  # fmt: skip


def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from vocab-parallel ones (all-gather on the last dim; differentiable)."""
    from megatron.core import tensor_parallel

    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)
