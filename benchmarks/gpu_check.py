#!/usr/bin/env python3
"""The GPU check: one command, one JSON object, about 5 minutes on one H100 (Python 3.12, PyTorch preinstalled).

Run it on the device machine as ``benchmarks/README.md`` says (the other dependencies travel as wheels). Each part
runs in turn; one that fails records its error and the others still run. Parts:

``master_weights``
    A tiny GPT on CUDA, wrapped as training wraps it (``neva_tools.train.megatron_optim``: ``Float16Module`` in bf16,
    megatron-core DDP with fp32 gradient buffers, ``get_megatron_optimizer`` with fp32 main parameters): the
    parameter and main-parameter dtypes, and 20 AdamW steps at LLaVA's stage-2 rate 2e-5 — the share of bf16 weights
    that changed and the loss before and after.
``stages``
    The demo's data, tokenizer, tiny LLaMA and tiny CLIP, then ``neva train`` stage 1 and stage 2
    (``recipes/tiny_cpu``) on the GPU with ``trainer.precision=bf16`` in separate processes: first and last loss of
    each stage from its ``loss.csv``.
``gpt_13b_width``
    megatron-core GPT layers of LLaMA-2-13B width (hidden 5120, FFN 13824, 40 heads, RMSNorm, SwiGLU, RoPE), micro
    batch 4, sequence 2048, bf16 with fp32 gradient buffers: forward+backward milliseconds of a 4-layer and a 2-layer
    model (per layer: the difference / 2, so embedding and output layer cancel), ``max_memory_allocated`` of the
    4-layer step, and which scaled-dot-product-attention kernel ran (kernel names from the profiler).
``neva_1b_vs_hf``
    A ~1B NeVA (LLM hidden 2048, 16 layers, FFN 5632, 16 heads, 4 KV groups, vocabulary 32000; CLIP ViT 224 px,
    patch 14, hidden 1024, 12 layers) against transformers' ``LlavaForConditionalGeneration`` (sdpa) of the same
    dimensions, same batch (8 samples, 256 image + 767 text tokens), every part trained. Ours: bf16 parameters, fp32
    master weights (megatron-core optimizer); HF: fp32 parameters under bf16 autocast with fused AdamW (what the
    HF Trainer does with ``bf16=True``). Steps alternate between the two; tokens/s from the mean step time and MFU
    = (6 · trained parameters + 12 · layers · hidden · sequence) · tokens/s / the GPU's dense bf16 peak.

Figures are only what this script printed on the machine named in its ``device`` field. ``--smoke`` runs every
part on the CPU at toy sizes (a few seconds each), to check the script itself where there is no GPU; its figures
mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import emit_json, stdout_to_stderr

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

#: Dense bf16 peak (FLOP/s) by device name, for MFU.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}

GPT_13B = {
    "hidden_size": 5120, "ffn_hidden_size": 13824, "num_attention_heads": 40, "num_query_groups": 40,
    "encoder_seq_length": 2048, "max_position_embeddings": 4096, "position_embedding_type": "rope",
    "normalization": "rmsnorm", "activation": "fast-swiglu", "bias": False, "hidden_dropout": 0.0,
    "attention_dropout": 0.0, "share_embeddings_and_output_weights": False,
}  # fmt: skip
LLM_1B = {
    "num_layers": 16, "hidden_size": 2048, "ffn_hidden_size": 5632, "num_attention_heads": 16, "num_query_groups": 4,
    "encoder_seq_length": 2048, "max_position_embeddings": 2048, "position_embedding_type": "rope",
    "rotary_base": 10000, "normalization": "rmsnorm", "layernorm_epsilon": 1e-5, "activation": "fast-swiglu",
    "bias": False, "share_embeddings_and_output_weights": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
}  # fmt: skip
VISION_1B = {"image_size": 224, "patch_size": 14, "hidden_size": 1024, "num_layers": 12, "num_heads": 16,
             "ffn_hidden_size": 4096}  # fmt: skip
VOCAB = 32000
#: ``--smoke``: the same parts at toy sizes on the CPU.
SMOKE = {"gpt": {"hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4, "num_query_groups": 4},
         "llm": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
                 "num_query_groups": 2},
         "vision": {"image_size": 28, "patch_size": 14, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                    "ffn_hidden_size": 64},
         "vocab": 256, "batch": 2, "seq": 64, "text_len": 32, "steps": 2}  # fmt: skip
DEVICE = "cuda"  # "cpu" with --smoke


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cuda_time(fn: Callable[[], Any], steps: int, warmup: int = 2) -> list[float]:
    """Seconds of each of ``steps`` calls of ``fn`` after ``warmup`` calls, synchronised around each."""

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def peak_flops() -> tuple[float | None, str]:
    import torch

    if DEVICE != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16.items():
        if key in name:
            return value, name
    return None, name


def environment() -> dict[str, Any]:
    import megatron.core
    import torch
    import transformers

    if DEVICE != "cuda":
        return {"device": "cpu (smoke run)", "torch": torch.__version__}
    props = torch.cuda.get_device_properties(0)
    return {"device": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count, "python": sys.version.split()[0],
            "torch": torch.__version__, "cuda": torch.version.cuda, "megatron_core": megatron.core.__version__,
            "transformers": transformers.__version__}  # fmt: skip


def _wrapped(cfg: dict[str, Any], vocab: int, **wrap: Any) -> tuple[list[Any], Any]:
    """A GPT of ``cfg`` on this GPU wrapped as training wraps it, and its optimizer."""
    from neva_tools.model.gpt import build_gpt_model
    from neva_tools.train.megatron_optim import build_optimizer, wrap_model
    from neva_tools.train.optim import OptimSettings

    model = build_gpt_model(cfg, padded_vocab_size=vocab).to(DEVICE)
    chunks = wrap_model(model, precision="bf16", use_distributed_optimizer=False, **wrap)
    return chunks, build_optimizer(chunks, OptimSettings(lr=2e-5), name="fused_adam", clip_grad=1.0)


def master_weights() -> dict[str, Any]:
    """bf16 parameters, fp32 main parameters, and weights that do change at lr 2e-5."""
    import torch

    from neva_tools.train.megatron_optim import optimizer_step, scale_loss, torch_optimizers, zero_grad

    cfg = {**GPT_13B, "num_layers": 2, "hidden_size": 256, "ffn_hidden_size": 688, "num_attention_heads": 8,
           "num_query_groups": 8, "encoder_seq_length": 128}  # fmt: skip
    chunks, optimizer = _wrapped(cfg, 1024)
    params = [p for p in chunks[0].parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    main = [p for inner in torch_optimizers(optimizer) for group in inner.param_groups for p in group["params"]]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    ids = torch.randint(0, 1024, (4, 128), device=DEVICE, generator=g)
    positions = torch.arange(128, device=DEVICE).expand(4, 128)
    losses = []
    for _ in range(20):
        zero_grad(chunks, optimizer)
        loss = chunks[0](ids, positions, None, labels=ids).float().mean()
        scale_loss(optimizer, loss).backward()
        optimizer_step(chunks, optimizer)
        losses.append(loss.item())
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(params, before, strict=True))
    total = sum(p.numel() for p in params)
    return {"param_dtypes": sorted({str(p.dtype) for p in params}), "main_param_dtypes": sorted({str(p.dtype)
            for p in main}), "optimizer": type(optimizer).__name__, "lr": 2e-5, "steps": 20,
            "bf16_weights_changed": round(changed / total, 4), "first_loss": round(losses[0], 4),
            "last_loss": round(losses[-1], 4), "ok": losses[-1] < losses[0] and changed / total > 0.5}  # fmt: skip


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "logs" / "loss.csv") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def stages(out: Path, steps: int = 40) -> dict[str, Any]:
    """``neva train`` stage 1 and 2 of the tiny recipe on this GPU in bf16 (separate processes, as users run it)."""
    from neva_tools import demo

    paths = demo.prepare(out, train=64, heldout=8, image_size=32)
    recipes, runs = ROOT / "recipes" / "tiny_cpu", out / "runs"
    common = [f"exp_manager.exp_dir={runs}", f"model.mm_cfg.llm.from_pretrained={out / 'llm.nemo'}",
              f"model.mm_cfg.vision_encoder.from_pretrained={paths['clip']}", "model.tensor_model_parallel_size=1",
              f"model.data.image_folder={paths['images']}", "trainer.precision=bf16", "model.global_batch_size=4",
              "model.micro_batch_size=4", "trainer.enable_progress_bar=false", "model.data.num_workers=2"]  # fmt: skip
    result: dict[str, Any] = {}
    for name, recipe, extra in (
        ("stage1", "stage1_pretrain.yaml", [f"model.data.data_path={paths['pretrain']}", f"trainer.max_steps={steps}"]),
        ("stage2", "stage2_finetune.yaml", [f"model.data.data_path={paths['finetune']}", f"trainer.max_steps={steps}",
                                            f"model.optim.sched.warmup_steps={steps // 10}",
                                            f"model.mm_cfg.pretrain_mm_mlp_adapter={runs}/gpu_stage1/gpu_stage1.nemo"]),
    ):  # fmt: skip
        cmd = [sys.executable, "-m", "neva_tools", "train", str(recipes / recipe), *common, f"name=gpu_{name}", *extra]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        if done.returncode != 0:
            raise RuntimeError(f"{name} exited {done.returncode}: {done.stderr[-3000:]}")
        losses = _losses(runs / f"gpu_{name}")
        window = max(1, len(losses) // 8)
        falls = statistics.fmean(losses[-window:]) < statistics.fmean(losses[:window])
        result[name] = {"seconds": round(time.perf_counter() - start, 1), "steps": len(losses),
                        "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
                        "loss_falls": falls}  # fmt: skip
    return result


def sdpa_kernels(step: Callable[[], Any]) -> list[str]:
    """Names of the attention kernels the profiler saw in one call of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if DEVICE == "cuda" else ProfilerActivity.CPU]) as prof:
        step()
    names = {e.key for e in prof.key_averages()}
    keys = ("flash", "fmha", "efficient_attention", "cudnn", "attention", "softmax")
    return sorted(n[:100] for n in names if any(k in n.lower() for k in keys))


