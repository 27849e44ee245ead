"""Batched generation: token for token (and logit for logit) what batch-1 ``generate`` gives, at TP=1 and TP=2, for
one-view and AnyRes models, and the same greedy tokens as transformers' ``generate`` on the exported model.

The models are tiny and random (random norms too, so greedy continuations vary): a 2-layer LLaMA with 512 positions
and a 3-layer CLIP (28 px, 7 px patches), built as the export tests build them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dist_helpers import in_process_distributed, run_distributed
from PIL import Image

from neva_tools.data.records import Turn
from neva_tools.data.templates import IMAGE_TOKEN_INDEX
from neva_tools.errors import NevaError
from neva_tools.inference import batch as batch_module
from neva_tools.inference import generate as generate_module
from neva_tools.inference.batch import Request, generate_batch
from neva_tools.inference.generate import Sampling, generate
from neva_tools.inference.load import LoadedNeva, load_neva
from neva_tools.inference.prompt import generation_prompt, stop_token_ids, user_message

#: (question, image sizes as (width, height)): different lengths; one, two and no images; an image inside the text
QUESTIONS = [
    ("What colour is the circle?", [(30, 40)]),
    ("Hi", []),
    ("Compare the two shapes: which one is larger, and are their colours the same?", [(40, 30), (28, 28)]),
    ("Where?", [(50, 20)]),
    ("Describe a red circle on a white background in one sentence, please.", []),
    ("Look at <image> and name its shape.", [(20, 45)]),
]
PINPOINTS = "(1x1),...,(2x2)"  # AnyRes: 1x1, 2x1, 1x2 and 2x2 grids of 28 px tiles
SYSTEM = "Answer briefly."
EXPORT_HELPERS = str(Path(__file__).resolve().parents[1] / "export")  # neva_models, anyres_models


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def build_requests(loaded: LoadedNeva) -> list[Request]:
    """The requests of :data:`QUESTIONS`, images processed as the model's training did (AnyRes tiles included)."""
    out = []
    for i, (question, sizes) in enumerate(QUESTIONS):
        turns = [Turn("user", user_message(question, len(sizes)))]
        ids = generation_prompt(turns, loaded.template, loaded.tokenizer, system=SYSTEM).input_ids
        images = [picture(w, h, 10 * i + k) for k, (w, h) in enumerate(sizes)]
        out.append(Request(ids, loaded.image_processor.batch(images)))
    return out


