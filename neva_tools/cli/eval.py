"""``neva eval``: validation loss and answer accuracy of a NeVA ``.nemo`` on a LLaVA-format file; a JSON report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neva_tools.cli.common import positive_int
from neva_tools.cli.generate import add_model_args

BENCHMARKS = ("mmbench", "llava-questions", "pope", "scienceqa")


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Add ``neva eval``."""
    p = sub.add_parser(
        "eval",
        parents=[parent],
        help="validation loss and accuracy of a NeVA model; MMBench, POPE, ScienceQA and LLaVA's question files",
        description="--data: our records. loss: token-mean loss of the answers (as in training). choice: records "
        "with candidates (their own 'candidates' list or --candidates) are answered by the most likely candidate. "
        "generation: records with short reference answers are answered greedily and scored by exact match and "
        "contains (normalised text). Metrics are also given per record 'kind'. "
        "--benchmark mmbench FILE.tsv: an MMBench-layout TSV (MMBench EN/CN, CCBench) asked with VLMEvalKit's LLaVA "
        "prompt, letters extracted as VLMEvalKit's exact matching does, CircularEval (--no-circular: each question "
        "once), VLMEvalKit's table printed and written with a per-question TSV. --benchmark llava-questions "
        "FILE.jsonl: LLaVA's question files answered into LLaVA's answer JSONL (--answers-file); pope and scienceqa "
        "also score the answers against --annotations. Answers are saved as they come: rerunning continues.",
    )
    add_model_args(p)
    p.add_argument("file", nargs="?", metavar="FILE", help="the --benchmark's file (MMBench TSV, LLaVA question file)")
    p.add_argument("--benchmark", choices=BENCHMARKS, help="a published benchmark's file instead of --data")
    p.add_argument("--data", help="LLaVA-format JSON/JSONL (conversations ending with the answer)")
    p.add_argument("--image-folder", help="root for the records' (questions') relative image paths")
    p.add_argument("--video-folder", help="root for the records' relative video paths (default: --image-folder)")
    p.add_argument("--output", help="the JSON report (default: FILE_STEM.eval.json, FILE_STEM.mmbench.json, "
                   "ANSWERS_STEM.scores.json in the current directory)")  # fmt: skip
    p.add_argument("--predictions", help="also write per-record results: choice, candidate NLLs, generated answer")
    p.add_argument("--metrics", default="loss,choice,generation", help="comma list of loss, choice, generation")
    p.add_argument("--candidates", help="JSON list of answers for every record, or {kind: [answers]}")
    p.add_argument("--batch-size", type=positive_int, default=8, help="records or questions per forward pass")
    p.add_argument("--max-new-tokens", type=positive_int,
                   help="generation budget per answer (default 16 with --data, 128 with --benchmark)")  # fmt: skip
    p.add_argument("--short-answer-words", type=int, default=5, help="generate only for references this short")
    p.add_argument("--no-circular", action="store_true", help="mmbench: ask each question once (no CircularEval)")
    p.add_argument("--limit", type=positive_int, help="--benchmark: the first N questions only (smoke runs)")
    p.add_argument("--no-resume", action="store_true", help="--benchmark: discard earlier answers, ask everything")
    p.add_argument("--answers-file", help="llava-questions/pope/scienceqa: LLaVA's answer JSONL (resumed)")
    p.add_argument("--annotations", help="pope: the coco_pope_*.json directory; scienceqa: the directory of "
                   "problems.json and pid_splits.json")  # fmt: skip
    p.add_argument("--split", default="test", help="scienceqa: the split of pid_splits.json (default test)")
    p.add_argument("--single-pred-prompt", action="store_true",
                   help="conversation-format question files: append LLaVA's letter instruction (always for "
                   "scienceqa)")  # fmt: skip
    p.add_argument("--model-id", help="model_id of the answer lines (default: the .nemo's name)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``neva eval``."""
    from neva_tools.errors import NevaError
    from neva_tools.inference.evaluate import EvalSettings, evaluate, load_candidates
    from neva_tools.inference.load import load_neva
    from neva_tools.inference.session import inference_session
    from neva_tools.utils.atomic import EVAL_PREDICTIONS, EVAL_REPORT, atomic_path, check_output_path
    from neva_tools.utils.log import global_rank

    if args.benchmark is not None or args.file is not None:
        from neva_tools.evalsets.command import run_benchmark

        return run_benchmark(args)
    if args.data is None:
        raise NevaError("give --data FILE (our records) or --benchmark NAME FILE (mmbench, llava-questions, pope, "
                        "scienceqa)")  # fmt: skip
    if not Path(args.data).is_file():
        raise NevaError(f"--data {args.data} does not exist")
    output = Path(args.output or f"{Path(args.data).stem}.eval.json")
    for path, kind in ((output, EVAL_REPORT), (args.predictions, EVAL_PREDICTIONS)):
        if path is not None:
            check_output_path(Path(path), args.overwrite, kind)
    settings = EvalSettings(
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens or 16,
        short_answer_words=args.short_answer_words,
        candidates=load_candidates(args.candidates) if args.candidates else None,
    )
    with inference_session(args.tp, "eval"):
        loaded = load_neva(args.model, vision=args.vision, llm=args.llm, template=args.template, dtype=args.dtype)
        report, predictions = evaluate(loaded, args.data, args.image_folder, settings, video_folder=args.video_folder)
    if global_rank() != 0:
        return 0
    with atomic_path(output, kind=EVAL_REPORT, overwrite=args.overwrite) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    if args.predictions:
        with atomic_path(args.predictions, kind=EVAL_PREDICTIONS, overwrite=args.overwrite) as tmp:
            tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in predictions))
    print(json.dumps({k: v for k, v in report.items() if k in ("loss", "choice", "generation")}, indent=2))
    print(f"report written to {output}")
    return 0