def gpt_13b_width(smoke: bool = False) -> dict[str, Any]:
    """Forward+backward ms per layer of LLaMA-13B-width layers, peak memory, the SDPA kernel."""
    import torch

    batch, seq, vocab = (SMOKE["batch"], SMOKE["seq"], SMOKE["vocab"]) if smoke else (4, 2048, VOCAB)
    dims = {**GPT_13B, **(SMOKE["gpt"] if smoke else {}), "encoder_seq_length": seq}
    g = torch.Generator(device=DEVICE).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), device=DEVICE, generator=g)
    positions = torch.arange(seq, device=DEVICE).expand(batch, seq)
    result: dict[str, Any] = {"micro_batch": batch, "seq_len": seq, "dtype": "bf16 params, fp32 grad buffers"}
    for layers in (2, 4):
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        chunks, _ = _wrapped({**dims, "num_layers": layers}, vocab)
        model = chunks[0]

        def step(model: Any = model) -> None:
            model.zero_grad_buffer()
            model(ids, positions, None, labels=ids).float().mean().backward()

        times = cuda_time(step, steps=SMOKE["steps"] if smoke else 5)
        peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None
        result[f"layers_{layers}"] = {"ms_forward_backward": round(1000 * statistics.median(times), 2),
                                      "max_memory_allocated_gib": None if peak is None else round(peak, 2),
                                      "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
        if layers == 4:
            result["attention_kernels"] = sdpa_kernels(step)
        del chunks, model
    per_layer = (result["layers_4"]["ms_forward_backward"] - result["layers_2"]["ms_forward_backward"]) / 2
    result["ms_per_layer_forward_backward"] = round(per_layer, 2)
    return result


def neva_1b_vs_hf(smoke: bool = False) -> dict[str, Any]:
    """Training tokens/s and MFU of a ~1B NeVA, ours against transformers' LLaVA, alternating steps."""
    import torch
    import train as cpu_bench

    from neva_tools.train.megatron_optim import build_optimizer, optimizer_step, scale_loss, wrap_model, zero_grad
    from neva_tools.train.module import llava_loss
    from neva_tools.train.optim import OptimSettings

    llm, vision = {**LLM_1B, **(SMOKE["llm"] if smoke else {})}, {**VISION_1B, **(SMOKE["vision"] if smoke else {})}
    batch, text_len, vocab = (SMOKE["batch"], SMOKE["text_len"], SMOKE["vocab"]) if smoke else (8, 768, VOCAB)
    image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    data = cpu_bench.make_batch(image_tokens, batch=batch, text_len=text_len, image_size=vision["image_size"],
                                vocab=vocab)  # fmt: skip
    ours_batch = {k: v.to(DEVICE) for k, v in data["ours"].items()}
    hf_batch = {k: v.to(DEVICE) for k, v in data["hf"].items()}
    ours = cpu_bench.build_ours(llm, vocab, vision).to(DEVICE)
    chunks = wrap_model(ours, precision="bf16", use_distributed_optimizer=False)
    ours_opt = build_optimizer(chunks, OptimSettings(lr=1e-5), name="fused_adam", clip_grad=1.0)
    hf = cpu_bench.build_hf("sdpa", llm, vocab, vision).to(DEVICE)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=True)

    def ours_step() -> None:
        zero_grad(chunks, ours_opt)
        loss = llava_loss(chunks[0], ours_batch)[0]
        scale_loss(ours_opt, loss).backward()
        optimizer_step(chunks, ours_opt)

    def hf_step() -> None:
        hf_opt.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = hf(**hf_batch, use_cache=False).loss
        loss.backward()
        hf_opt.step()

    for step in (ours_step, hf_step):
        cuda_time(step, steps=0, warmup=3)
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for _ in range(SMOKE["steps"] if smoke else 10):
        times["ours"] += cuda_time(ours_step, steps=1, warmup=0)
        times["hf"] += cuda_time(hf_step, steps=1, warmup=0)
    tokens = batch * data["seq_len"]
    peak, name = peak_flops()
    trained = {"ours": sum(p.numel() for p in ours.parameters()), "hf": sum(p.numel() for p in hf.parameters())}
    attention = 12 * llm["num_layers"] * llm["hidden_size"] * data["seq_len"]
    result: dict[str, Any] = {"batch": batch, "seq_len": data["seq_len"], "tokens_per_step": tokens, "device": name,
                              "peak_bf16_flops": peak}  # fmt: skip
    for side in ("ours", "hf"):
        mean = statistics.fmean(times[side])
        rate = tokens / mean
        mfu = (6 * trained["ours"] + attention) * rate / peak if peak else None  # the same model FLOPs on both sides
        result[side] = {"seconds_per_step": round(mean, 4), "min_seconds_per_step": round(min(times[side]), 4),
                        "tokens_per_second": round(rate, 1), "params": trained[side],
                        "mfu": round(mfu, 4) if mfu else None}  # fmt: skip
    result["ratio_ours_over_hf"] = round(result["ours"]["tokens_per_second"] / result["hf"]["tokens_per_second"], 3)
    return result


