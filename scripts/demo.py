#!/usr/bin/env python3
"""The README's main command (``make demo``): runs the NeVA Recipes pipeline on built-in defaults.

Today the pipeline covers the tokenizer step: train a LLaMA-style sentencepiece tokenizer on generated
captions, extend it with NeVA's special tokens for TP=2, and inspect the result. Later stages
(conversion, repartitioning, training, evaluation) are added here as they land.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
from pathlib import Path

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring"]
PLACES = ["top left", "top right", "bottom left", "bottom right", "centre"]


def captions() -> list[str]:
    """Captions of coloured shapes, the text the demo's tokenizer is trained on."""
    return [
        f"A {colour} {shape} in the {place} of the image."
        for colour, shape, place in itertools.product(COLOURS, SHAPES, PLACES)
    ]


def neva(*args: str) -> None:
    """Run a ``neva`` subcommand, echoing it like a shell would."""
    print("$ neva " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "neva_tools", *args], check=True)
    print(flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default="demo_output", help="where the demo writes (default %(default)s)")
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = out / "captions.txt"
    text.write_text("\n".join(captions()) + "\n")

    neva("tokenizer", "train", "--input", str(text), "--output", str(out / "tokenizer.model"),
         "--vocab-size", "300", "--overwrite")  # fmt: skip
    neva("tokenizer", "add-tokens", "--input", str(out / "tokenizer.model"),
         "--output", str(out / "tokenizer_neva.model"), "--preset", "neva", "--tp", "2", "--overwrite")  # fmt: skip
    neva("tokenizer", "inspect", str(out / "tokenizer_neva.model"))
    print(f"Demo finished: the extended tokenizer is {out / 'tokenizer_neva.model'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
