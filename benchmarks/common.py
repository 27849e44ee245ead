"""Shared pieces of the benchmarks: a generated LLaMA-shaped checkpoint, timing, the interpreter baseline.

The benchmark processes import nothing heavy themselves (Linux carries ``ru_maxrss`` over fork and
exec, so a large parent would inflate its children's peak-memory figures): generation runs in a child.
Comparisons with ``cp`` are fair: the steps run interleaved, in a rotating order, several times, each
from the same page-cache state (the inputs read into it, or with ``--cold`` evicted from it), and
the medians are reported next to every sample.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
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
    """Run ``cmd`` after flushing dirty pages (so one step's writeback does not land on the next); time it."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, proc.stdout


def generate_in_child(out: Path, layers: int) -> Path:
    """Generate the checkpoint in a child process (keeps this process small)."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import common; "
    code += f"common.generate(common.Path({str(out)!r}), **{{**common.SHAPES, 'layers': {layers}}})"
    subprocess.run([sys.executable, "-c", code], check=True)
    return out


def baseline_rss(modules: str) -> int:
    """Peak RSS of a fresh interpreter that only imports ``modules`` (comma-separated)."""
    probe = f"import resource, {modules}; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    return int(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout)


def copy_seconds(sources: Path | list[Path], dest: Path, durable: bool = False) -> float:
    """Wall time of ``cp`` of ``sources`` into a fresh ``dest`` (removed afterwards).

    ``durable=True`` also fsyncs the copies (``sync FILE…``), as the tools do before renaming their output.
    """
    files = [sources] if isinstance(sources, Path) else sources
    dest.mkdir()
    try:
        copies = " ".join(f"'{dest / f.name}'" for f in files)
        command = f"cp {' '.join(repr(str(f)) for f in files)} '{dest}'" + (f" && sync {copies}" if durable else "")
        seconds, _ = timed(["sh", "-c", command])
    finally:
        shutil.rmtree(dest)
    return seconds


def prepare_cache(inputs: list[Path], cold: bool) -> None:
    """Flush dirty pages, then read ``inputs`` into the page cache (warm) or evict them from it (cold).

    Cold evicts only the inputs (``posix_fadvise(DONTNEED)``): the data is read from disk, while the
    interpreter and torch's libraries stay cached, as for a user who has run any Python tool before.
    """
    os.sync()
    for path in inputs:
        with open(path, "rb", buffering=0) as fh:
            if cold:
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while fh.read(16 << 20):
                    pass


def side_by_side(runs: int, steps: dict[str, Callable[[], float]], inputs: list[Path], cold: bool) -> dict:
    """Wall seconds of each step, ``runs`` times, interleaved in a rotating order, each from a prepared cache."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for run in range(runs):
        for name in names[run % len(names) :] + names[: run % len(names)]:
            prepare_cache(inputs, cold)
            samples[name].append(round(steps[name](), 3))
    return samples


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def timing_result(tool: str, samples: dict[str, list[float]], peak_rss: int, baseline: int,
                  largest_shard: int) -> dict:  # fmt: skip
    """The JSON fields both checkpoint benchmarks report: medians, ratios to ``cp`` (+ ``fsync``), memory."""
    cp, cp_fsync, wall = median(samples["cp"]), median(samples["cp_fsync"]), median(samples[tool])
    in_process = median(samples[f"{tool}_in_process"])
    return {
        "cp_seconds": cp,
        "cp_fsync_seconds": cp_fsync,
        f"{tool}_seconds": wall,
        f"{tool}_in_process_seconds": in_process,
        "wall_ratio_vs_cp_fsync": round(wall / cp_fsync, 2),
        "wall_ratio_vs_cp": round(wall / cp, 2),
        "in_process_ratio_vs_cp_fsync": round(in_process / cp_fsync, 2),
        "samples_seconds": samples,
        "peak_rss_bytes": peak_rss,
        "baseline_rss_bytes": baseline,
        "largest_output_shard_bytes": largest_shard,
        "rss_over_baseline_vs_shard": round((peak_rss - baseline) / largest_shard, 3),
        "targets": {"wall_ratio_vs_cp_fsync": "<= 3", "rss_over_baseline_vs_shard": "<= 1.5"},
    }


def against_cp(tool: str, cmd: list[str], inputs: list[Path], out: Path, copy_dir: Path, *, runs: int, cold: bool,
               baseline_modules: str) -> dict:  # fmt: skip
    """Run ``cmd`` (a ``neva ... --json`` command writing the ``.nemo`` ``out``) side by side with ``cp`` and
    ``cp`` + ``fsync`` of ``inputs``; return :func:`timing_result`'s fields."""
    summaries: list[dict] = []

    def run() -> float:
        out.unlink(missing_ok=True)
        seconds, stdout = timed(cmd)
        summaries.append(json.loads(stdout.strip().splitlines()[-1]))
        return seconds

    steps = {
        "cp": lambda: copy_seconds(inputs, copy_dir),
        "cp_fsync": lambda: copy_seconds(inputs, copy_dir, durable=True),
        tool: run,
    }
    samples = side_by_side(runs, steps, inputs, cold)
    samples[f"{tool}_in_process"] = [round(s["seconds"], 3) for s in summaries]
    with tarfile.open(out) as tar:
        largest = max(m.size for m in tar.getmembers() if m.name.endswith(".ckpt"))
    peak_rss = max(s["peak_rss"] for s in summaries)
    return timing_result(tool, samples, peak_rss, baseline_rss(baseline_modules), largest)


def stdout_to_stderr() -> int:
    """Send what the run prints (its own output and its subprocesses') to stderr, so stdout holds the JSON alone;
    returns the real stdout for :func:`emit_json`."""
    stdout = os.dup(1)
    os.dup2(2, 1)
    return stdout


def emit_json(result: dict, stdout: int, name: str) -> None:
    """Print ``result`` as one JSON line on the real ``stdout`` and, under ``$OUT`` (the device tool), save it as
    ``$OUT/name``."""
    text = json.dumps(result)
    sys.stdout.flush()
    os.dup2(stdout, 1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], name).write_text(text + "\n")