def main() -> int:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every part at toy sizes on the CPU (checks the script)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    if args.smoke:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: this check runs on a GPU machine (benchmarks/README.md); "
                                   "--smoke runs it on the CPU at toy sizes"}))  # fmt: skip
        return 2
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    torch.backends.cuda.matmul.allow_tf32 = True
    result: dict[str, Any] = {"check": "gpu_check", "environment": environment()}
    started = time.perf_counter()
    stdout = stdout_to_stderr()
    with tempfile.TemporaryDirectory(prefix="neva-gpu-check-") as tmp:
        parts: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("stages", lambda: stages(Path(tmp), steps=4 if args.smoke else 40)),  # own processes, before this one
        ]
        for name, part in parts:
            result[name] = _run(part)
        init_distributed(tp=1, seed=1234)
        try:
            for name, part in (("master_weights", master_weights),
                               ("gpt_13b_width", lambda: gpt_13b_width(args.smoke)),
                               ("neva_1b_vs_hf", lambda: neva_1b_vs_hf(args.smoke))):  # fmt: skip
                result[name] = _run(part)
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
        finally:
            destroy_distributed()
    result["seconds"] = round(time.perf_counter() - started, 1)
    emit_json(result, stdout, "gpu_check.json")
    return 0


def _run(part: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One part's result, or its error and the end of its traceback."""
    start = time.perf_counter()
    try:
        return {**part(), "part_seconds": round(time.perf_counter() - start, 1)}
    except Exception as exc:  # a failed part is reported; the others still run
        return {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-3000:]}


if __name__ == "__main__":
    sys.exit(main())
