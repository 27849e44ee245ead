#!/usr/bin/env python3
"""Drop-in for LLaVA / LLaVA-NeXT's ``llava/train/train_mem.py`` (``train.py``) command line: runs ``neva train``.

Give it the flags of a LLaVA training script (``--model_name_or_path LLM.nemo --version plain --data_path ...
--vision_tower ... --mm_tunable_parts mm_mlp_adapter --deepspeed zero3.json --bf16 True ...``; Qwen-VL finetune's
``--tune_mm_*``, ``--dataset_use`` and ``--vision_tower_lr`` too). It prints the equivalent ``neva train key=value
...`` command line, notes the flags that need nothing here, and trains. ``--nproc N``: the number of processes
of the job (the global batch is per-device batch × accumulation × N); under torchrun the launcher's
``WORLD_SIZE`` is used. Launch it like ``train_mem.py``: ``torchrun --nproc_per_node N scripts/llava_train.py ...``.
The mapping of every flag: ``neva_tools/train/llava_flags.py``. Exit status 2: a flag or the config is wrong.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from neva_tools.errors import NevaError
    from neva_tools.train import llava_flags

    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(f"{__doc__}\n{llava_flags.__doc__}")
        return 0
    try:
        translation = llava_flags.translate(args)
    except NevaError as exc:
        print(f"llava_train: error: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(translation.command_line(), flush=True)
        for note in translation.notes:
            print(f"llava_train: note: {note}", file=sys.stderr, flush=True)
    from neva_tools.cli.main import main as neva

    return neva(["train", *translation.args()])


if __name__ == "__main__":
    sys.exit(main())
