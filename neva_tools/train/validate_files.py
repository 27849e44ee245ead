"""The rules of ``neva config validate`` that read the files a training config references.

The vision encoder's config (not its weights), the data's annotation files and image folders, the LLM ``.nemo``
(its config; TP divides heads, query groups and FFN; ``max_seq_length`` fits ``encoder_seq_length``), its
tokenizer (holds EOS, every template's special tokens and, with ``mm_cfg.use_im_start_end``, the two
``mm_cfg.im_start_end_tokens``, NeMo's ``<extra_id_4/5>`` or LLaVA-1's ``<im_start>``/``<im_end>``;
NeVA gives tokens beyond the LLM's vocabulary rows of their own, see ``neva_tools.model.added_vocab``; text
pretraining needs it to fit the vocabulary) and stage 1's projector (its sizes match both models). Each function
returns problems naming the key and the values involved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from neva_tools.config import derived
from neva_tools.data.templates import get_template
from neva_tools.errors import NevaError
from neva_tools.model.neva import PROJECTOR_TYPES


def vision_arch_problems(source: str) -> tuple[Any, list[str]]:
    """(architecture or None, problems) of the vision encoder's config."""
    from neva_tools.train.vision_arch import vision_arch

    try:
        return vision_arch(source), []
    except NevaError as exc:
        return None, [f"model.mm_cfg.vision_encoder.from_pretrained ({source}): {exc}"]


def vision_problems(cfg: DictConfig) -> tuple[Any, list[str]]:
    """The vision encoder's source exists in a form ``neva train`` reads (see ``read_clip_vision``)."""
    from neva_tools.train.vision_arch import open_clip_name

    key, source = "model.mm_cfg.vision_encoder.from_pretrained", cfg.model.mm_cfg.vision_encoder.from_pretrained
    if source is None:
        return None, [f"{key} is not set (a CLIP directory or open_clip NAME:CHECKPOINT)"]
    source = str(source)
    if Path(source).is_dir():
        return vision_arch_problems(source)
    if open_clip_name(source) is not None and not Path(source).exists():
        checkpoint = source.split(":", 1)[1] if ":" in source else None
        if checkpoint is None or not Path(checkpoint).is_file():
            return None, [f"{key} ({source}): open_clip model {open_clip_name(source)} needs a local checkpoint "
                          f"file as NAME:CHECKPOINT, found {checkpoint!r}"]  # fmt: skip
        return vision_arch_problems(source)
    hint = f" (hf download {source} --local-dir {Path(source).name})" if source.count("/") == 1 else ""
    return None, [f"{key} ({source}) is not a local CLIP directory (Hugging Face config.json or open_clip "
                  f"open_clip_config.json) nor open_clip NAME:CHECKPOINT; download hub models first{hint}"]  # fmt: skip


def templates_used(cfg: DictConfig, uses: list[Any]) -> list[str]:
    """Every conversation template the data will be rendered with (registry entries may name their own)."""
    names = [str(cfg.model.data.conv_template)] + [use.spec.template for use in uses if use.spec.template]
    return [n for n in dict.fromkeys(names) if _template_problem(n) is None]


def _template_problem(name: str) -> str | None:
    """Why ``name`` is no template (ours, or LLaVA's/NeMo's name for one of ours), or None."""
    try:
        get_template(name)
    except NevaError as exc:
        return str(exc)
    return None


def data_problems(cfg: DictConfig) -> tuple[list[Any], list[str]]:
    """(dataset uses, problems): annotation files and image folders exist, registry names and templates are known."""
    from neva_tools.train.run import _datasets

    data, problems = cfg.model.data, []
    if data.data_path is None:
        return [], ["model.data.data_path is not set (an annotation file or registry names like cc3m%50)"]
    if data.image_folder is not None and not Path(data.image_folder).is_dir():
        problems.append(f"model.data.image_folder ({data.image_folder}) is not a directory")
    try:
        uses = _datasets(cfg)
    except NevaError as exc:
        return [], [*problems, f"model.data.data_path ({data.data_path}): {exc}"]
    for use in uses:
        spec = use.spec
        if not spec.annotation_path.is_file():
            problems.append(f"dataset {spec.name}: annotation file {spec.annotation_path} does not exist")
        if spec.data_path is not None and not spec.data_path.is_dir():
            problems.append(f"dataset {spec.name}: image folder {spec.data_path} is not a directory")
        if spec.template is not None and (why := _template_problem(spec.template)) is not None:
            problems.append(f"dataset {spec.name}: template ({spec.template}): {why}")
    return uses, problems


def llm_problems(cfg: DictConfig, *, templates: list[str], neva: bool = True) -> list[str]:
    """The LLM .nemo against TP, the sequence length (NeVA) and the tokenizer."""
    from neva_tools.checkpoint import tp as tp_rules
    from neva_tools.checkpoint.nemo_archive import NemoArchive
    from neva_tools.checkpoint.nemo_tensors import load_arch
    from neva_tools.model.gpt import gpt_model_kwargs

    m, problems = cfg.model, []
    key, llm = "model.mm_cfg.llm.from_pretrained", m.mm_cfg.llm.from_pretrained
    if llm is None:
        return [f"{key} is not set (the LLM .nemo from neva convert hf-to-nemo)"]
    if not Path(llm).is_file():
        return [f"{key} ({llm}) does not exist"]
    tp = int(m.tensor_model_parallel_size)
    try:
        with NemoArchive(llm) as archive:
            llm_cfg, arch = load_arch(archive)
        kwargs = gpt_model_kwargs(llm_cfg)
    except NevaError as exc:
        return [f"{key} ({llm}): {exc}"]
    try:
        tp_rules.check_divisible(tp, num_attention_heads=arch.num_heads, num_query_groups=arch.num_groups,
                                 ffn_hidden_size=arch.ffn_hidden_size)  # fmt: skip
    except NevaError as exc:
        problems.append(f"{exc} of {llm}")
    problems += derived.llm_problems(cfg, llm, llm_cfg)
    if neva:
        if kwargs["position_embedding_type"] != "rope":
            problems.append(f"{llm} has position_embedding_type {kwargs['position_embedding_type']}; NeVA needs rope")
        seq, longest = int(m.data.max_seq_length), int(kwargs["max_sequence_length"])
        if seq > longest:
            problems.append(f"model.data.max_seq_length ({seq}) exceeds the LLM's encoder_seq_length ({longest}) in "
                            f"{llm}: megatron-core's LLaVAModel would cut every longer sequence")  # fmt: skip
    return problems + _tokenizer(cfg, llm, llm_cfg, arch.vocab_size, templates, neva=neva)


