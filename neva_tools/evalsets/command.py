"""``neva eval --benchmark NAME FILE``: flags checked, outputs refused early, the model loaded only when questions
remain unanswered."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from neva_tools.errors import NevaError

BENCHMARK_MAX_NEW_TOKENS = 128  #: LLaVA's model_vqa_loader default


def run_benchmark(args: argparse.Namespace) -> int:
    """Dispatch ``neva eval --benchmark``; returns the exit status."""
    if args.benchmark is None or args.file is None:
        raise NevaError("--benchmark NAME and its FILE go together: neva eval --benchmark mmbench FILE.tsv --model M")
    if args.data is not None:
        raise NevaError("give either --data (our records) or --benchmark NAME FILE, not both")
    unused = [flag for flag, value in (("--candidates", args.candidates), ("--predictions", args.predictions))
              if value is not None]  # fmt: skip
    if unused:
        raise NevaError(f"{', '.join(unused)} belong(s) to --data evaluations, not --benchmark")
    if args.benchmark == "mmbench":
        return _mmbench(args)
    return _llava(args)


def _session(args: argparse.Namespace) -> Any:
    from neva_tools.inference.session import inference_session

    return inference_session(args.tp, "eval")


def _load(args: argparse.Namespace) -> Any:
    from neva_tools.inference.load import load_neva

    return load_neva(args.model, vision=args.vision, llm=args.llm, template=args.template, dtype=args.dtype)


def _mmbench(args: argparse.Namespace) -> int:
    from neva_tools.evalsets.mmbench_eval import MMBenchSettings, check_outputs, evaluate_mmbench
    from neva_tools.evalsets.table import format_table
    from neva_tools.utils.log import global_rank

    if args.answers_file or args.annotations:
        raise NevaError("--answers-file and --annotations are for llava-questions, pope and scienceqa")
    output = Path(args.output or f"{Path(args.file).stem}.mmbench.json")
    if global_rank() == 0:
        check_outputs(output, args.overwrite)
    settings = MMBenchSettings(circular=not args.no_circular, limit=args.limit, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens or BENCHMARK_MAX_NEW_TOKENS,
                               resume=not args.no_resume)  # fmt: skip
    with _session(args):
        report = evaluate_mmbench(_load(args), args.file, output, settings, overwrite=args.overwrite)
    if global_rank() == 0:
        print(format_table(report["table"]))
        kind = "CircularEval" if settings.circular else "plain"
        print(f"{report['correct']}/{report['scored']} questions correct ({kind}); {report['unmatched']['count']} "
              f"answer(s) without an option letter; report written to {output}")  # fmt: skip
    return 0


def _llava(args: argparse.Namespace) -> int:
    from neva_tools.evalsets import llava_questions as lq
    from neva_tools.evalsets import llava_scoring
    from neva_tools.utils.atomic import ANY_FILE, atomic_path, check_output_path
    from neva_tools.utils.log import global_rank

    if args.answers_file is None:
        raise NevaError(f"--benchmark {args.benchmark} needs --answers-file OUT.jsonl (LLaVA's answer layout)")
    if Path(args.answers_file).resolve() == Path(args.file).resolve():
        raise NevaError(f"--answers-file {args.answers_file} is the question file; name a new file for the answers")
    scoring = args.benchmark in ("pope", "scienceqa")
    if scoring != (args.annotations is not None):
        raise NevaError("--annotations goes with --benchmark pope or scienceqa (POPE's coco_pope_*.json directory, "
                        "ScienceQA's problems.json/pid_splits.json directory)")  # fmt: skip
    single = args.single_pred_prompt or args.benchmark == "scienceqa"
    every = lq.read_questions(args.file, single_pred_prompt=single)
    questions = every[: args.limit]
    output = Path(args.output or f"{Path(args.answers_file).with_suffix('')}.scores.json")
    if scoring and global_rank() == 0:
        check_output_path(output, args.overwrite, ANY_FILE)
    model_id = args.model_id or Path(args.model).stem
    earlier = [] if args.no_resume or not Path(args.answers_file).exists() else lq.read_answers(args.answers_file)
    others = sorted({str(a.get("model_id")) for a in earlier} - {model_id})
    if others:
        raise NevaError(f"{args.answers_file} holds answers of model {', '.join(others)}, not {model_id}; pass "
                        "--no-resume to start over or choose another --answers-file")  # fmt: skip
    answered = {a["question_id"] for a in earlier}
    if any(q.question_id not in answered for q in questions):
        with _session(args):
            lq.answer_questions(_load(args), questions, args.answers_file, image_folder=args.image_folder,
                                model_id=model_id, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens or BENCHMARK_MAX_NEW_TOKENS,
                                resume=not args.no_resume)  # fmt: skip
    if global_rank() != 0:
        return 0
    print(f"answers in {args.answers_file}")
    if not scoring:
        return 0
    answers = lq.read_answers(args.answers_file)
    if args.benchmark == "pope":
        scores = {"benchmark": "pope", **llava_scoring.score_pope(every, answers, args.annotations)}
    else:
        scores = {"benchmark": "scienceqa", **llava_scoring.score_scienceqa(answers, args.annotations, args.split)}
    with atomic_path(output, kind=ANY_FILE, overwrite=args.overwrite) as tmp:
        tmp.write_text(json.dumps(scores, indent=2) + "\n")
    print(json.dumps(scores, indent=2))
    print(f"scores written to {output}")
    return 0
