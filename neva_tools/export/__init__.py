"""Whole NeVA models out to and in from Hugging Face ``LlavaForConditionalGeneration`` directories."""
