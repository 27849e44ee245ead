"""Tokenizer tools: adding special tokens to sentencepiece and Hugging Face tokenizers, inspection."""
