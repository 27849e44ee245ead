"""Text-pretraining data: megatron-core ``GPTDataset`` splits blended by ``BlendedMegatronDatasetBuilder``.

The blend is Megatron's ``DATA_PATH``: ``"w1 prefix1 w2 prefix2 ..."`` (what ``neva data mixture`` prints),
the same as a list, prefixes alone (weighted by their sizes), or the path of a ``neva data mixture`` YAML.
Prefixes are mmap datasets written by ``neva data preprocess`` (``.bin``/``.idx``), checked before megatron
sees them. Sample indices are built by megatron-core with its compiled helpers (``helpers_cpp``, shipped
prebuilt in the megatron-core wheel; a source install builds them with ``megatron.core.datasets.utils.
compile_helpers()``) on global rank 0 first and cached in ``index_cache``; the other ranks wait at a barrier
and read the cache, so with several nodes ``index_cache`` must be on a shared filesystem.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neva_tools.errors import NevaError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextDataSettings:
    """``model.text_pretrain`` data keys (see ``conf/neva_config.yaml``)."""

    data_path: Any
    seq_length: int
    split: str = "99,1,0"
    index_cache: Path | None = None
    seed: int = 1234
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False


class DatasetTokenizer:
    """What megatron-core's datasets need of a tokenizer (EOD, pad, vocabulary size, a cache identity)."""

    def __init__(self, path: str | os.PathLike) -> None:
        from neva_tools.tokenizer.text import TextTokenizer

        tok = TextTokenizer(path)
        if tok.eos_id is None:
            raise NevaError(f"tokenizer {path} has no EOS token, which text pretraining uses as end of document")
        self.path, self.vocab_size, self.eod, self.eos = Path(path), tok.vocab_size, tok.eos_id, tok.eos_id
        self._pad = tok.pad_id if tok.pad_id not in (tok.eos_id, tok.bos_id) else None
        digest = hashlib.sha256()
        for file in sorted(self.path.rglob("*")) if self.path.is_dir() else [self.path]:
            if file.is_file():
                digest.update(file.read_bytes())
        # The dataset cache key: the tokenizer's content, not its (possibly temporary) path.
        self.unique_identifiers = OrderedDict([("class", type(self).__name__), ("sha256", digest.hexdigest()),
                                               ("eod", self.eod), ("pad", self._pad)])  # fmt: skip

    @property
    def pad(self) -> int:
        """A pad id of its own; megatron-core falls back to -1 (never in the data) when this raises."""
        if self._pad is None:
            raise AttributeError("the tokenizer has no pad token distinct from EOS/BOS")
        return self._pad


def _as_tokens(data_path: Any) -> list[str]:
    if data_path is None:
        raise NevaError("model.text_pretrain.data_path is not set: give a blend \"0.7 web_text_document 0.3 "
                        "code_text_document\" (neva data mixture prints one) or a list of prefixes")  # fmt: skip
    if isinstance(data_path, str | os.PathLike):
        return str(data_path).split()
    if isinstance(data_path, Sequence):
        return [str(item) for item in data_path]
    raise NevaError(f"model.text_pretrain.data_path must be a string or a list, found {data_path!r}")


