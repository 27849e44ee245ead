"""Format conversion between Hugging Face checkpoints and ``.nemo`` archives, streaming one tensor at a time."""
