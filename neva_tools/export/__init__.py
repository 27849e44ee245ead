"""Whole NeVA models out to and in from Hugging Face LLaVA, LLaVA-NeXT and LLaVA-OneVision directories."""
