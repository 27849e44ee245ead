"""Inference with trained NeVA models: loading a ``.nemo``, KV-cached generation, scoring and evaluation."""
