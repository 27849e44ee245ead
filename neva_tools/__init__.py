"""NeVA Recipes: tools and recipes for training LLaVA-style (NeVA) vision-language models."""

__version__ = "0.1.0"
