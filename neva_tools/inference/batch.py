"""Batched generation: several prompts and their images per forward pass, with megatron-core's KV cache.

Requests are sorted by their image-expanded length (longest first) and decoded ``batch_size`` at a time. In a batch
every prompt is left-padded in the *combined* (image-expanded) sequence, so all end at the same slot: prompt ``i``
of ``L_i`` positions gets ``L - L_i`` pad tokens in front of its ids (``L`` the batch's longest; images expand to a
per-prompt number of embeddings, AnyRes included, which megatron-core's ``LLaVAModel`` places after the pads). One
``LLaVAModel.forward`` with a ``StaticInferenceContext(max_batch_size=b)`` encodes all images and fills the cache;
each following step feeds one token per prompt to ``model.language_model`` (see
:mod:`neva_tools.inference.generate` for why not ``LLaVAModel.forward``).

Padding is invisible to the real tokens:

* attention: a ``[b, 1, q, k]`` mask (megatron's convention, ``True`` = masked) hides the pad keys (and the future
  in the prefill); a pad query attends to itself only, so no row is empty;
* RoPE: megatron-core rotates by cache slot, the same for the whole batch; here the LLM's ``rotary_pos_emb`` returns
  per-prompt embeddings ``[slots, b, 1, d]`` for the duration of the call, at slot minus the prompt's pad count, so
  every real token is rotated by its batch-1 position exactly.

Rows stop on their own (a stop token, ``max_new_tokens``, or the LLM's context); finished rows are dropped from the
batch and from the cache, so later steps only compute the unfinished ones. Greedy outputs equal
:func:`~neva_tools.inference.generate.generate`'s token for token (fp32; only floating-point rounding in the padded
matmuls differs, far below the logit gaps of real continuations).

Sampling is reproducible per request, whatever the batch size, order and neighbours: request ``i`` (its index in
``requests``) draws from its own CPU generator seeded ``Request.seed`` if given, else ``sampling.seed + i``, exactly as
``generate(..., sampling=Sampling(t, p, seed))`` does for one prompt. Every tensor-parallel rank picks the same token
(logits are gathered; sampled tokens are broadcast from the group's first rank).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from neva_tools.data.dataset import media_sizes
from neva_tools.data.images import ImageBatch
from neva_tools.data.templates import IMAGE_TOKEN_INDEX
from neva_tools.errors import NevaError
from neva_tools.inference.generate import Generation, Sampling, _logits, _Picker, as_image_batch
from neva_tools.tokenizer.text import TextTokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """One prompt: ``input_ids`` with one ``IMAGE_TOKEN_INDEX`` per image (as ``generation_prompt`` builds them),
    its ``images`` (``load_image_batch`` / ``LoadedNeva.image_processor``, AnyRes tiles included) and, optionally,
    its own sampling ``seed`` (default: ``sampling.seed`` + the request's index) and ``where`` it comes from, for
    error messages (default: ``request <index>``)."""

    input_ids: list[int]
    images: ImageBatch | None = None
    seed: int | None = None
    where: str | None = None


@dataclass
class _Prompt:
    index: int
    ids: list[int]
    images: ImageBatch
    length: int  # positions once images are expanded
    budget: int  # new tokens allowed: max_new_tokens, or fewer when the context is nearly full
    end: str  # the stop reason when the budget is used: "max_new_tokens", or "max_length" (context full)


def _prepare(model: Any, requests: Sequence[Request], max_new_tokens: int) -> list[_Prompt]:
    """Every request checked (image count, context length) before any forward pass."""
    limit = int(model.language_model.max_sequence_length)
    out = []
    for i, request in enumerate(requests):
        where = request.where or f"request {i}"
        images = as_image_batch(model, request.images)
        found = sum(1 for t in request.input_ids if t == IMAGE_TOKEN_INDEX)
        if found != len(images):
            raise NevaError(f"{where}: the prompt has {found} image token(s) but {len(images)} image(s) were given")
        if not request.input_ids:
            raise NevaError(f"{where}: the prompt has no tokens")
        length = len(request.input_ids) + int(images.tokens.sum()) - found
        if length >= limit:
            raise NevaError(f"{where}: the prompt is {length} tokens long once its {found} image(s) are expanded; "
                            f"the model's context is {limit} (encoder_seq_length): shorten the prompt")  # fmt: skip
        budget = min(max_new_tokens, limit - length)
        end = "max_new_tokens" if budget == max_new_tokens else "max_length"
        out.append(_Prompt(i, list(request.input_ids), images, length, budget, end))
    return out


@torch.no_grad()
def generate_batch(
    model: Any,
    tokenizer: TextTokenizer,
    requests: Sequence[Request],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    sampling: Sampling | None = None,
    stop_ids: Sequence[int] | None = None,
    vocab_size: int | None = None,
    on_result: Callable[[int, Generation], None] | None = None,
) -> list[Generation]:
    """The generation of every request, in request order; arguments as
    :func:`~neva_tools.inference.generate.generate`'s (``stop_ids`` default: the tokenizer's EOS; ``()`` never stops).

    ``batch_size`` prompts go through the model together (longest first). ``on_result(index, generation)`` is called
    as each batch finishes, in the order they are decoded (to save answers as they come).
    """
    if batch_size < 1:
        raise NevaError(f"batch_size must be at least 1, found {batch_size}")
    if max_new_tokens < 1:
        raise NevaError(f"max_new_tokens must be at least 1, found {max_new_tokens}")
    sampling = sampling or Sampling()
    stops = set((tokenizer.eos_id,) if stop_ids is None else stop_ids) - {None}
    prompts = sorted(_prepare(model, requests, max_new_tokens), key=lambda p: (-p.length, p.index))
    pickers = None
    if sampling.temperature > 0:
        vocab = vocab_size or tokenizer.vocab_size
        pickers = {i: _Picker(replace(sampling, seed=sampling.seed + i if r.seed is None else r.seed), vocab)
                   for i, r in enumerate(requests)}  # fmt: skip
    results: list[Generation | None] = [None] * len(requests)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            group = prompts[start : start + batch_size]
            tokens = _decode(model, group, stops, vocab_size or tokenizer.vocab_size, pickers)
            for prompt, (ids, stop) in zip(group, tokens, strict=True):
                out = Generation(ids, tokenizer.decode(ids).strip(), stop, prompt.length)
                results[prompt.index] = out
                if on_result is not None:
                    on_result(prompt.index, out)
            logger.debug("batch of %d prompts (longest %d positions) decoded", len(group), group[0].length)
    finally:
        model.train(was_training)
    return [r for r in results if r is not None]


class _Slots:
    """Per-row state of a left-padded batch: which cache slots hold real tokens and at which RoPE position."""

    def __init__(self, pads: torch.Tensor, slots: int) -> None:
        arange = torch.arange(slots, device=pads.device)
        self.valid = arange[None] >= pads[:, None]  # [b, slots]
        self.positions = (arange[None] - pads[:, None]).clamp(min=0)  # [b, slots]

    def keep(self, rows: torch.Tensor) -> None:
        self.valid, self.positions = self.valid[rows], self.positions[rows]

    def prefill_mask(self, length: int) -> torch.Tensor:
        """``[b, 1, length, length]``, ``True`` = masked: the future and the pad keys; pads see themselves."""
        eye = torch.eye(length, dtype=torch.bool, device=self.valid.device)
        causal = torch.ones(length, length, dtype=torch.bool, device=self.valid.device).tril()
        return ~((causal[None] & self.valid[:, None, :length]) | eye)[:, None]

    def decode_mask(self, keys: int) -> torch.Tensor:
        """``[b, 1, 1, keys]``: the pad keys masked."""
        return ~self.valid[:, None, None, :keys]


@contextlib.contextmanager
def _per_row_rope(language_model: Any, slots: _Slots) -> Iterator[None]:
    """The LLM's rotary embeddings per row, ``[s, b, 1, d]`` at ``slots.positions``, for the body's forwards."""
    rope = language_model.rotary_pos_emb
    base = rope.forward

    def forward(max_seq_len: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        emb = base(max_seq_len, *args, **kwargs)  # [s, 1, 1, d]
        positions = slots.positions[:, :max_seq_len].to(emb.device)
        return emb[:, 0, 0][positions.T][:, :, None]

    rope.forward = forward
    try:
        yield
    finally:
        del rope.forward  # megatron-core's (class) method again


@contextlib.contextmanager
def _left_aligned(model: Any, pads: torch.Tensor, length: int) -> Iterator[None]:
    """megatron-core's image and text merge for the body's forward, each row then moved right by its pad count.

    ``LLaVAModel`` places a row's prompt at ``[0, L_i)`` of the combined sequence and pads after it (and its
    right-padded text ids become pad embeddings there); here row ``i`` is gathered to ``[pads_i, length)`` so that
    every prompt ends at the last slot. Slots before ``pads_i`` repeat the first embedding (masked, but finite)."""
    merge = model._preprocess_data

    def preprocess(*args: Any, **kwargs: Any) -> Any:
        embeddings, labels, loss_mask = merge(*args, **kwargs)  # [s, b, h], None, None
        source = (torch.arange(length, device=pads.device)[:, None] - pads[None]).clamp(min=0)  # [length, b]
        source = source.to(embeddings.device)[..., None].expand(-1, -1, embeddings.shape[-1])
        return embeddings.gather(0, source), labels, loss_mask

    model._preprocess_data = preprocess
    try:
        yield
    finally:
        del model._preprocess_data


def _keep_rows(context: Any, rows: torch.Tensor) -> None:
    """Drop the cache rows of finished prompts (megatron-core's static cache is ``[slots, b, ...]`` per layer)."""
    memory = context.key_value_memory_dict
    for key, value in memory.items():
        if isinstance(value, tuple):
            memory[key] = tuple(t.index_select(1, rows.to(t.device)) for t in value)
    context.max_batch_size = len(rows)


def _decode(model: Any, group: list[_Prompt], stops: set[int], vocab: int,
            pickers: dict[int, _Picker] | None) -> list[tuple[list[int], str]]:  # fmt: skip
    """(new tokens, stop reason) of each prompt of ``group`` (longest first), decoded together."""
    from megatron.core.inference.contexts import StaticInferenceContext

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    length = group[0].length
    pads = torch.tensor([length - p.length for p in group], device=device)
    steps = max(p.budget for p in group)
    slots = _Slots(pads, length + steps)
    text = max(len(p.ids) for p in group)  # megatron-core merges right-padded text; _left_aligned moves it
    ids = torch.tensor([p.ids + [0] * (text - len(p.ids)) for p in group], dtype=torch.long, device=device)
    pixels = [p.images.pixels for p in group if len(p.images)]
    images = (torch.cat(pixels) if pixels else group[0].images.pixels).to(device=device, dtype=dtype)
    tiles = torch.cat([p.images.tiles for p in group]).to(device)
    placement = {}
    if hasattr(model, "image_layout"):
        placement["image_sizes"] = media_sizes([p.images.sizes for p in group]).to(device)  # [n, 3] with videos
    context = StaticInferenceContext(len(group), length + steps)
    padding = bool(pads.any())
    out: list[list[int]] = [[] for _ in group]
    stop = ["" for _ in group]
    active = list(range(len(group)))  # the rows still decoding, as indices into group (and the cache's rows)
    rope = _per_row_rope(model.language_model, slots) if padding else contextlib.nullcontext()
    with rope, _left_aligned(model, pads, length):
        mask = slots.prefill_mask(length) if padding else None
        logits = _logits(model(images, ids, torch.arange(text, device=device)[None].expand(len(group), -1), mask,
                               inference_context=context, num_image_tiles=tiles, runtime_gather_output=True,
                               **placement))[:, -1]  # fmt: skip
    with _per_row_rope(model.language_model, slots) if padding else contextlib.nullcontext():
        for step in range(steps):
            chosen = _pick(logits, [group[r].index for r in active], vocab, pickers)
            still = []
            for row, token in zip(active, chosen, strict=True):
                if token in stops:
                    stop[row] = "stop_token"
                    continue
                out[row].append(token)
                if len(out[row]) == group[row].budget:
                    stop[row] = group[row].end
                else:
                    still.append(row)
            if not still:
                break
            if len(still) < len(active):
                rows = torch.tensor([active.index(r) for r in still], device=device)
                _keep_rows(context, rows)
                slots.keep(rows)
                active = still
            context.sequence_len_offset = length + step
            keys = length + step + 1
            new = torch.tensor([[out[r][-1]] for r in active], dtype=torch.long, device=device)
            mask = slots.decode_mask(keys) if padding else None
            logits = _logits(model.language_model(input_ids=new, position_ids=slots.positions[:, keys - 1 : keys],
                                                  attention_mask=mask, inference_context=context,
                                                  runtime_gather_output=True))[:, -1]  # fmt: skip
    return list(zip(out, stop, strict=True))


def _pick(logits: torch.Tensor, indices: list[int], vocab: int, pickers: dict[int, _Picker] | None) -> list[int]:
    """The next token of each row of ``logits`` ``[b, vocab]``: greedy on the device, else each request's sampler."""
    if pickers is None:
        return logits[:, :vocab].float().argmax(dim=-1).tolist()
    return [pickers[i](row) for i, row in zip(indices, logits, strict=True)]
