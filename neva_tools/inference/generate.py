"""Token-by-token generation with megatron-core's KV cache (``StaticInferenceContext``), greedy or sampled.

The prompt (text and images) goes once through ``LLaVAModel.forward`` with the inference context: the image is
encoded, and every layer's keys and values for the whole image-expanded prompt are written to the cache. Each
following step feeds only the new token to the language model (``GPTModel.forward`` with the same context), which
appends one key/value per layer and attends to the cache, so a step costs the same whatever the prefix length.
The decode steps call ``model.language_model`` directly rather than ``LLaVAModel.forward``: megatron-core 0.16.1's
LLaVA decode path skips the image (as wanted) but returns its text embeddings batch-first where the language model
expects sequence-first, which is only harmless at batch size 1. ``use_cache=False`` recomputes the whole sequence
every step (the reference the tests compare against).

Logits are gathered over tensor-parallel ranks (``runtime_gather_output``), so every rank picks the same token;
sampled tokens are also broadcast from the first rank of the group. Sampling (temperature, top-p) is megatron-core's
own ``TextGenerationController._torch_sampling_func`` with a seeded CPU generator. Several prompts at once:
:func:`neva_tools.inference.batch.generate_batch` (the same tokens, one forward per step for the whole batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from neva_tools.data.images import ImageBatch
from neva_tools.data.templates import IMAGE_TOKEN_INDEX
from neva_tools.errors import NevaError
from neva_tools.tokenizer.text import TextTokenizer


@dataclass
class Generation:
    """Generated ids (stop token excluded), their text and why generation stopped."""

    tokens: list[int]
    text: str
    stop: str  # "stop_token", "max_new_tokens" or "max_length" (the model's context is full)
    prompt_length: int  # positions the prompt occupies once images are expanded


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature`` is 0; else softmax(logits / temperature) restricted to the top-``top_p`` mass."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise NevaError(f"temperature must be >= 0 (0 = greedy), found {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise NevaError(f"top_p must be in (0, 1], found {self.top_p}")


class _Picker:
    """Chooses the next token from full-vocabulary logits, identically on every tensor-parallel rank."""

    def __init__(self, sampling: Sampling, vocab: int) -> None:
        self.sampling, self.vocab = sampling, vocab
        self.generator = torch.Generator().manual_seed(sampling.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        logits = logits[..., : self.vocab].float().reshape(1, -1).cpu()  # one row; the generator lives on the CPU
        if self.sampling.temperature == 0:
            return int(logits.argmax(dim=-1))
        from megatron.core.inference.text_generation_controllers.text_generation_controller import (
            TextGenerationController,
        )

        top_p = 0.0 if self.sampling.top_p >= 1.0 else float(self.sampling.top_p)  # megatron: 0 = no filtering
        shim = SimpleNamespace(sampling_rng=self.generator)
        token = TextGenerationController._torch_sampling_func(shim, logits, self.sampling.temperature, 0, top_p)
        return _broadcast_from_tp_src(token.view(1))


def _broadcast_from_tp_src(token: torch.Tensor) -> int:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        token = token.to(torch.cuda.current_device()) if torch.cuda.is_available() else token  # NCCL needs CUDA
        torch.distributed.broadcast(token, parallel_state.get_tensor_model_parallel_src_rank(),
                                    group=parallel_state.get_tensor_model_parallel_group())  # fmt: skip
    return int(token[0])


def _logits(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def as_image_batch(model: Any, images: torch.Tensor | ImageBatch | None) -> ImageBatch:
    """``images`` as an ``ImageBatch``: a plain ``[n, 3, H, W]`` tensor is one view per image, counted by the
    model's layout (``image_layout``; else ``img_seq_len`` each)."""
    if isinstance(images, ImageBatch):
        if images.tokens is None:
            raise NevaError("the images were processed without a layout: build the processor as the model's "
                            "(LoadedNeva.image_processor)")  # fmt: skip
        return images
    pixels = torch.tensor([]) if images is None else images
    n = len(pixels)
    layout = getattr(model, "image_layout", None)
    per_image = model.img_seq_len if layout is None else layout.tokens(tiled=False)
    return ImageBatch(pixels, torch.ones(n, dtype=torch.int), torch.zeros(n, 2, dtype=torch.long),
                      torch.full((n,), per_image, dtype=torch.long))  # fmt: skip


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: TextTokenizer,
    input_ids: Sequence[int],
    images: torch.Tensor | ImageBatch | None = None,
    *,
    max_new_tokens: int = 64,
    sampling: Sampling | None = None,
    stop_ids: Sequence[int] | None = None,
    use_cache: bool = True,
    vocab_size: int | None = None,
) -> Generation:
    """Continue ``input_ids`` (one ``IMAGE_TOKEN_INDEX`` per image in ``images``: ``[n, 3, H, W]`` one view each, or
    an ``ImageBatch`` from ``neva_tools.inference.load.load_image_batch``, AnyRes tiles included) with ``model``.

    ``model`` is a megatron-core ``LLaVAModel``; stops at a token of ``stop_ids`` (default: the tokenizer's EOS;
    pass ``()`` to always generate ``max_new_tokens``), after ``max_new_tokens`` or when the LLM's context is full.
    Only ids below ``vocab_size`` (default: the tokenizer's) are chosen. Build prompts with
    :func:`neva_tools.inference.prompt.generation_prompt`.
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    sampling = sampling or Sampling()
    if max_new_tokens < 1:
        raise NevaError(f"max_new_tokens must be at least 1, found {max_new_tokens}")
    stops = set((tokenizer.eos_id,) if stop_ids is None else stop_ids) - {None}
    param = next(model.parameters())
    device = param.device
    batch = as_image_batch(model, images)
    images = batch.pixels.to(device=device, dtype=param.dtype)  # bf16 weights take bf16 images
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    num_images = int((ids == IMAGE_TOKEN_INDEX).sum())
    if num_images != len(batch):
        raise NevaError(f"the prompt has {num_images} image token(s) but {len(batch)} image(s) were given")
    prompt_length = ids.shape[1] + int(batch.tokens.sum()) - num_images
    limit = int(model.language_model.max_sequence_length)
    if prompt_length >= limit:
        raise NevaError(f"the prompt is {prompt_length} tokens long once its {num_images} image(s) are expanded; the "
                        f"model's context is {limit} (encoder_seq_length): shorten the prompt")  # fmt: skip
    budget = min(max_new_tokens, limit - prompt_length)
    tiles = batch.tiles.to(device)
    placement = {"image_sizes": batch.sizes.to(device)} if hasattr(model, "image_layout") else {}
    pick = _Picker(sampling, vocab_size or tokenizer.vocab_size)
    context = StaticInferenceContext(1, prompt_length + budget) if use_cache else None
    was_training = model.training
    model.eval()
    try:
        positions = torch.arange(ids.shape[1], device=device)[None]
        logits = _logits(model(images, ids, positions, None, inference_context=context, num_image_tiles=tiles,
                               runtime_gather_output=True, **placement))  # fmt: skip
        tokens: list[int] = []
        stop = "max_new_tokens" if budget == max_new_tokens else "max_length"
        for step in range(budget):
            token = pick(logits[0, -1])
            if token in stops:
                stop = "stop_token"
                break
            tokens.append(token)
            if step == budget - 1:
                break
            if context is not None:
                context.sequence_len_offset = prompt_length + step
                position = torch.tensor([[context.sequence_len_offset]], device=device)
                new = torch.tensor([[token]], device=device)
                logits = _logits(model.language_model(input_ids=new, position_ids=position,
                                                      attention_mask=None, inference_context=context,
                                                      runtime_gather_output=True))  # fmt: skip
            else:
                ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
                logits = _logits(model(images, ids, torch.arange(ids.shape[1], device=device)[None], None,
                                       num_image_tiles=tiles, runtime_gather_output=True, **placement))  # fmt: skip
    finally:
        model.train(was_training)
    return Generation(tokens, tokenizer.decode(tokens).strip(), stop, prompt_length)
