#!/usr/bin/env python3
"""Generation throughput: our batched generation (``neva_tools.inference.batch.generate_batch``) on a NeVA
``.nemo`` against transformers' ``generate`` on its Hugging Face export (``LlavaForConditionalGeneration``).

Method. One random NeVA is built here: a LLaMA (``--hidden``, ``--layers``, heads of 64, half as many KV groups,
SwiGLU FFN 8/3 × hidden, vocabulary 300 = a sentencepiece model trained on the synthetic captions, 1024 positions,
weights N(0, 0.2 × sqrt(64 / hidden)) and norms 1 ± 0.1 so that greedy continuations vary), converted with
``neva convert hf-to-nemo``'s function, a tiny random HF CLIP (28 px, 7 px patches: 16 image embeddings) and a
random ``mlp2x_gelu`` projector (the export tests' ``build_neva_nemo``), exported with ``neva export hf-llava``'s
function. Ours is ``load_neva`` (fp32 on the CPU, bf16 on CUDA unless ``--dtype``); HF loads the export in the
same dtype with its default attention (``sdpa``).

Prompt set: ``--prompts`` vicuna_v1 prompts (system "Answer briefly.") of 14 questions of different lengths, each
with one random image (sizes vary; ``pad`` processing), the same pixels for both sides; HF gets our ids with the
image placeholder expanded to its image token. Both generate exactly ``--new-tokens`` greedy tokens per prompt (no
stop token: the same work on both sides). Batch 1: one prompt at a time (ours: ``generate_batch(batch_size=1)``;
HF: one ``generate`` per prompt). Batch 16: ours sorts by length and left-pads inside; HF gets the same length-sorted
chunks of 16, left-padded with an attention mask (``generate`` derives the positions from it).

Timing: one untimed warm-up run of each of the four configurations (its outputs are the ones compared), then
``--repeats`` rounds in which the four run one after another in a rotating order, so that a change in machine load
hits all alike. samples/s = prompts / median seconds; ``ratio`` = ours / HF at the same batch size, from the
medians, and from the fastest runs (less sensitive to other processes; the load average is reported). ``--threads``
sets torch's CPU threads (1 is steadier on a shared machine). Checks: our batch-16 tokens equal our batch-1 tokens,
and ours equal HF's at both batch sizes (counted per prompt; in bf16 a near-tie may differ). Prints one JSON object
(also ``$OUT/generate.json`` when ``OUT`` is set).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import emit_json, stdout_to_stderr

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What colour is the circle?", "Where?", "Describe the image.", "Is there a square in the picture?",
    "Which shape is in the top left corner, and what colour is it?", "Count the shapes.",
    "What is the largest shape in the image and where is it placed relative to the others?",
    "Name the colour.", "Is the triangle red or blue?", "Describe every shape you can see, one by one, with colours.",
    "Any circles?", "What is in the middle?", "Tell me about the background colour of this image, please.",
    "Shape?",
]  # fmt: skip
SYSTEM = "Answer briefly."


def build(root: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    """(NeVA ``.nemo``, its HF export) of a random model (see the module docstring)."""
    import torch
    import transformers

    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "export")]
    from builders import caption_corpus
    from neva_models import build_hf_clip, build_neva_nemo

    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
    from neva_tools.export.hf_llava import export_hf_llava
    from neva_tools.tokenizer.train import train_sentencepiece

    tok = train_sentencepiece(caption_corpus(), root / "tok.model", vocab_size=300)
    heads = max(1, hidden // 64)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=(8 * hidden // 3 + 7) // 8 * 8,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)  # fmt: skip
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    llm = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, param in llm.named_parameters():
            noise = torch.randn_like(param)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * (64 / hidden) ** 0.5 * noise)
    llm.save_pretrained(str(root / "llm_hf"))
    (root / "llm_hf" / "tokenizer.model").write_bytes(tok.read_bytes())
    convert_hf_to_nemo(str(root / "llm_hf"), root / "llm.nemo")
    nemo = build_neva_nemo(root / "llm.nemo", root / "neva.nemo", build_hf_clip(root / "clip"))
    return nemo, export_hf_llava(nemo, root / "hf")


def prompt_set(loaded: Any, count: int) -> list[Any]:
    """``count`` requests: the questions in turn, each with its own random image."""
    import numpy as np
    from PIL import Image

    from neva_tools.data.records import Turn
    from neva_tools.inference.batch import Request
    from neva_tools.inference.prompt import generation_prompt, user_message

    out = []
    for i in range(count):
        rng = np.random.default_rng(i)
        size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        turns = [Turn("user", user_message(QUESTIONS[i % len(QUESTIONS)], 1))]
        ids = generation_prompt(turns, loaded.template, loaded.tokenizer, system=SYSTEM).input_ids
        out.append(Request(ids, loaded.image_processor.batch([image])))
    return out


def runners(loaded: Any, hf: Any, requests: list[Any], image_id: int, new_tokens: int,
            device: Any) -> dict[str, Callable[[], list[list[int]]]]:  # fmt: skip
    """Four callables (ours / HF at batch 1 / 16), each returning every prompt's tokens in prompt order."""
    import torch

    from neva_tools.inference.batch import generate_batch

    def ours(batch_size: int) -> list[list[int]]:
        out = generate_batch(loaded.model, loaded.tokenizer, requests, batch_size=batch_size,
                             max_new_tokens=new_tokens, stop_ids=(), vocab_size=loaded.vocab_size)  # fmt: skip
        return [g.tokens for g in out]

    expanded = []
    for r in requests:
        ids: list[int] = []
        for t in r.input_ids:
            ids.extend([image_id] * int(r.images.tokens[0]) if t < 0 else [t])
        expanded.append(ids)
    order = sorted(range(len(requests)), key=lambda i: (-len(expanded[i]), i))  # as ours sorts

    @torch.no_grad()
    def theirs(batch_size: int) -> list[list[int]]:
        result: list[list[int]] = [[] for _ in requests]
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(expanded[i]) for i in chunk)
            ids = torch.tensor([[0] * (width - len(expanded[i])) + expanded[i] for i in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(expanded[i])) + [1] * len(expanded[i]) for i in chunk],
                                device=device)  # fmt: skip
            pixels = torch.cat([requests[i].images.pixels for i in chunk]).to(device=device, dtype=hf.dtype)
            out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)  # fmt: skip
            for row, i in enumerate(chunk):
                result[i] = out[row, width:].tolist()
        return result

    return {"ours_b1": lambda: ours(1), "hf_b1": lambda: theirs(1), "ours_b16": lambda: ours(16),
            "hf_b16": lambda: theirs(16)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="LLM hidden size (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="LLM layers (default 4)")
    parser.add_argument("--prompts", type=int, default=32, help="prompts in the set (default 32)")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per prompt (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="weights on both sides (auto: bf16 on CUDA, fp32 on the CPU)")  # fmt: skip
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from transformers import LlavaForConditionalGeneration

    from neva_tools.inference.load import load_neva, weight_dtype
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    dtype = weight_dtype(args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stdout = stdout_to_stderr()
    with tempfile.TemporaryDirectory(prefix="neva-generate-bench-") as tmp:
        nemo, exported = build(Path(tmp), args.hidden, args.layers)
        init_distributed(tp=1, seed=1234)
        try:
            loaded = load_neva(nemo, dtype=dtype)
            hf = LlavaForConditionalGeneration.from_pretrained(str(exported), dtype=dtype).to(device).eval()
            hf.generation_config.eos_token_id = None
            image_id = json.loads((exported / "config.json").read_text())["image_token_index"]
            requests = prompt_set(loaded, args.prompts)
            runs = runners(loaded, hf, requests, image_id, args.new_tokens, device)
            outputs = {name: run() for name, run in runs.items()}  # warm-up; these outputs are compared
            seconds: dict[str, list[float]] = {name: [] for name in runs}
            load_before = os.getloadavg()[0]
            names = list(runs)
            for rep in range(args.repeats):
                for name in names[rep % len(names) :] + names[: rep % len(names)]:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    runs[name]()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    seconds[name].append(time.perf_counter() - start)
        finally:
            destroy_distributed()
    n = len(requests)
    lengths = [len(r.input_ids) - 1 + int(r.images.tokens.sum()) for r in requests]  # image-expanded

    def equal(a: str, b: str) -> str:
        return f"{sum(x == y for x, y in zip(outputs[a], outputs[b], strict=True))}/{n}"

    result: dict[str, Any] = {
        "benchmark": "generate", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": 300, "image_tokens": 16},
        "prompts": n, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "prompt_positions": [min(lengths), max(lengths)],
    }  # fmt: skip
    for size in (1, 16):
        ours, theirs = (statistics.median(seconds[f"{s}_b{size}"]) for s in ("ours", "hf"))
        result[f"batch_{size}"] = {
            "ours_samples_per_s": round(n / ours, 2), "hf_samples_per_s": round(n / theirs, 2),
            "ratio_ours_over_hf": round(theirs / ours, 2),
            "ratio_fastest_runs": round(min(seconds[f"hf_b{size}"]) / min(seconds[f"ours_b{size}"]), 2),
            "ours_seconds": [round(s, 3) for s in seconds[f"ours_b{size}"]],
            "hf_seconds": [round(s, 3) for s in seconds[f"hf_b{size}"]],
        }  # fmt: skip
    result["speedup_batch16_over_batch1"] = {
        "ours": round(statistics.median(seconds["ours_b1"]) / statistics.median(seconds["ours_b16"]), 2),
        "hf": round(statistics.median(seconds["hf_b1"]) / statistics.median(seconds["hf_b16"]), 2),
    }
    result["same_tokens"] = {"ours_b16_vs_ours_b1": equal("ours_b16", "ours_b1"),
                             "ours_vs_hf_b1": equal("ours_b1", "hf_b1"),
                             "ours_vs_hf_b16": equal("ours_b16", "hf_b16")}  # fmt: skip
    result["distinct_continuations"] = len({tuple(t) for t in outputs["ours_b1"]})
    result["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    result["seconds"] = round(time.perf_counter() - started, 1)
    emit_json(result, stdout, "generate.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
