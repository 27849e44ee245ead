"""Megatron-LM's ``tools/preprocess_data.py`` and NEO's ``count_mmap_token.py`` flags, mapped onto our functions.

``neva data preprocess``/``count-tokens`` and the drop-ins ``scripts/preprocess_data.py`` and
``scripts/count_mmap_token.py`` share these flags. Each of Megatron's flags is honoured, accepted with a note, or
refused with the reason:

- honoured: ``--input`` (a glob too), ``--output-prefix``, ``--json-keys`` (one ``PREFIX_KEY_document`` pair per key),
  ``--append-eod``, ``--workers``, ``--tokenizer-type`` with ``--tokenizer-model`` (SentencePieceTokenizer,
  GPTSentencePieceTokenizer, Llama2Tokenizer: a sentencepiece ``.model``; HuggingFaceTokenizer: a local tokenizer
  directory) or with ``--vocab-file``/``--merge-file`` (GPT2BPETokenizer), ``--dataset-impl mmap``;
- accepted, nothing to do: ``--keep-sequential-samples`` (documents always keep the input order), ``--partitions``
  (one pass writes the single pair Megatron merges its partitions into), ``--log-interval`` (a progress bar instead),
  ``--keep-empty`` (empty documents are always kept), ``--keep-newlines``/``--lang`` (only for ``--split-sentences``),
  ``--vocab-size`` (only for NullTokenizer), the ``--find-optimal-num-workers`` companions;
- refused: ``--split-sentences``, ``--find-optimal-num-workers``, ``--vocab-extra-ids`` above 0, ``--dataset-impl``
  other than mmap, tokenizer types other than the above (BERT, tiktoken, Null, multimodal).

Documents end with the tokenizer's EOS under ``--append-eod``. Megatron's SentencePieceTokenizer instead appends
``<EOD>``, an id it adds past the sentencepiece vocabulary when the model has no such piece; that id does not exist
in the LLM converted from the same tokenizer, so the EOS (what GPTSentencePieceTokenizer and Llama2Tokenizer use)
is written and a note says so.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from neva_tools.cli.common import positive_int
from neva_tools.errors import NevaError
from neva_tools.utils.temporaries import scratch

logger = logging.getLogger(__name__)

SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
HF_TYPE = "HuggingFaceTokenizer"
GPT2_TYPE = "GPT2BPETokenizer"
TOKENIZER_TYPES = (*SENTENCEPIECE_TYPES, HF_TYPE, GPT2_TYPE)


@dataclass
class PreprocessJob:
    """What to run: ``preprocess_jsonl`` once per JSON key, with a tokenizer file or directory."""

    inputs: list[Path]
    output_prefix: str
    json_keys: list[str]
    append_eod: bool
    workers: int
    tokenizer: Path | None = None  # None: a GPT-2 tokenizer built from ``gpt2_files`` at run time
    gpt2_files: tuple[Path, Path] | None = None
    notes: list[str] = field(default_factory=list)


def add_preprocess_flags(parser: argparse.ArgumentParser, *, dropin: bool) -> None:
    """The flags of ``neva data preprocess`` (``dropin=False``) or of the Megatron drop-in (``dropin=True``)."""
    parser.add_argument("--input", nargs="+", required=True, help="JSONL file(s), one document per line (a glob too)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX_<json key>_document.bin/.idx")
    if not dropin:
        parser.add_argument("--json-key", help="the field holding the text (default text)")
        parser.add_argument("--tokenizer", help="sentencepiece .model or HF tokenizer directory")
        parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the tokenizer's EOS")
    parser.add_argument("--workers", type=positive_int, default=1, help="tokenizer processes (default 1)")
    g = parser.add_argument_group(
        "Megatron-LM tools/preprocess_data.py flags",
        "accepted as Megatron spells them; flags with nothing to do here are noted, the rest refused with the reason",
    )
    g.add_argument("--json-keys", nargs="+", help="fields to tokenize, one output pair per key (default text)")
    g.add_argument("--tokenizer-type", help=f"one of {', '.join(TOKENIZER_TYPES)}")
    g.add_argument("--tokenizer-model", help="sentencepiece .model, or a HF tokenizer directory")
    g.add_argument("--vocab-file", help="GPT2BPETokenizer: the BPE vocabulary (vocab.json)")
    g.add_argument("--merge-file", help="GPT2BPETokenizer: the BPE merges (merges.txt)")
    g.add_argument("--dataset-impl", help="only mmap is written")
    g.add_argument("--keep-sequential-samples", action="store_true", help="always so: documents keep the input order")
    g.add_argument("--partitions", type=positive_int, help="accepted: one pass writes one .bin/.idx pair")
    g.add_argument("--log-interval", type=positive_int, help="accepted: progress shows as a bar")
    g.add_argument("--keep-empty", action="store_true", help="always so: empty documents are kept")
    g.add_argument("--split-sentences", action="store_true", help="refused: documents are tokenized whole")
    g.add_argument("--keep-newlines", action="store_true", help="only with --split-sentences")
    g.add_argument("--lang", help="only with --split-sentences")
    g.add_argument("--vocab-size", type=int, help="only for NullTokenizer (not supported)")
    g.add_argument("--vocab-extra-ids", type=int, default=0, help="refused above 0 (T5 sentinel tokens)")
    g.add_argument("--find-optimal-num-workers", action="store_true", help="refused: a benchmark mode")
    g.add_argument("--workers-to-check", nargs="+", help="only with --find-optimal-num-workers")
    g.add_argument("--max-documents", type=int, help="only with --find-optimal-num-workers")
    g.add_argument("--performance-dir", help="only with --find-optimal-num-workers")


def _refuse(flag: str, value: object, why: str) -> NevaError:
    shown = "" if value is True else f" {value}"
    return NevaError(f"{flag}{shown} is not supported: {why}")


def _inputs(patterns: Sequence[str]) -> list[Path]:
    """The input files; a pattern that names no file is expanded as a glob (Megatron's ``--partitions`` reading)."""
    found: list[Path] = []
    for pattern in patterns:
        if not Path(pattern).exists() and glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise NevaError(f"--input {pattern} matches no file; give existing JSONL files")
            found += [Path(m) for m in matches]
        else:
            found.append(Path(pattern))
    return found


def _json_keys(args: argparse.Namespace) -> list[str]:
    ours, megatron = getattr(args, "json_key", None), args.json_keys
    if ours is not None and megatron is not None and [ours] != list(megatron):
        raise NevaError(f"--json-key {ours} and --json-keys {' '.join(megatron)} disagree; give one of them")
    keys = [ours] if ours is not None else list(megatron or ["text"])
    if any(not k for k in keys) or len(set(keys)) != len(keys):
        raise NevaError(f"--json-keys {' '.join(map(repr, keys))} must be distinct, non-empty field names")
    return keys


def _ignored_flags(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(notes, ignored-flag warnings) for the flags that need nothing here; refuse the ones we cannot honour."""
    if args.split_sentences:
        raise _refuse("--split-sentences", True, "documents are tokenized whole into PREFIX_KEY_document (no NLTK "
                      "sentence splitting, no _sentence outputs); drop the flag")  # fmt: skip
    if args.find_optimal_num_workers:
        raise _refuse("--find-optimal-num-workers", True, "it is a benchmark mode of Megatron's tool; choose "
                      "--workers yourself (the output does not depend on it)")  # fmt: skip
    if args.vocab_extra_ids:
        raise _refuse("--vocab-extra-ids", args.vocab_extra_ids, "T5 sentinel tokens are not added; add tokens to "
                      "the tokenizer with neva tokenizer add-tokens and drop the flag")  # fmt: skip
    if args.dataset_impl is not None and args.dataset_impl != "mmap":
        raise _refuse("--dataset-impl", args.dataset_impl, "only the mmap format (.bin/.idx) is written, the one "
                      "megatron-core reads; use --dataset-impl mmap or drop it")  # fmt: skip
    notes, ignored = [], []
    if args.keep_sequential_samples:
        notes.append("--keep-sequential-samples: documents always keep the input order")
    if args.keep_empty:
        notes.append("--keep-empty: empty documents are always kept (one empty sequence, or [EOD])")
    only_split, only_find = "it only applies with --split-sentences", "it only applies with --find-optimal-num-workers"
    reasons = {
        "--partitions": (args.partitions, "one pass writes the single pair Megatron merges its partitions into"),
        "--log-interval": (args.log_interval, "progress shows as a bar"),
        "--keep-newlines": (True if args.keep_newlines else None, only_split),
        "--lang": (args.lang, only_split),
        "--vocab-size": (args.vocab_size, "only NullTokenizer uses it"),
        "--workers-to-check": (args.workers_to_check, only_find),
        "--max-documents": (args.max_documents, only_find),
        "--performance-dir": (args.performance_dir, only_find),
    }
    for flag, (value, why) in reasons.items():
        if value is not None:
            shown = "" if value is True else " " + " ".join(map(str, value if isinstance(value, list) else [value]))
            ignored.append(f"ignoring {flag}{shown}: {why}")
    return notes, ignored


def _tokenizer(args: argparse.Namespace, notes: list[str]) -> tuple[Path | None, tuple[Path, Path] | None]:
    """(tokenizer path, or the GPT-2 vocab/merges files) from ``--tokenizer`` or Megatron's tokenizer flags."""
    ours, kind, model = getattr(args, "tokenizer", None), args.tokenizer_type, args.tokenizer_model
    if ours is not None and model is not None:
        raise NevaError(f"--tokenizer {ours} and --tokenizer-model {model} both name a tokenizer; give one of them")
    path = Path(ours if ours is not None else model) if (ours or model) else None
    if kind is not None and kind not in TOKENIZER_TYPES:
        raise NevaError(f"--tokenizer-type {kind} is not supported; use one of {', '.join(TOKENIZER_TYPES)} "
                        "(BERT, tiktoken, Null and multimodal tokenizers are not: prepare GPT-style text with the "
                        "LLM's own tokenizer)")  # fmt: skip
    if kind == GPT2_TYPE or (kind is None and path is None and (args.vocab_file or args.merge_file)):
        if path is not None or not (args.vocab_file and args.merge_file):
            raise NevaError(f"--tokenizer-type {GPT2_TYPE} takes --vocab-file VOCAB.json and --merge-file "
                            f"MERGES.txt (found --vocab-file {args.vocab_file}, --merge-file {args.merge_file}"
                            f"{f', --tokenizer-model {path}' if path else ''})")  # fmt: skip
        files = (Path(args.vocab_file), Path(args.merge_file))
        for flag, file in zip(("--vocab-file", "--merge-file"), files, strict=True):
            if not file.is_file():
                raise NevaError(f"{flag} {file} does not exist")
        return None, files
    if path is None:
        raise NevaError("no tokenizer given: pass --tokenizer-model tokenizer.model (or --tokenizer, a sentencepiece "
                        "model or a Hugging Face tokenizer directory)")  # fmt: skip
    for flag, value in (("--vocab-file", args.vocab_file), ("--merge-file", args.merge_file)):
        if value is not None:
            notes.append(f"{flag} {value} is not used by --tokenizer-type {kind or 'inferred from the path'} "
                         "(as in Megatron)")  # fmt: skip
    if not path.exists():
        raise NevaError(f"tokenizer {path} does not exist (a sentencepiece .model file or a Hugging Face tokenizer "
                        "directory; hub names are not downloaded: fetch it first with hf download NAME --local-dir "
                        "DIR)")  # fmt: skip
    if kind in SENTENCEPIECE_TYPES and not path.is_file():
        raise NevaError(f"--tokenizer-type {kind} needs a sentencepiece .model file, but {path} is a directory; "
                        f"use --tokenizer-type {HF_TYPE} for a Hugging Face tokenizer directory")  # fmt: skip
    if kind == HF_TYPE and not path.is_dir():
        raise NevaError(f"--tokenizer-type {HF_TYPE} needs a Hugging Face tokenizer directory, but {path} is a "
                        f"file; use --tokenizer-type {SENTENCEPIECE_TYPES[0]} for a sentencepiece .model")  # fmt: skip
    if kind == "SentencePieceTokenizer" and args.append_eod:
        notes.append("--tokenizer-type SentencePieceTokenizer --append-eod: documents end with the model's EOS; "
                     "Megatron would append its own <EOD> id past the sentencepiece vocabulary, which the LLM "
                     "converted from this tokenizer does not have")  # fmt: skip
    return path, None


def preprocess_job(args: argparse.Namespace) -> PreprocessJob:
    """Check the parsed flags and map them onto ``preprocess_jsonl``; NevaError names a flag that cannot be honoured."""
    notes, ignored = _ignored_flags(args)
    tokenizer, gpt2 = _tokenizer(args, notes)
    return PreprocessJob(inputs=_inputs(args.input), output_prefix=args.output_prefix, json_keys=_json_keys(args),
                         append_eod=args.append_eod, workers=args.workers, tokenizer=tokenizer, gpt2_files=gpt2,
                         notes=notes + ignored)  # fmt: skip


@contextlib.contextmanager
def _tokenizer_path(job: PreprocessJob) -> Iterator[Path]:
    """The job's tokenizer; GPT-2 BPE files become a temporary Hugging Face directory (what Megatron's GPT-2 does)."""
    if job.gpt2_files is None:
        assert job.tokenizer is not None
        yield job.tokenizer
        return
    from transformers import GPT2Tokenizer

    vocab, merges = job.gpt2_files
    with scratch() as tmp:
        try:
            GPT2Tokenizer(vocab=str(vocab), merges=str(merges)).save_pretrained(tmp)
        except (OSError, ValueError, KeyError) as exc:
            raise NevaError(f"--vocab-file {vocab} and --merge-file {merges} are not a GPT-2 BPE pair: {exc}") from None
        yield Path(tmp)


def run_preprocess_job(job: PreprocessJob, *, overwrite: bool) -> list:
    """Run ``preprocess_jsonl`` for every JSON key of ``job``; the ``PreprocessSummary`` of each."""
    from neva_tools.data.mmap import preprocess_jsonl

    for note in job.notes:
        (logger.warning if note.startswith("ignoring") else logger.info)("%s", note)
    with _tokenizer_path(job) as tokenizer:
        return [preprocess_jsonl(job.inputs, job.output_prefix, tokenizer, json_key=key, append_eod=job.append_eod,
                                 workers=job.workers, overwrite=overwrite) for key in job.json_keys]  # fmt: skip


def parse_dropin(parser: argparse.ArgumentParser, argv: Sequence[str], tool: str) -> argparse.Namespace:
    """Parse a drop-in's flags; unknown ones are one error listing all of them (exit status 2)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.exit(2, f"ERROR: {tool} does not take {' '.join(unknown)}; the flags it takes are listed by --help\n")
    return args


def run_dropin(body: Callable[[], None]) -> int:
    """Run a drop-in's ``body`` inside the CLI's error boundary: our errors (a NevaError, a full disk, an unreadable
    file) are printed as ``ERROR: ...`` with exit status 2, Ctrl-C exits 130 (``neva_tools.cli.boundary``)."""
    from neva_tools.cli import boundary
    from neva_tools.utils.log import setup_logging

    setup_logging()
    return boundary.run_dropin(body)