@pytest.fixture(scope="module")
def nemos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A one-view (``pad``) NeVA and an AnyRes (``spatial_unpad``) one on the same random LLaMA and CLIP."""
    if EXPORT_HELPERS not in sys.path:
        sys.path.insert(0, EXPORT_HELPERS)
    from anyres_models import build_llama
    from builders import caption_corpus
    from neva_models import build_hf_clip, build_neva_nemo

    from neva_tools.tokenizer.train import train_sentencepiece

    root = tmp_path_factory.mktemp("batch")
    tok = train_sentencepiece(caption_corpus(), root / "tok.model", vocab_size=300)
    llama, clip = build_llama(root, tok), build_hf_clip(root / "clip")
    return {"pad": build_neva_nemo(llama, root / "neva.nemo", clip),
            "anyres": build_neva_nemo(llama, root / "next.nemo", clip, aspect="anyres", merge="spatial_unpad",
                                      data={"image_grid_pinpoints": PINPOINTS}, seed=11)}  # fmt: skip


@pytest.fixture(scope="module")
def dist() -> Iterator[None]:
    with in_process_distributed():
        yield


@pytest.fixture(scope="module")
def loaded(dist: None, nemos: dict[str, Path]) -> LoadedNeva:
    return load_neva(nemos["pad"])


@pytest.fixture(scope="module")
def requests(loaded: LoadedNeva) -> list[Request]:
    return build_requests(loaded)


def one_at_a_time(loaded: LoadedNeva, requests: list[Request], **kwargs: Any) -> list[Any]:
    return [generate(loaded.model, loaded.tokenizer, r.input_ids, r.images, vocab_size=loaded.vocab_size, **kwargs)
            for r in requests]  # fmt: skip


def record_logits(loaded: LoadedNeva, requests: list[Request], monkeypatch: pytest.MonkeyPatch,
                  steps: int) -> tuple[list[Any], list[Any], dict[str, dict[int, list[torch.Tensor]]]]:  # fmt: skip
    """(batch-1 generations, batched ones (4 per batch), every step's logits of each request on both sides)."""
    seen: dict[str, dict[int, list[torch.Tensor]]] = {"single": {}, "batched": {}}
    current = [0]
    picker_call, pick = generate_module._Picker.__call__, batch_module._pick

    def record_single(self: Any, logits: torch.Tensor) -> int:
        seen["single"].setdefault(current[0], []).append(logits[: loaded.vocab_size].float().clone())
        return picker_call(self, logits)

    def record_batched(logits: torch.Tensor, indices: list[int], *args: Any) -> list[int]:
        for i, row in zip(indices, logits, strict=True):
            seen["batched"].setdefault(i, []).append(row[: loaded.vocab_size].float().clone())
        return pick(logits, indices, *args)

    monkeypatch.setattr(generate_module._Picker, "__call__", record_single)
    monkeypatch.setattr(batch_module, "_pick", record_batched)
    single = []
    for i, r in enumerate(requests):
        current[0] = i
        single.append(one_at_a_time(loaded, [r], max_new_tokens=steps, stop_ids=())[0])
    batched = generate_batch(loaded.model, loaded.tokenizer, requests, batch_size=4, max_new_tokens=steps,
                             stop_ids=(), vocab_size=loaded.vocab_size)  # fmt: skip
    monkeypatch.undo()
    return single, batched, seen


def check_equal(single: list[Any], batched: list[Any], seen: dict[str, Any], steps: int) -> None:
    assert len({g.prompt_length for g in single}) == len(single)  # every prompt its own length: batches are padded
    for i, (want, got) in enumerate(zip(single, batched, strict=True)):
        assert got.tokens == want.tokens and len(got.tokens) == steps, i
        assert (got.text, got.stop, got.prompt_length) == (want.text, want.stop, want.prompt_length)
        assert len(seen["batched"][i]) == len(seen["single"][i]) == steps
        for mine, ref in zip(seen["batched"][i], seen["single"][i], strict=True):
            torch.testing.assert_close(mine, ref, rtol=0, atol=5e-5)  # fp32 rounding (unmasked pads: ~10)
    assert len({tuple(g.tokens) for g in batched}) == len(batched)  # real, different continuations


def test_batched_greedy_equals_batch1_tokens_and_logits(loaded: LoadedNeva, requests: list[Request],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Every step's logits of every prompt match batch 1's (fp32), so the tokens are the same; order is kept."""
    single, batched, seen = record_logits(loaded, requests, monkeypatch, 12)
    check_equal(single, batched, seen, 12)


def test_rope_positions_are_per_row(loaded: LoadedNeva) -> None:
    """Inside a batch each row's rotary embedding at slot s is batch 1's at s minus the row's padding, exactly."""
    rope = loaded.model.language_model.rotary_pos_emb
    base = rope(12).clone()  # [12, 1, 1, d]
    slots = batch_module._Slots(torch.tensor([0, 3, 7]), 12)
    with batch_module._per_row_rope(loaded.model.language_model, slots):
        rows = rope(12)  # [12, 3, 1, d]
    assert rows.shape == (12, 3, 1, base.shape[-1]) and torch.equal(rope(12), base)  # restored afterwards
    for row, pad in enumerate((0, 3, 7)):
        assert torch.equal(rows[pad:, row], base[: 12 - pad, 0])
    assert slots.valid.sum(dim=1).tolist() == [12, 9, 5]


def test_anyres_batched_equals_batch1(dist: None, nemos: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """AnyRes: images of other sizes become other numbers of embeddings (tiles, unpadding, newlines) per prompt."""
    anyres = load_neva(nemos["anyres"])
    reqs = build_requests(anyres)
    counts = [r.images.tokens.tolist() for r in reqs if len(r.images)]
    assert len({c for per in counts for c in per}) >= 4 and any(t > 1 for r in reqs for t in r.images.tiles.tolist())
    single, batched, seen = record_logits(anyres, reqs, monkeypatch, 8)
    check_equal(single, batched, seen, 8)
    text = [i for i, r in enumerate(reqs) if not len(r.images)]  # a batch without any image
    alone = generate_batch(anyres.model, anyres.tokenizer, [reqs[i] for i in text], max_new_tokens=8, stop_ids=(),
                           vocab_size=anyres.vocab_size)  # fmt: skip
    assert len(text) == 2 and [g.tokens for g in alone] == [single[i].tokens for i in text]


def test_per_prompt_stopping_and_finished_rows_leave_the_batch(loaded: LoadedNeva, requests: list[Request]) -> None:
    """With stop tokens each prompt stops on its own, as at batch 1; the LLM then only sees the unfinished rows."""
    free = one_at_a_time(loaded, requests, max_new_tokens=10, stop_ids=())
    stop = free[0].tokens[2]  # prompt 0 stops within 2 tokens; the others wherever (if) this token comes
    want = one_at_a_time(loaded, requests, max_new_tokens=10, stop_ids=(stop,))
    assert {w.stop for w in want} == {"stop_token", "max_new_tokens"}
    batch_rows: list[int] = []

    def count(module: Any, args: Any, kwargs: Any) -> None:
        batch_rows.append(int(kwargs.get("hidden_states", args[0] if args else None).shape[1]))  # [s, b, h]

    hook = loaded.model.language_model.decoder.layers[0].register_forward_pre_hook(count, with_kwargs=True)
    try:
        got = generate_batch(loaded.model, loaded.tokenizer, requests, batch_size=len(requests), max_new_tokens=10,
                             stop_ids=(stop,), vocab_size=loaded.vocab_size)  # fmt: skip
    finally:
        hook.remove()
    assert [(g.tokens, g.stop) for g in got] == [(w.tokens, w.stop) for w in want]
    assert got[0].stop == "stop_token" and len(got[0].tokens) <= 2
    assert batch_rows[0] == len(requests)  # the prefill, then one call per step with the rows still going
    assert batch_rows == sorted(batch_rows, reverse=True) and batch_rows[-1] < len(requests)
    assert len(batch_rows) == max(len(g.tokens) + (g.stop == "stop_token") for g in got)  # tokens picked


def test_default_stop_tokens_and_context_limit(loaded: LoadedNeva, requests: list[Request]) -> None:
    """The template's end of turn stops prompts as at batch 1; a prompt near the context's end stops at
    ``max_length`` while the others of its batch go on."""
    limit = loaded.max_sequence_length
    long_ids = [5] * (limit - loaded.model.img_seq_len - 2)
    long_ids[1] = IMAGE_TOKEN_INDEX
    mixed = [*requests[:3], Request(long_ids, requests[0].images)]
    stops = stop_token_ids(loaded.template, loaded.tokenizer)
    want = one_at_a_time(loaded, mixed, max_new_tokens=8, stop_ids=stops)
    got = generate_batch(loaded.model, loaded.tokenizer, mixed, max_new_tokens=8, stop_ids=stops,
                         vocab_size=loaded.vocab_size)  # fmt: skip
    assert [(g.tokens, g.stop, g.text) for g in got] == [(w.tokens, w.stop, w.text) for w in want]
    assert got[3].stop == "max_length" and len(got[3].tokens) == 3 and got[3].prompt_length == limit - 3


def test_sampling_is_reproducible_per_request(loaded: LoadedNeva, requests: list[Request]) -> None:
    """Request i samples as ``generate`` with seed ``seed + i`` (or its own seed), whatever the batch size or order."""
    sampling = Sampling(temperature=1.3, top_p=0.9, seed=40)

    def run(reqs: list[Request], batch_size: int) -> list[list[int]]:
        out = generate_batch(loaded.model, loaded.tokenizer, reqs, batch_size=batch_size, max_new_tokens=8,
                             sampling=sampling, stop_ids=(), vocab_size=loaded.vocab_size)  # fmt: skip
        return [g.tokens for g in out]

    together = run(requests, 6)
    assert together == run(requests, 2) == run(requests, 1)
    for i, r in enumerate(requests):
        alone = generate(loaded.model, loaded.tokenizer, r.input_ids, r.images, max_new_tokens=8, stop_ids=(),
                         sampling=Sampling(1.3, 0.9, 40 + i), vocab_size=loaded.vocab_size)  # fmt: skip
        assert alone.tokens == together[i]
    seeded = [Request(r.input_ids, r.images, seed=40 + i) for i, r in enumerate(requests)]
    assert run(seeded[::-1], 3)[::-1] == together  # own seeds: the order does not matter
    greedy = one_at_a_time(loaded, requests, max_new_tokens=8, stop_ids=())
    assert together != [g.tokens for g in greedy]


def test_results_in_request_order_and_errors_name_the_request(loaded: LoadedNeva, requests: list[Request]) -> None:
    seen: list[int] = []
    out = generate_batch(loaded.model, loaded.tokenizer, requests, batch_size=4, max_new_tokens=2, stop_ids=(),
                         vocab_size=loaded.vocab_size, on_result=lambda i, g: seen.append(i))  # fmt: skip
    assert seen == sorted(range(len(requests)), key=lambda i: -out[i].prompt_length)  # longest first
    assert generate_batch(loaded.model, loaded.tokenizer, [], max_new_tokens=2) == []
    wrong = Request(requests[1].input_ids, requests[0].images)
    with pytest.raises(NevaError, match=r"request 1: the prompt has 0 image token\(s\) but 1 image"):
        generate_batch(loaded.model, loaded.tokenizer, [requests[0], wrong])
    too_long = Request([5] * loaded.max_sequence_length, where="questions.tsv:index 7")
    with pytest.raises(NevaError, match=r"questions.tsv:index 7: the prompt is 512 tokens long .* context is 512"):
        generate_batch(loaded.model, loaded.tokenizer, [too_long])
    with pytest.raises(NevaError, match="batch_size must be at least 1"):
        generate_batch(loaded.model, loaded.tokenizer, requests, batch_size=0)


def test_batched_greedy_equals_transformers(loaded: LoadedNeva, requests: list[Request], nemos: dict[str, Path],
                                            tmp_path: Path) -> None:  # fmt: skip
    """transformers' greedy ``generate`` on the exported ``LlavaForConditionalGeneration``, one prompt at a time."""
    import json

    from neva_models import expand_images
    from transformers import LlavaForConditionalGeneration

    from neva_tools.export.hf_llava import export_hf_llava

    ours = generate_batch(loaded.model, loaded.tokenizer, requests, batch_size=6, max_new_tokens=12, stop_ids=(),
                          vocab_size=loaded.vocab_size)  # fmt: skip
    exported = export_hf_llava(nemos["pad"], tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(str(exported), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # ours was told not to stop either: compare every token
    image_id = json.loads((exported / "config.json").read_text())["image_token_index"]
    for r, mine in zip(requests, ours, strict=True):
        ids = torch.tensor([expand_images(r.input_ids, image_id, loaded.model.img_seq_len)])
        pixels = {"pixel_values": r.images.pixels} if len(r.images) else {}
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                              pad_token_id=0, **pixels)  # fmt: skip
        assert mine.tokens == out[0, ids.shape[1] :].tolist()


def test_bf16_weights(dist: None, nemos: dict[str, Path], loaded: LoadedNeva, requests: list[Request],
                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """``dtype="bf16"`` loads bf16 weights (fp32 images are cast); the batched first-step logits are fp32's to bf16
    precision."""
    from neva_tools.inference.load import weight_dtype

    half = load_neva(nemos["pad"], dtype="bf16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    firsts: dict[str, list[torch.Tensor]] = {}
    pick = batch_module._pick
    for name, model in (("fp32", loaded), ("bf16", half)):

        def record(logits: torch.Tensor, indices: list[int], *args: Any, name: str = name) -> list[int]:
            firsts.setdefault(name, []).extend(logits[i, : loaded.vocab_size].float() for i in range(len(indices)))
            return pick(logits, indices, *args)

        monkeypatch.setattr(batch_module, "_pick", record)
        out = generate_batch(model.model, model.tokenizer, requests, max_new_tokens=1, stop_ids=(),
                             vocab_size=model.vocab_size)  # fmt: skip
        assert [len(g.tokens) for g in out] == [1] * len(requests)
    for full, low in zip(firsts["fp32"], firsts["bf16"], strict=True):
        assert float((full - low).abs().max()) < 0.05 * float(full.abs().max())
    assert weight_dtype("auto") == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    with pytest.raises(NevaError, match=r"weight dtype 'fp8' \(--dtype\) is not one of auto, fp32, bf16, fp16"):
        weight_dtype("fp8")


def _tp_batch(rank: int, world_size: int, nemo: str) -> dict[str, Any]:
    """Greedy and sampled batched generations at TP=world_size."""
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    init_distributed(tp=world_size, seed=1234)
    try:
        loaded = load_neva(nemo)
        reqs = build_requests(loaded)
        kwargs = dict(batch_size=4, max_new_tokens=10, stop_ids=(), vocab_size=loaded.vocab_size)
        greedy = generate_batch(loaded.model, loaded.tokenizer, reqs, **kwargs)
        sampled = generate_batch(loaded.model, loaded.tokenizer, reqs, sampling=Sampling(1.2, 0.9, 5), **kwargs)
        return {"greedy": [g.tokens for g in greedy], "sampled": [g.tokens for g in sampled]}
    finally:
        destroy_distributed()


def test_tp2_equals_tp1(loaded: LoadedNeva, requests: list[Request], nemos: dict[str, Path]) -> None:
    """Two gloo processes (TP=2) give the batch-1 TP=1 greedy tokens and the TP=1 sampled ones."""
    tp2 = run_distributed(_tp_batch, 2, str(nemos["pad"]), timeout=300)
    greedy = one_at_a_time(loaded, requests, max_new_tokens=10, stop_ids=())
    sampled = generate_batch(loaded.model, loaded.tokenizer, requests, batch_size=4, max_new_tokens=10, stop_ids=(),
                             sampling=Sampling(1.2, 0.9, 5), vocab_size=loaded.vocab_size)  # fmt: skip
    for rank in tp2:
        assert rank["greedy"] == [g.tokens for g in greedy]
        assert rank["sampled"] == [g.tokens for g in sampled]
