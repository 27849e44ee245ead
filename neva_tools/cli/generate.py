"""``neva generate``: answer a prompt about images (or a JSONL file of prompts) with a trained NeVA ``.nemo``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from neva_tools.cli.common import positive_int

logger = logging.getLogger(__name__)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``neva generate`` and ``neva eval``: the model, its parts and the TP size."""
    p.add_argument("--model", required=True, help="the NeVA .nemo written by neva train")
    p.add_argument("--vision", help="CLIP directory (or open_clip name:checkpoint) instead of the one in the config")
    p.add_argument("--llm", help="LLM .nemo when the model's own has no LLM weights and its source moved")
    p.add_argument("--template", help="conversation template (default: the one the model was trained with)")
    p.add_argument("--tp", type=positive_int, default=1,
                   help="tensor-parallel size; launch as many processes with torchrun --nproc_per_node")  # fmt: skip
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="weight dtype (default auto: bf16 on CUDA, fp32 on CPU)")  # fmt: skip


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Add ``neva generate``."""
    p = sub.add_parser(
        "generate",
        parents=[parent],
        help="answer a prompt about images with a NeVA model (KV-cached decoding)",
        description="Renders the prompt with the model's conversation template, decodes greedily (or samples with "
        "--temperature/--top-p) until the template's end of turn, EOS or --max-new-tokens, and prints the answer. "
        "--batch answers a JSONL file of {prompt, image|images, id, system} objects into --output, --batch-size "
        "prompts per forward pass. --dtype auto loads bf16 weights on CUDA, fp32 on the CPU.",
    )
    add_model_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the user's message; <image> marks where images go (default: first)")
    what.add_argument("--batch", metavar="FILE.jsonl", help="answer every prompt of this JSONL file")
    p.add_argument("--image", action="append", default=[], help="an image for --prompt (repeat for several)")
    p.add_argument("--video", help="a video for --prompt (<video> marks where it goes; default: first), its frames "
                   "sampled as the model was trained (model.data.base_interval, video_min/max_frames)")  # fmt: skip
    p.add_argument("--system", help="system prompt instead of the template's default")
    p.add_argument("--output", help="answers JSONL for --batch")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="prompts of --batch per forward pass (default 16; answers as one at a time)")  # fmt: skip
    p.add_argument("--image-folder", help="root for relative image paths in --batch")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="generation budget (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed")
    p.add_argument("--json", action="store_true", help="print the answer as JSON with its stop reason and length")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``neva generate``."""
    from neva_tools.errors import NevaError
    from neva_tools.inference.answer import answer, answer_file, read_prompts
    from neva_tools.inference.generate import Sampling
    from neva_tools.inference.load import load_neva
    from neva_tools.inference.session import inference_session
    from neva_tools.utils.atomic import ANSWERS, check_output_path
    from neva_tools.utils.log import global_rank

    if args.batch is not None and (args.image or args.system):
        raise NevaError("--image and --system go with --prompt; in --batch files give them per line")
    if (args.batch is None) != (args.output is None):
        raise NevaError("--batch FILE.jsonl and --output ANSWERS.jsonl go together")
    if args.output is not None:
        check_output_path(Path(args.output), args.overwrite, ANSWERS)
        read_prompts(args.batch)  # a bad line fails before the model is loaded
    if args.video is not None and (args.batch is not None or args.image):
        raise NevaError("--video goes with --prompt and without --image")
    missing = [image for image in args.image + ([args.video] if args.video else []) if not Path(image).is_file()]
    if missing:
        raise NevaError(f"image(s) not found: {', '.join(missing)}")
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    with inference_session(args.tp, "generate", seed=args.seed):
        loaded = load_neva(args.model, vision=args.vision, llm=args.llm, template=args.template, dtype=args.dtype)
        if args.batch is not None:
            rows = answer_file(loaded, args.batch, args.output, image_folder=args.image_folder,
                               max_new_tokens=args.max_new_tokens, sampling=sampling, overwrite=args.overwrite,
                               batch_size=args.batch_size)  # fmt: skip
            if global_rank() == 0:
                print(f"{len(rows)} answers written to {args.output}")
            return 0
        if args.video is not None:
            out = _answer_video(loaded, args, sampling)
        else:
            out = answer(loaded, args.prompt, args.image, system=args.system, max_new_tokens=args.max_new_tokens,
                         sampling=sampling)  # fmt: skip
        if global_rank() == 0:
            if not out.text.strip():
                logger.warning("%s", empty_answer_notice(out.stop, len(out.tokens)))
            if args.json:
                print(json.dumps({"answer": out.text, "stop": out.stop, "new_tokens": len(out.tokens)}))
            elif out.text.strip():
                print(out.text)
    return 0


def _answer_video(loaded: Any, args: argparse.Namespace, sampling: Any) -> Any:
    """The answer to ``--prompt`` about ``--video``: the clip is the prompt's one media entry (its sampled frames)."""
    from neva_tools.data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Turn
    from neva_tools.data.video import VideoSampling, video_batch
    from neva_tools.inference.generate import generate
    from neva_tools.inference.load import neva_config
    from neva_tools.inference.prompt import generation_prompt, stop_token_ids, user_message

    video = VideoSampling.from_config(neva_config(args.model).get("data"))
    batch = video_batch(args.video, video, loaded.image_processor, int(loaded.model.img_seq_len))
    text = user_message(args.prompt.replace(VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER), 1)
    ids = generation_prompt([Turn("user", text)], loaded.template, loaded.tokenizer, system=args.system,
                            im_start_end=loaded.im_start_end).input_ids  # fmt: skip
    stops = stop_token_ids(loaded.template, loaded.tokenizer)
    return generate(loaded.model, loaded.tokenizer, ids, batch, max_new_tokens=args.max_new_tokens,
                    sampling=sampling, stop_ids=stops, vocab_size=loaded.vocab_size)  # fmt: skip


def empty_answer_notice(stop: str, new_tokens: int) -> str:
    """What an empty answer means (nothing is printed on stdout for it, or ``"answer": ""`` with ``--json``)."""
    why = "EOS first" if stop == "stop_token" and new_tokens == 0 else f"{new_tokens} token(s) of whitespace only"
    return (f"the model produced an empty answer ({why}); a briefly trained model often does: train longer, check "
            "that --template is the one it was trained with, or sample (--temperature 0.7)")  # fmt: skip
