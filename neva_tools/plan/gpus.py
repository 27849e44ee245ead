"""GPU models ``neva plan`` knows, and its default MFU assumption (no heavy imports: the CLI's help reads them)."""

from __future__ import annotations

#: Dense bf16 peak TFLOP/s (no sparsity) and memory (GB) per GPU, from NVIDIA's data sheets (SXM parts).
GPUS: dict[str, tuple[float, int]] = {"H100": (989.0, 80), "H200": (989.0, 141), "A100": (312.0, 80)}
#: Model FLOPs utilisation assumed for step times (overridable with ``--mfu``).
DEFAULT_MFU = 0.35
