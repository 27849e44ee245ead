"""KV-cached generation: equal to full recomputation, one token per step into the LLM, stop conditions, sampling."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from dist_helpers import in_process_distributed

from neva_tools.data.records import Turn
from neva_tools.data.templates import IMAGE_TOKEN_INDEX, tokenize_conversation
from neva_tools.errors import NevaError
from neva_tools.inference.generate import Sampling, generate
from neva_tools.inference.load import LoadedNeva, load_images, load_neva
from neva_tools.inference.prompt import answer_span, generation_prompt, stop_token_ids, user_message

QUESTION = "What colour is the shape? Answer with one word."


@pytest.fixture(scope="module")
def loaded(neva_run: dict[str, Any]) -> Iterator[LoadedNeva]:
    with in_process_distributed():
        yield load_neva(neva_run["nemo"])


@pytest.fixture(scope="module")
def prompt(loaded: LoadedNeva, neva_run: dict[str, Any]) -> tuple[list[int], torch.Tensor]:
    turns = [Turn("user", user_message(QUESTION, 1))]
    ids = generation_prompt(turns, loaded.template, loaded.tokenizer).input_ids
    return ids, load_images([neva_run["data"]["images"] / "00024.png"], loaded.image_processor)


def _count_llm_inputs(model: Any) -> tuple[list[int], list[int], Any]:
    """Hooks recording the positions fed to the LLM's transformer and the images fed to the ViT per call."""
    llm, vit = [], []

    def on_layer(module: Any, args: Any, kwargs: Any) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        llm.append(int(hidden.shape[0]))  # [s, b, h]

    first_layer = model.language_model.decoder.layers[0]
    hooks = [first_layer.register_forward_pre_hook(on_layer, with_kwargs=True),
             model.vision_model.register_forward_pre_hook(lambda m, a: vit.append(int(a[0].shape[0])))]  # fmt: skip
    return llm, vit, hooks


def test_cached_greedy_equals_full_recompute_and_feeds_one_token_per_step(loaded: LoadedNeva, prompt: Any) -> None:
    ids, image = prompt
    runs = {}
    for use_cache in (True, False):
        llm, vit, hooks = _count_llm_inputs(loaded.model)
        try:
            out = generate(loaded.model, loaded.tokenizer, ids, image, max_new_tokens=20, stop_ids=(),
                           use_cache=use_cache)  # fmt: skip
        finally:
            for hook in hooks:
                hook.remove()
        runs[use_cache] = (out, llm, vit)
    cached, full = runs[True][0], runs[False][0]
    assert len(cached.tokens) == 20 and cached.stop == "max_new_tokens"
    assert cached.tokens == full.tokens and cached.text == full.text
    length = len(ids) + loaded.model.img_seq_len - 1
    assert cached.prompt_length == length
    # with the cache: the prompt once, then one position per new token; the image is encoded once
    assert runs[True][1] == [length] + [1] * 19 and runs[True][2] == [1]
    # without it every step re-runs the whole (growing) sequence and the image
    assert runs[False][1] == [length + i for i in range(20)] and runs[False][2] == [1] * 20


