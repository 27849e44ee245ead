"""Carrying tokenizers between Hugging Face directories and ``.nemo`` artifacts.

A sentencepiece ``tokenizer.model`` becomes NeMo's ``tokenizer.model: nemo:<uuid>_tokenizer.model``
(``library: sentencepiece``). The Hugging Face tokenizer files (and ``generation_config.json``) are kept
as a directory artifact ``<uuid>_hf_tokenizer`` referenced by ``tokenizer.hf_files`` so that an export
gives back the same files; when there is no sentencepiece model, that directory is the tokenizer
(``library: huggingface``, ``type: nemo:<uuid>_hf_tokenizer``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from neva_tools.checkpoint.nemo_archive import NemoArchive, artifact_name
from neva_tools.checkpoint.nemo_writer import NemoWriter
from neva_tools.errors import NevaError

HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)


def add_tokenizer(writer: NemoWriter, src: Path) -> dict[str, Any] | None:
    """Store the tokenizer files of HF directory ``src`` in the archive; return NeMo's ``tokenizer:`` section."""
    sp_model = src / "tokenizer.model"
    hf_files = [src / name for name in HF_TOKENIZER_FILES if (src / name).is_file()]
    section: dict[str, Any] = {
        "library": "sentencepiece",
        "type": None,
        "model": None,
        "vocab_file": None,
        "merge_file": None,
        "delimiter": None,
        "sentencepiece_legacy": False,
    }
    if hf_files:
        name = artifact_name("hf_tokenizer")
        for file in hf_files:
            writer.add_file(f"{name}/{file.name}", file)
        section["hf_files"] = f"nemo:{name}"
    if sp_model.is_file():
        name = artifact_name("tokenizer.model")
        writer.add_file(name, sp_model)
        section["model"] = f"nemo:{name}"
    elif hf_files:
        section.update(library="huggingface", type=section["hf_files"], use_fast=True)
    else:
        return None
    return section


def export_tokenizer(archive: NemoArchive, section: dict[str, Any] | None, dest: Path, scratch: Path) -> list[str]:
    """Write the tokenizer files stored in ``archive`` into HF directory ``dest``; return the file names."""
    if not section:
        return []
    if not isinstance(section, dict):
        raise NevaError(f"{archive.path}: model_config.yaml's tokenizer is {section!r}; it must be a mapping (library, "
                        "type, model, ...) as NeMo writes it: fix the value or remove the key")  # fmt: skip
    written = []
    hf_ref = section.get("hf_files") or (section.get("type") if section.get("library") == "huggingface" else None)
    if isinstance(hf_ref, str) and hf_ref.startswith("nemo:"):
        folder = archive.artifact(hf_ref, scratch)
        for file in sorted(folder.iterdir()):
            shutil.copyfile(file, dest / file.name)
            written.append(file.name)
    model_ref = section.get("model")
    if isinstance(model_ref, str) and model_ref.startswith("nemo:"):
        shutil.copyfile(archive.artifact(model_ref, scratch), dest / "tokenizer.model")
        written.append("tokenizer.model")
    return written
