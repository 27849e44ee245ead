"""Model building on megatron-core: CPU compatibility, parallel state set-up and GPT language models."""