def _tokenizer(cfg: DictConfig, llm: str, llm_cfg: dict[str, Any], vocab: int, templates: list[str], *,
               neva: bool = True) -> list[str]:  # fmt: skip
    """The tokenizer holds EOS, the templates' special tokens and (``use_im_start_end``) the image start/end tokens;
    for text pretraining it fits the LLM's vocabulary (NeVA training gives added tokens rows of their own)."""
    from neva_tools.data.templates import add_wrap_tokens_command, image_wrap, required_special_tokens
    from neva_tools.model import neva_io
    from neva_tools.tokenizer.text import TextTokenizer

    m, problems = cfg.model, []
    try:
        path = m.tokenizer.model or neva_io.extract_tokenizer(llm, neva_io.scratch_dir())
        tok = TextTokenizer(path)
    except NevaError as exc:
        return [f"model.tokenizer.model: {exc}"]
    tp = int(m.tensor_model_parallel_size)
    divisible = int(llm_cfg.get("make_vocab_size_divisible_by") or 128)
    if tok.vocab_size > vocab and not neva:
        problems.append(f"tokenizer {path} has {tok.vocab_size} tokens (added tokens included) but the LLM {llm} "
                        f"has a {vocab}-token vocabulary (padded to {neva_io.llm_padded_vocab(llm_cfg, vocab, tp)} "
                        f"rows = a multiple of make_vocab_size_divisible_by {divisible} × TP {tp}); every token needs "
                        "a trained embedding row: use the LLM's own tokenizer or convert an LLM whose vocabulary holds "
                        "the added tokens")  # fmt: skip
    if tok.eos_id is None:
        problems.append(f"tokenizer {path} has no EOS token; every template ends a turn with it")
    for template in templates:
        missing = [t for t in required_special_tokens(template) if tok.token_id(t) is None]
        if missing:
            problems.append(f"tokenizer {path} lacks {missing} needed by template {template}; add them with neva "
                            "tokenizer add-tokens")  # fmt: skip
    try:
        wrap = image_wrap(m.mm_cfg) if neva else None
    except NevaError:
        wrap = None  # a malformed im_start_end_tokens is a problem of validate._neva
    if wrap is not None:
        missing = [t for t in wrap if tok.token_id(t) is None]
        if missing:
            new = Path(path).with_name(f"{Path(path).stem}_neva{Path(path).suffix}")
            problems.append(f"model.mm_cfg.use_im_start_end is true but tokenizer {path} lacks {', '.join(missing)} "
                            f"(every image is wrapped in {wrap[0]} ... {wrap[1]}, model.mm_cfg.im_start_end_tokens); "
                            f"add them with `{add_wrap_tokens_command(path, new, wrap)}` and set "
                            f"model.tokenizer.model={new}")  # fmt: skip
    return problems


def projector_problems(cfg: DictConfig, arch: Any) -> list[str]:
    """Stage 2's stage-1 ``.nemo`` (or LLaVA's ``mm_projector.bin``) holds a projector of the configured type whose
    sizes match both models."""
    from neva_tools.checkpoint.nemo_archive import NemoArchive
    from neva_tools.checkpoint.nemo_tensors import load_arch
    from neva_tools.mappings.projector import table
    from neva_tools.model.projector_io import is_llava_file, read_projector

    m = cfg.model
    key, source = "model.mm_cfg.pretrain_mm_mlp_adapter", m.mm_cfg.pretrain_mm_mlp_adapter
    kind = str(m.mm_cfg.mm_mlp_adapter_type)
    if source is None or kind not in PROJECTOR_TYPES:
        return []
    if not Path(source).is_file():
        return [f"{key} ({source}) does not exist; run stage 1 first (its run writes NAME/NAME.nemo)"]
    try:
        if is_llava_file(source):  # LLaVA's mm_projector.bin: small, read whole
            rows, cols = read_projector(source, kind)[table(kind)[0].hf[0]].shape
        else:
            with NemoArchive(source) as archive:
                state = archive.lazy_legacy(0, 0) if archive.layout == "legacy" else {}
                names = [e.hf[0] for e in table(kind)]
                missing = [n for n in names if n not in state]
                if missing:
                    return [f"{key} ({source}) holds no {kind} projector (missing {', '.join(missing)})"]
                rows, cols = state.shape(names[0])
        llm = m.mm_cfg.llm.from_pretrained
        if llm is not None and Path(llm).is_file():
            with NemoArchive(llm) as archive:
                hidden = load_arch(archive)[1].hidden_size
            if rows != hidden:
                return [f"{key} ({source}) projects to {rows} features but the LLM hidden size is {hidden}"]
    except NevaError as exc:
        return [f"{key} ({source}): {exc}"]
    if arch is not None and cols != arch.hidden_size:
        return [f"{key} ({source}) takes {cols} vision features but the vision encoder's hidden size is "
                f"{arch.hidden_size}"]  # fmt: skip
    return []
