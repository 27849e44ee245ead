"""Data: LLaVA-format records, conversation templates, images, registry and sampling, packing, mmap text."""
