"""Checkpoint files: Hugging Face readers/writers, the ``.nemo`` archive, tensor-parallel split/merge rules."""
