"""``neva eval``: validation loss and answer accuracy of a NeVA ``.nemo`` on a LLaVA-format file; a JSON report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neva_tools.cli.common import positive_int
from neva_tools.cli.generate import add_model_args


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Add ``neva eval``."""
    p = sub.add_parser(
        "eval",
        parents=[parent],
        help="validation loss, multiple-choice and short-answer accuracy of a NeVA model",
        description="loss: token-mean loss of the answers (as in training). choice: records with candidates (their "
        "own 'candidates' list or --candidates) are answered by the most likely candidate. generation: records with "
        "short reference answers are answered greedily and scored by exact match and contains (normalised text). "
        "Metrics are also given per record 'kind'.",
    )
    add_model_args(p)
    p.add_argument("--data", required=True, help="LLaVA-format JSON/JSONL (conversations ending with the answer)")
    p.add_argument("--image-folder", help="root for the records' relative image paths")
    p.add_argument("--output", help="the JSON report (default: DATA_STEM.eval.json in the current directory)")
    p.add_argument("--predictions", help="also write per-record results: choice, candidate NLLs, generated answer")
    p.add_argument("--metrics", default="loss,choice,generation", help="comma list of loss, choice, generation")
    p.add_argument("--candidates", help="JSON list of answers for every record, or {kind: [answers]}")
    p.add_argument("--batch-size", type=positive_int, default=8, help="records per forward pass for the loss")
    p.add_argument("--max-new-tokens", type=positive_int, default=16, help="generation budget per answer")
    p.add_argument("--short-answer-words", type=int, default=5, help="generate only for references this short")
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

    if not Path(args.data).is_file():
        raise NevaError(f"--data {args.data} does not exist")
    output = Path(args.output or f"{Path(args.data).stem}.eval.json")
    for path, kind in ((output, EVAL_REPORT), (args.predictions, EVAL_PREDICTIONS)):
        if path is not None:
            check_output_path(Path(path), args.overwrite, kind)
    settings = EvalSettings(
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        short_answer_words=args.short_answer_words,
        candidates=load_candidates(args.candidates) if args.candidates else None,
    )
    with inference_session(args.tp, "eval"):
        loaded = load_neva(args.model, vision=args.vision, llm=args.llm, template=args.template)
        report, predictions = evaluate(loaded, args.data, args.image_folder, settings)
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
