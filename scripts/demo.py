#!/usr/bin/env python3
"""The README's main command (``make demo``): the whole NeVA pipeline on built-in defaults, on CPU.

Synthetic coloured-shape images → a tokenizer trained on their captions and extended with NeVA's
tokens → a tiny random LLaMA converted to ``.nemo`` and repartitioned to TP=2 → a tiny open_clip CLIP →
stage 1 (projector) and stage 2 (LLM + projector; ``--mc-share``: that share of its questions multiple-choice, in
MMBench's prompt format) with TP=2 on two CPU processes → held-out accuracy next to chance, and the held-out
questions asked as an MMBench TSV (VLMEvalKit's table, CircularEval).
Nothing is downloaded beyond the pinned packages.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neva_tools.demo import run
from neva_tools.demo_mmbench import MC_SHARE
from neva_tools.utils.log import setup_logging


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default="demo_output", help="where the demo writes (default %(default)s)")
    parser.add_argument("--train-images", type=int, default=1200, help="synthetic training images")
    parser.add_argument("--stage1-steps", type=int, default=100)
    parser.add_argument("--stage2-steps", type=int, default=700)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--mc-share", type=float, default=MC_SHARE,
                        help="share of stage 2's records that are multiple-choice (default %(default)s)")  # fmt: skip
    args = parser.parse_args()
    setup_logging()  # the neva commands' logging policy for the steps run in this process (the evaluation)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result = run(out, train=args.train_images, stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
                 image_size=args.image_size, mc_share=args.mc_share)  # fmt: skip
    print("\nHeld-out accuracy (answer chosen by likelihood among the candidates):")
    for kind, r in result["eval"].items():
        print(f"  {kind:<9} {r['accuracy']:6.1%}   chance {r['chance']:6.1%}   ({r['questions']} questions)")
    mmb = result["mmbench"]
    print(f"\nMMBench layout: {mmb['questions']} held-out questions ({mmb['tsv']}), CircularEval:")
    print(mmb["printed"])
    for name in ("circular", "plain"):
        print(f"  {name:<8} Overall {mmb['overall_' + name]:6.1%} ({mmb['correct_' + name]}/{mmb['scored']}), "
              f"{mmb['unmatched_' + name]} answer(s) without an option")  # fmt: skip
    print(f"  per question: {mmb['predictions']}\n  reproduce: {mmb['command']}")
    print(f"\nFinal model: {result['final_nemo']}\nLogs: {result['logs']}\nLoss curve: {result['loss_png']}")
    print(f"Demo finished in {result['seconds']} s; report: {out / 'eval.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
