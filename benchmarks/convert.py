#!/usr/bin/env python3
"""Benchmark ``neva convert hf-to-nemo`` against ``cp`` of the same safetensors bytes, in one run.

Generates (or takes with ``--model``) a LLaMA-shaped safetensors checkpoint (default: TinyLlama-1.1B
shapes, bf16, about 2.2 GB), then measures side by side: ``cp`` of the weight files, the conversion
(in a subprocess, peak RSS from its own ``ru_maxrss``), and the interpreter baseline (the same imports,
no work). This process imports nothing heavy, because Linux carries ``ru_maxrss`` over fork and exec.
Prints one JSON object with the figures and the ratios the targets are stated in:
wall ≤ 3× cp; peak RSS ≤ 1.5× the largest output shard + baseline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = dict(hidden=2048, ffn=5632, layers=22, heads=32, kv_heads=4, vocab=32000)


def generate(out: Path, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int) -> Path:
    """Write a random LLaMA-shaped bf16 checkpoint in ~1 GB shards with an index and a config.json."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    names: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        names.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (ffn, hidden),
            p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
        })  # fmt: skip
    names.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    files = 0
    gen = torch.Generator().manual_seed(0)

    def flush() -> None:
        nonlocal shard, files
        files += 1
        name = f"model-{files:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard = {}

    size = 0
    for name, shape in names.items():
        shard[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size > 1 << 30:
            flush()
            size = 0
    if shard:
        flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return out


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="an existing HF LLaMA directory (default: generate one)")
    parser.add_argument("--workdir", type=Path, help="where to generate and write (default: a temp dir)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--layers", type=int, default=SHAPES["layers"], help="fewer layers for a quick run")
    parser.add_argument("--generate-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = {**SHAPES, "layers": args.layers}
    if args.generate_only:  # runs in a child so that this process stays small (ru_maxrss survives fork+exec)
        generate(args.generate_only, **shapes)
        return 0
    work = Path(tempfile.mkdtemp(prefix="neva-bench-", dir=args.workdir))
    try:
        model = args.model or work / "hf"
        if args.model is None:
            subprocess.run([sys.executable, __file__, "--generate-only", str(model), "--layers", str(args.layers)],
                           check=True)  # fmt: skip
        weights = sorted(model.glob("*.safetensors"))
        src_bytes = sum(f.stat().st_size for f in weights)
        copy_dir = work / "cp"
        copy_dir.mkdir()
        cp_seconds, _ = timed(["cp", *map(str, weights), str(copy_dir)])
        shutil.rmtree(copy_dir)
        out = work / "model.nemo"
        neva = [sys.executable, "-m", "neva_tools"]
        convert_seconds, stdout = timed([*neva, "convert", "hf-to-nemo", "--input", str(model), "--output", str(out),
                                         "--tp", str(args.tp), "--json", "--no-progress", "-q"])  # fmt: skip
        summary = json.loads(stdout.strip().splitlines()[-1])
        probe = "import resource, neva_tools.cli.main, neva_tools.convert.hf_to_nemo, torch, safetensors; "
        probe += "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
        baseline = int(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                                      text=True).stdout)  # fmt: skip
        largest_shard = src_bytes // args.tp  # one rank's weights (bf16 in, bf16 out)
        result = {
            "model_bytes": src_bytes,
            "tp": args.tp,
            "cp_seconds": round(cp_seconds, 3),
            "convert_seconds": round(convert_seconds, 3),
            "convert_in_process_seconds": round(summary["seconds"], 3),
            "wall_ratio_vs_cp": round(convert_seconds / cp_seconds, 2),
            "peak_rss_bytes": summary["peak_rss"],
            "baseline_rss_bytes": baseline,
            "largest_output_shard_bytes": largest_shard,
            "rss_over_baseline_vs_shard": round((summary["peak_rss"] - baseline) / largest_shard, 3),
            "output_bytes": out.stat().st_size,
            "output_vs_input_bytes": round(out.stat().st_size / src_bytes, 4),
            "targets": {"wall_ratio_vs_cp": "<= 3", "rss_over_baseline_vs_shard": "<= 1.5"},
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
