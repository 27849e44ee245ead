"""Tensor re-layouts between Hugging Face and megatron-core: fused QKV and gated-MLP halves."""

from __future__ import annotations

import torch


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """Interleave separate q/k/v (weights or biases) into megatron-core's group-major fused layout.

    For each KV group g: ``[q heads of g, k_g, v_g]``, groups stacked along dim 0.
    """
    head_dim = q.shape[0] // num_heads
    rest = q.shape[1:]
    q = q.reshape(num_groups, (num_heads // num_groups) * head_dim, *rest)
    k = k.reshape(num_groups, head_dim, *rest)
    v = v.reshape(num_groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def unfuse_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of ``fuse_qkv``: split a fused QKV tensor into q, k and v."""
    head_dim = qkv.shape[0] // (num_heads + 2 * num_groups)
    per_group = num_heads // num_groups
    rest = qkv.shape[1:]
    grouped = qkv.reshape(num_groups, (per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def fuse_gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """megatron-core's ``linear_fc1`` for SwiGLU: ``[gate; up]`` along dim 0."""
    return torch.cat([gate, up], dim=0)


def unfuse_gated(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``linear_fc1`` back into (gate, up)."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up