def _weight(token: str) -> float | None:
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_blend(data_path: Any) -> tuple[list[str], list[float] | None]:
    """(prefixes, weights or None) of a ``DATA_PATH`` blend, a list, or a ``neva data mixture`` YAML file."""
    tokens = _as_tokens(data_path)
    if len(tokens) == 1 and tokens[0].endswith((".yaml", ".yml")):
        from neva_tools.data.mixture import plan_mixture

        tokens = plan_mixture(tokens[0]).data_path.split()
    if not tokens:
        raise NevaError("model.text_pretrain.data_path is empty; give at least one dataset prefix")
    weights = [_weight(t) for t in tokens[0::2]]
    weighted = len(tokens) % 2 == 0 and all(w is not None for w in weights)
    if weighted and any(w is not None and w <= 0 for w in weights):
        raise NevaError(f"model.text_pretrain.data_path: weights must be positive, found {tokens[0::2]}")
    if not weighted and any(_weight(t) is not None for t in tokens):
        raise NevaError(f"model.text_pretrain.data_path {' '.join(tokens)!r} mixes numbers and prefixes; write "
                        "\"w1 prefix1 w2 prefix2 ...\" (weight before each prefix) or prefixes only")  # fmt: skip
    from megatron.core.datasets.utils import get_blend_from_list

    prefixes, parsed = get_blend_from_list(tokens)
    prefixes = [str(Path(p).with_suffix("")) if p.endswith((".bin", ".idx")) else p for p in prefixes]
    for prefix in prefixes:
        missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not Path(f"{prefix}{ext}").is_file()]
        if missing:
            raise NevaError(f"model.text_pretrain.data_path: dataset prefix {prefix} has no {' and '.join(missing)}; "
                            "create it with neva data preprocess (relative prefixes are read from the current "
                            "directory)")  # fmt: skip
        from neva_tools.data.mmap import count_tokens

        try:
            count_tokens(prefix)  # the .bin against its .idx (sizes, counts), and not empty
        except NevaError as exc:
            raise NevaError(f"model.text_pretrain.data_path: {exc}") from None
    if len(set(prefixes)) != len(prefixes):
        raise NevaError(f"model.text_pretrain.data_path lists a prefix twice ({prefixes}); list it once")
    return list(prefixes), (list(parsed) if parsed is not None else None)


def build_text_datasets(settings: TextDataSettings, tokenizer: DatasetTokenizer, train_samples: int,
                        valid_samples: int) -> tuple[Any, Any]:  # fmt: skip
    """(train, valid or None) datasets of at least the requested sizes; collective over all ranks."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    blend = parse_blend(settings.data_path)
    try:
        config = GPTDatasetConfig(
            random_seed=settings.seed, sequence_length=settings.seq_length, blend=blend, split=str(settings.split),
            path_to_cache=str(settings.index_cache) if settings.index_cache else None, tokenizer=tokenizer,
            reset_position_ids=settings.reset_position_ids, reset_attention_mask=settings.reset_attention_mask,
            eod_mask_loss=settings.eod_mask_loss, create_attention_mask=settings.reset_attention_mask,
        )  # fmt: skip
        train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [train_samples, valid_samples, 0],
                                                        lambda: True, config).build()  # fmt: skip
    except (AssertionError, ValueError, IndexError) as exc:
        raise NevaError(f"megatron-core could not build the text datasets from data_path {settings.data_path!r} "
                        f"with split {settings.split!r} and seq_length {settings.seq_length}: "
                        f"{exc or type(exc).__name__}; check that each split holds documents") from None  # fmt: skip
    if train is None or len(train) < train_samples:
        found = 0 if train is None else len(train)
        raise NevaError(f"the train split of {settings.data_path!r} gives {found} samples, fewer than the "
                        f"{train_samples} needed; give it a larger share of split {settings.split!r}")  # fmt: skip
    if valid_samples and valid is None:
        raise NevaError(f"model.text_pretrain.split {settings.split!r} gives the validation split no documents; "
                        "give it a share (e.g. 98,2,0) or set model.text_pretrain.eval_interval=0")  # fmt: skip
    return train, valid


def collate_text(samples: list[dict[str, Any]], vocab_size: int) -> dict[str, torch.Tensor]:
    """Stack ``GPTDataset`` samples into a batch (``tokens`` renamed ``input_ids``); ids must fit the vocabulary."""
    batch = torch.utils.data.default_collate(samples)
    batch["input_ids"] = batch.pop("tokens")
    batch.pop("dataset_id", None)
    top = int(max(batch["input_ids"].max(), batch["labels"].max()))
    if top >= vocab_size:
        raise NevaError(f"the text data holds token id {top} but the LLM's vocabulary has {vocab_size} ids; "
                        "preprocess the corpus with the LLM's tokenizer (neva data preprocess)")  # fmt: skip
    return batch