def test_cached_logits_match_full_forward(loaded: LoadedNeva, prompt: Any) -> None:
    """The last-position logits of every cached step equal a full forward over the same sequence (fp32)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    ids, image = prompt
    tokens = generate(loaded.model, loaded.tokenizer, ids, image, max_new_tokens=6, stop_ids=()).tokens
    model, length = loaded.model, len(ids) + loaded.model.img_seq_len - 1
    context = StaticInferenceContext(1, length + len(tokens))
    with torch.no_grad():
        step = model(image, torch.tensor([ids]), torch.arange(len(ids))[None], None, inference_context=context,
                     runtime_gather_output=True)[0]  # fmt: skip
        for i, token in enumerate(tokens):
            seq = torch.tensor([ids + tokens[:i]])
            full = model(image, seq, torch.arange(seq.shape[1])[None], None, runtime_gather_output=True)[0]
            torch.testing.assert_close(step[0, -1], full[0, -1], rtol=0, atol=1e-5)
            context.sequence_len_offset = length + i
            step = model.language_model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[length + i]]),
                                        attention_mask=None, inference_context=context,
                                        runtime_gather_output=True)  # fmt: skip


def test_stops_at_end_of_turn_token(loaded: LoadedNeva, prompt: Any) -> None:
    ids, image = prompt
    free = generate(loaded.model, loaded.tokenizer, ids, image, max_new_tokens=12, stop_ids=()).tokens
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])  # a token not generated before
    out = generate(loaded.model, loaded.tokenizer, ids, image, max_new_tokens=12, stop_ids=(free[k],))
    assert out.tokens == free[:k] and out.stop == "stop_token"
    assert stop_token_ids("vicuna_v1", loaded.tokenizer) == (loaded.tokenizer.eos_id,)


def test_context_limit(loaded: LoadedNeva, prompt: Any) -> None:
    _, image = prompt
    limit, img = loaded.max_sequence_length, loaded.model.img_seq_len
    ids = [5] * (limit - img - 2)
    ids[1] = IMAGE_TOKEN_INDEX  # prompt_length = limit - 3: room for 3 tokens
    out = generate(loaded.model, loaded.tokenizer, ids, image, max_new_tokens=10, stop_ids=())
    assert len(out.tokens) == 3 and out.stop == "max_length"
    with pytest.raises(NevaError, match="context is 512"):
        generate(loaded.model, loaded.tokenizer, [*ids, 5, 5, 5], image, max_new_tokens=10)
    with pytest.raises(NevaError, match=r"1 image token.* but 0 image"):
        generate(loaded.model, loaded.tokenizer, ids, None)


def test_sampling_is_seeded_and_cached_equals_recompute(loaded: LoadedNeva, prompt: Any) -> None:
    ids, image = prompt

    def sample(seed: int, use_cache: bool = True) -> list[int]:
        sampling = Sampling(temperature=1.5, top_p=0.95, seed=seed)
        return generate(loaded.model, loaded.tokenizer, ids, image, max_new_tokens=10, stop_ids=(), sampling=sampling,
                        use_cache=use_cache).tokens  # fmt: skip

    greedy = generate(loaded.model, loaded.tokenizer, ids, image, max_new_tokens=10, stop_ids=()).tokens
    first = sample(7)
    assert first == sample(7) == sample(7, use_cache=False)
    assert first != sample(8) and first != greedy
    assert all(t < loaded.tokenizer.vocab_size for t in first)
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(NevaError):
            Sampling(**bad)


@pytest.mark.parametrize("template", ["vicuna_v1", "plain", "llama_2", "mistral"])
def test_generation_prompt_is_the_training_prefix(loaded: LoadedNeva, template: str) -> None:
    """Prompt ids + the answer's ids (with its end token) are exactly the training ids of the conversation."""
    tok = loaded.tokenizer
    turns = [Turn("user", "<image>\nWhere is the shape?"), Turn("assistant", "left"),
             Turn("user", "And its colour?"), Turn("assistant", "dark red")]  # fmt: skip
    if template == "plain":
        turns = turns[:2]
    full = tokenize_conversation(turns, template, tok)
    prompt = generation_prompt(turns[:-1], template, tok)
    start, end = answer_span(full)
    assert prompt.input_ids == full.input_ids[:start] and start < end
    assert tok.decode(full.input_ids[start:end]).strip() == turns[-1].text
    with pytest.raises(NevaError, match="end with a user turn"):
        generation_prompt(turns, template, tok)


def test_user_message_places_images() -> None:
    assert user_message("Describe it.", 2) == "<image>\n<image>\nDescribe it."
    assert user_message("Compare <image> and <image>.", 2) == "Compare <image> and <image>."
    with pytest.raises(NevaError, match=r"1 <image> placeholder.* but 2 image"):
        user_message("Look at <image>.", 2)
