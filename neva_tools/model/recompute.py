"""NeMo's activation-checkpointing keys as megatron-core's recompute settings (LLM and vision encoder alike).

| NeMo ``model.`` key | megatron-core ``TransformerConfig`` |
|---|---|
| ``activations_checkpoint_granularity``: ``selective`` / ``full`` / null | ``recompute_granularity`` |
| ``activations_checkpoint_method``: ``uniform`` / ``block`` (full only) | ``recompute_method`` |
| ``activations_checkpoint_num_layers`` (full only) | ``recompute_num_layers`` |

``selective`` recomputes the core attention of every layer (megatron-core's ``recompute_modules`` default); as in
NeMo, method and layer count are not used with it. ``full`` recomputes whole layers: ``uniform`` checkpoints the
input of every chunk of ``activations_checkpoint_num_layers`` layers (default 1, Megatron-LM's recommendation),
``block`` recomputes the first ``activations_checkpoint_num_layers`` layers of each pipeline stage (required).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from neva_tools.errors import NevaError

GRANULARITIES = ("selective", "full")
METHODS = ("uniform", "block")
#: The NeMo ``model.`` keys this module reads.
KEYS = ("activations_checkpoint_granularity", "activations_checkpoint_method", "activations_checkpoint_num_layers")


def recompute_keys(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The activation-checkpointing keys of a run's ``model:`` section (to pass on with the LLM's own config)."""
    return {key: model_cfg.get(key) for key in KEYS}


def recompute_settings(cfg: Mapping[str, Any], num_layers: int, where: str = "model") -> dict[str, Any]:
    """The ``TransformerConfig`` recompute keywords for a block of ``num_layers`` layers (empty: no recompute).

    ``where`` names the config section in messages (``model`` for the LLM).
    """
    granularity = cfg.get("activations_checkpoint_granularity")
    if granularity is None:
        return {}
    if granularity not in GRANULARITIES:
        raise NevaError(f"{where}.activations_checkpoint_granularity is {granularity!r}; use selective, full or null")
    if granularity == "selective":
        return {"recompute_granularity": "selective"}
    method = cfg.get("activations_checkpoint_method")
    if method not in METHODS:
        raise NevaError(f"{where}.activations_checkpoint_method is {method!r}; full recompute needs uniform or block")
    count = cfg.get("activations_checkpoint_num_layers")
    if count is None and method == "block":
        raise NevaError(f"{where}.activations_checkpoint_num_layers is not set; block recompute needs the number of "
                        f"layers to recompute per pipeline stage (1 to {num_layers})")  # fmt: skip
    count = 1 if count is None else count
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= num_layers:
        raise NevaError(f"{where}.activations_checkpoint_num_layers is {count!r}; it must be 1 to {num_layers} "
                        "(the layers of one pipeline stage)")  # fmt: skip
    return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": count}


def apply_recompute(config: Any, keys: Mapping[str, Any], where: str = "model") -> Any:
    """Set the recompute settings of ``keys`` on a built ``TransformerConfig`` (the vision encoder's); return it."""
    layers = config.num_layers // max(1, config.pipeline_model_parallel_size)
    for key, value in recompute_settings(keys, layers, where).items():
        setattr(config, key, value)
    return config
