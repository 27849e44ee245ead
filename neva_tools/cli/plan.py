"""``neva plan``: per-GPU memory of a recipe and the parallel layouts that fit, before a GPU hour is spent."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, replace
from typing import Any

from neva_tools.cli.common import positive_int

GiB = 1 << 30


def memory_size(value: str, *, zero: bool = False) -> int:
    """argparse type: ``80GB``, ``80G``, ``79.1GiB`` or a number of GiB → bytes (GB read as GiB, as cards are sold)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g)?\s*", value.lower())
    if not match or float(match.group(1)) < 0 or (float(match.group(1)) == 0 and not zero):
        raise argparse.ArgumentTypeError(f"must be a memory size like 80GB, got {value}")
    return int(float(match.group(1)) * GiB)


def reserve_size(value: str) -> int:
    """argparse type: :func:`memory_size`, 0 allowed."""
    return memory_size(value, zero=True)


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


def add_plan_options(p: argparse.ArgumentParser) -> None:
    """The options of ``neva plan`` (``neva config validate --plan`` takes them too)."""
    from neva_tools.plan.gpus import DEFAULT_MFU, GPUS

    g = p.add_argument_group("plan")
    g.add_argument("--gpus-per-node", type=positive_int, default=None, help="GPUs per node (default: trainer.devices, "
                   "else 8); TP stays within a node")  # fmt: skip
    g.add_argument("--nodes", type=positive_int, default=None, help="nodes (default: trainer.num_nodes)")
    g.add_argument("--gpu", choices=sorted(GPUS), default="H100", help="GPU model: peak bf16 TFLOP/s and memory "
                   f"({', '.join(f'{k} {v[0]:g} TFLOP/s {v[1]} GB' for k, v in GPUS.items())})")  # fmt: skip
    g.add_argument("--gpu-memory", type=memory_size, default=None, help="memory per GPU, e.g. 80GB (default: --gpu's)")
    g.add_argument("--tflops", type=positive_float, default=None, help="peak TFLOP/s per GPU (default: --gpu's)")
    g.add_argument("--mfu", type=positive_float, default=DEFAULT_MFU, help=f"model FLOPs utilisation assumed for step "
                   f"times (default {DEFAULT_MFU})")  # fmt: skip
    g.add_argument("--reserve", type=reserve_size, default=None, help="memory per GPU kept free for the CUDA context, "
                   "NCCL, fragmentation and transient tensors (default 8GB)")  # fmt: skip
    g.add_argument("--llm-config", metavar="DIR_OR_FILE", help="the LLM's Hugging Face config.json, NeMo "
                   "model_config.yaml or .nemo (default: model.mm_cfg.llm.from_pretrained)")  # fmt: skip
    g.add_argument("--vision-config", metavar="DIR_OR_FILE", help="the vision tower's Hugging Face config.json "
                   "(default: model.mm_cfg.vision_encoder.from_pretrained; open_clip names resolve "
                   "offline)")  # fmt: skip
    g.add_argument("--micro-batch", type=positive_int, help="micro batch to estimate (default: model.micro_batch_size)")
    g.add_argument("--top", type=positive_int, default=10, help="layouts listed (default 10)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Add ``neva plan``."""
    p = sub.add_parser("plan", parents=[parent], help="per-GPU memory and the parallel layouts that fit a recipe",
                       description="Per-GPU memory (weights, gradients, optimizer state, activations, in-flight "
                       "pipeline micro-batches) of a recipe at its layout, a fit verdict with the largest micro batch "
                       "that fits, and every TP×PP×DP the GPUs allow ranked by estimated step time.")  # fmt: skip
    p.add_argument("config", help="recipe YAML overriding conf/neva_config.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    add_plan_options(p)
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from neva_tools.config.load import load_config

    return print_plan(load_config(args.config, list(args.overrides)), args)


def plan_report(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The plan of ``cfg`` as a JSON-able dict."""
    from neva_tools.plan.estimate import DEFAULT_RESERVE, estimate, largest_fitting_micro_batch
    from neva_tools.plan.gpus import GPUS
    from neva_tools.plan.recipe import plan_inputs
    from neva_tools.plan.search import rank

    per_node = args.gpus_per_node or (cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 8)
    nodes = args.nodes or int(cfg.trainer.num_nodes)
    tflops, gb = GPUS[args.gpu]
    capacity = args.gpu_memory or gb * GiB
    reserve = DEFAULT_RESERVE if args.reserve is None else args.reserve
    inputs = plan_inputs(cfg, llm_config=args.llm_config, vision_config=args.vision_config, gpus=per_node * nodes)
    layout = inputs.layout
    if args.micro_batch:
        layout = replace(layout, micro_batch=args.micro_batch)
    kwargs = {"capacity": capacity, "reserve": reserve}
    possible = (per_node * nodes) % (layout.tp * layout.pp) == 0 and layout.tp <= per_node
    chosen = estimate(inputs.model, layout, inputs.batch, **kwargs) if possible else None
    candidates = rank(inputs.model, layout, inputs.batch, gpus_per_node=per_node, nodes=nodes, tflops=args.tflops
                      or tflops, mfu=args.mfu, **kwargs)  # fmt: skip
    return {
        "gpus": {"per_node": per_node, "nodes": nodes, "gpu": args.gpu, "memory_bytes": capacity,
                 "reserve_bytes": reserve, "tflops": args.tflops or tflops, "mfu": args.mfu},
        "model": {"llm": asdict(inputs.model.llm), "vision": None if inputs.model.vision is None else
                  {"arch": asdict(inputs.model.vision.arch), "source": inputs.model.vision.source,
                   "layers_built": inputs.model.vision.layers},
                  "parameters": inputs.model.parameter_count(),
                  "frozen": {"llm": inputs.model.freeze_llm} if inputs.model.vision is None else
                  {"llm": inputs.model.freeze_llm, "vision": inputs.model.freeze_vision,
                   "projector": inputs.model.freeze_projector}},
        "batch": asdict(inputs.batch),
        "layout": _estimate_dict(chosen) if chosen else None,
        "config_layout": {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "micro_batch": layout.micro_batch},
        "largest_micro_batch": largest_fitting_micro_batch(inputs.model, layout, inputs.batch, **kwargs)
        if chosen else None,
        "candidates": [{**_estimate_dict(c.estimate), "largest_micro_batch": c.largest_micro_batch,
                        "step_seconds": round(c.step_seconds, 3), "step_tflop": round(c.flops / 1e12, 1)}
                       for c in candidates],
    }  # fmt: skip


def _estimate_dict(e: Any) -> dict[str, Any]:
    layout = e.layout
    return {
        "tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "dp": layout.dp, "micro_batch": layout.micro_batch,
        "microbatches": layout.microbatches, "precision": layout.precision,
        "distributed_optimizer": layout.distributed_optimizer, "recompute": asdict(layout.recompute),
        "fits": e.fits, "peak_bytes": e.peak.total, "peak_stage": e.peak.pp_rank,
        "stages": [{"pp_rank": s.pp_rank, "weights": s.state.weights, "gradients": s.state.gradients,
                    "optimizer": s.state.optimizer, "activations": s.activations, "in_flight": s.in_flight,
                    "recompute_peak": s.recompute_peak, "total": s.total} for s in e.stages],
    }  # fmt: skip


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def format_plan(report: dict[str, Any]) -> str:
    """The report as tables."""
    g, m, lay = report["gpus"], report["model"], report["layout"]
    llm = m["llm"]
    lines = [f"LLM {llm['source']}: {llm['num_layers']} layers, hidden {llm['hidden']}, FFN {llm['ffn']}, "
             f"{llm['heads']} heads / {llm['groups']} groups, vocab {llm['vocab']}"]  # fmt: skip
    if m["vision"]:
        v = m["vision"]
        lines.append(f"vision {v['source']}: {v['layers_built']} layers built, hidden {v['arch']['hidden_size']}, "
                     f"{v['arch']['image_size']} px / {v['arch']['patch_size']} px patches")  # fmt: skip
    params = ", ".join(f"{k} {n / 1e9:.2f}B" for k, n in m["parameters"].items())
    frozen = ", ".join(k for k, f in m["frozen"].items() if f) or "nothing"
    b = report["batch"]
    images = f", {b['tiles']} tower image(s) and {b['image_tokens']} image tokens" if m["vision"] else ""
    lines.append(f"parameters: {params}; frozen: {frozen}; {b['seq']} tokens{images} per row")
    lines.append(f"GPUs: {g['nodes']} × {g['per_node']} {g['gpu']}, {_gib(g['memory_bytes'])} GiB each, "
                 f"{_gib(g['reserve_bytes'])} GiB reserved; step times assume MFU {g['mfu']} of "
                 f"{g['tflops']:g} TFLOP/s")  # fmt: skip
    if lay is None:
        c = report["config_layout"]
        lines += ["", f"The config's TP {c['tp']} × PP {c['pp']} does not divide {g['nodes'] * g['per_node']} GPUs "
                  f"({g['nodes']} × {g['per_node']}): NOT POSSIBLE here; the layouts these GPUs allow:"]  # fmt: skip
        return "\n".join(lines + _layout_table(report))
    rc = lay["recompute"]["granularity"] or "none"
    lines += ["", f"Config layout TP {lay['tp']} × PP {lay['pp']}" + (f" (VPP {lay['vpp']})" if lay["vpp"] > 1 else "")
              + f" × DP {lay['dp']}, micro batch {lay['micro_batch']}, recompute {rc}, "
              f"{'distributed' if lay['distributed_optimizer'] else 'plain'} Adam, {lay['precision']} (GiB per GPU):",
              f"{'stage':>5} {'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'in-flight':>9} {'recomp':>7} "
              f"{'total':>8}"]  # fmt: skip
    for s in lay["stages"]:
        lines.append(f"{s['pp_rank']:>5} {_gib(s['weights']):>8} {_gib(s['gradients']):>8} {_gib(s['optimizer']):>8} "
                     f"{_gib(s['activations']):>8} {s['in_flight']:>9.2f} {_gib(s['recompute_peak']):>7} "
                     f"{_gib(s['total']):>8}")  # fmt: skip
    verdict = "FITS" if lay["fits"] else "DOES NOT FIT"
    largest = report["largest_micro_batch"]
    lines.append(f"{verdict}: peak {_gib(lay['peak_bytes'])} GiB + {_gib(g['reserve_bytes'])} reserved vs "
                 f"{_gib(g['memory_bytes'])} GiB; largest micro batch that fits: "
                 f"{largest if largest else 'none (not even 1)'}")  # fmt: skip
    return "\n".join(lines + _layout_table(report))


def _layout_table(report: dict[str, Any]) -> list[str]:
    lines = ["", "Layouts, fastest first among those where some micro batch fits (peak and fit at the config's "
              "micro batch; step time at the config's micro batch, or the largest that fits when smaller):",
              f"{'TP':>3} {'PP':>3} {'DP':>3} {'micro':>5} {'peak GiB':>9} {'fits':>5} {'max micro':>9} "
              f"{'step s':>8}"]  # fmt: skip
    for c in report["candidates"][: report.get("top", 10)]:
        lines.append(f"{c['tp']:>3} {c['pp']:>3} {c['dp']:>3} {c['micro_batch']:>5} {_gib(c['peak_bytes']):>9} "
                     f"{'yes' if c['fits'] else 'no':>5} {c['largest_micro_batch'] or '-':>9} "
                     f"{c['step_seconds']:>8.2f}")  # fmt: skip
    if not any(c["largest_micro_batch"] for c in report["candidates"]):
        lines.append("No layout of these GPUs fits, at any micro batch.")
    return lines


def print_plan(cfg: Any, args: argparse.Namespace) -> int:
    """Print the plan; exit status 0 when the config's layout fits, 1 when it does not."""
    report = plan_report(cfg, args)
    report["top"] = args.top
    print(json.dumps(report, indent=1) if args.json else format_plan(report))
    return 0 if report["layout"] and report["layout"]["fits"] else 1
