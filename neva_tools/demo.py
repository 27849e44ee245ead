"""The end-to-end demo: the whole NeVA pipeline on a laptop CPU, with nothing downloaded.

1. a synthetic visual-QA dataset of coloured shapes (captions for stage 1, questions for stage 2, held out), the
   stage-2 questions joined by multiple-choice ones in MMBench's prompt format (``mc_share`` of them, 20%);
2. a sentencepiece tokenizer trained on its text, extended with NeVA's special tokens;
3. a tiny random LLaMA in Hugging Face format → ``neva convert hf-to-nemo`` → ``neva repartition --tp 2``;
4. a tiny random open_clip CLIP;
5. stage 1 (projector only) and stage 2 (LLM + projector) with TP=2 on two CPU processes (torchrun);
6. held-out accuracy by answer likelihood, printed next to chance;
7. the held-out questions as an MMBench-layout TSV, asked as ``neva eval --benchmark mmbench`` does (CircularEval
   and plain; :mod:`neva_tools.demo_mmbench`).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from neva_tools import demo_mmbench
from neva_tools.data import synthetic
from neva_tools.tokenizer.text import TextTokenizer

logger = logging.getLogger(__name__)

CLIP_CFG = {
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}  # fmt: skip
CANDIDATES = {"colour": list(synthetic.COLOURS), "shape": list(synthetic.SHAPES), "position": list(synthetic.POSITIONS)}
#: The demo tokenizer's size (256 of it byte-fallback pieces, so few merges: most words are split into letters).
VOCAB = 320


def neva(*args: str) -> None:
    """Run a ``neva`` subcommand in a fresh process, echoing it."""
    print("$ neva " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "neva_tools", *args], check=True)


def build_llm(out: Path, tokenizer: Path, vocab: int, hidden: int = 128, layers: int = 2,
              family: str = "llama") -> Path:  # fmt: skip
    """A tiny random LLaMA (``family="qwen2"``: a Qwen2, with QKV biases and tied embeddings as Qwen2.5-0.5B) saved
    in Hugging Face format with ``tokenizer`` as its ``tokenizer.model``."""
    import transformers

    config_cls, model_cls, tied = {"llama": ("LlamaConfig", "LlamaForCausalLM", False),
                                   "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", True)}[family]  # fmt: skip
    config = getattr(transformers, config_cls)(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=512, tie_word_embeddings=tied)  # fmt: skip
    config.architectures = [model_cls]
    torch.manual_seed(0)
    getattr(transformers, model_cls)(config).save_pretrained(str(out))
    (out / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return out


def build_clip(out: Path, image_size: int = 32) -> Path:
    """A tiny random open_clip CLIP in open_clip's ``local-dir`` layout."""
    import open_clip

    torch.manual_seed(0)
    cfg = {**CLIP_CFG, "vision_cfg": {**CLIP_CFG["vision_cfg"], "image_size": image_size}}
    model = open_clip.model.CLIP(**cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.save(model.state_dict(), out / "open_clip_pytorch_model.bin")
    return out


def prepare(out: Path, *, train: int, heldout: int, image_size: int = 32,
            mc_share: float = demo_mmbench.MC_SHARE) -> dict[str, Any]:  # fmt: skip
    """Steps 1–4: data (``mc_share`` of the stage-2 records multiple-choice), tokenizer, LLM .nemo at TP=2, CLIP."""
    data = synthetic.make_dataset(out / "data", train=train, heldout=heldout, size=image_size)
    paths: dict[str, Any] = dict(data)
    records = json.loads(Path(data["finetune"]).read_text())
    records += demo_mmbench.mc_records(records, CANDIDATES, mc_share)
    Path(data["finetune"]).write_text(json.dumps(records, indent=1))
    text = out / "corpus.txt"
    mc_text = demo_mmbench.corpus(CANDIDATES) if mc_share > 0 else []
    text.write_text("\n".join(synthetic.corpus() + mc_text) + "\n")
    neva("tokenizer", "train", "--input", str(text), "--output", str(out / "tokenizer.model"),
         "--vocab-size", str(VOCAB), "--overwrite")  # fmt: skip
    neva("tokenizer", "add-tokens", "--input", str(out / "tokenizer.model"), "--output",
         str(out / "tokenizer_neva.model"), "--preset", "neva", "--tp", "2", "--overwrite")  # fmt: skip
    tokenizer = out / "tokenizer_neva.model"
    build_llm(out / "llm_hf", tokenizer, vocab=TextTokenizer(tokenizer).vocab_size)
    neva("convert", "hf-to-nemo", "--input", str(out / "llm_hf"), "--output", str(out / "llm.nemo"), "--overwrite")
    neva("repartition", "--input", str(out / "llm.nemo"), "--output", str(out / "llm_tp2.nemo"), "--tp", "2",
         "--overwrite")  # fmt: skip
    clip = build_clip(out / "clip", image_size)
    paths.update(llm=out / "llm_tp2.nemo", clip=clip, tokenizer=out / "tokenizer_neva.model")
    return paths


#: (width, height) of the LLaVA-NeXT inputs' images in encoder tiles: wide, tall, square, very wide, narrow, small;
#: AnyRes picks another canvas for each (and anyres_max_N shrinks the largest grids).
NEXT_SHAPES = ((3, 1.5), (1.5, 3), (3, 3), (3, 1), (1, 2.5), (2, 2))
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")  # ChatML's (LLaVA-NeXT's qwen_1_5), added to the demo's tokenizer


def build_siglip(out: Path, image_size: int = 28, patch_size: int = 7) -> Path:
    """A tiny random Hugging Face SigLIP vision tower (3 layers, hidden 32, no class token) in ``out``."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=image_size, patch_size=patch_size)  # fmt: skip
    SiglipVisionModel(config).save_pretrained(str(out))
    return out


def prepare_next(out: str | Path, *, train: int = 240, heldout: int = 12, image_size: int = 28) -> dict[str, Any]:
    """The inputs of the LLaVA-NeXT tiny recipes (``recipes/tiny_cpu/next_*.yaml``) under ``out``; returns paths.

    Synthetic shapes at several aspect ratios (:data:`NEXT_SHAPES`, up to 3 × 3 tiles of ``image_size`` px), with
    text-only conversations added to the finetuning split (as LLaVA's mix has); a sentencepiece tokenizer with
    ChatML's two tokens; a tiny random Qwen2 (``family="qwen2"``) converted to ``out/llm.nemo``; a tiny random
    SigLIP (``image_size`` px, 7 px patches) in ``out/siglip``. Everything in this process, nothing downloaded.
    """
    from PIL import Image

    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
    from neva_tools.tokenizer.add_tokens import add_tokens
    from neva_tools.tokenizer.train import train_sentencepiece

    out = Path(out)
    data = synthetic.make_dataset(out / "data", train=train, heldout=heldout, size=3 * image_size)
    for i, path in enumerate(sorted(Path(data["images"]).glob("*.png"))):
        width, height = NEXT_SHAPES[i % len(NEXT_SHAPES)]
        with Image.open(path) as img:
            view = img.convert("RGB").resize((round(width * image_size), round(height * image_size)))
        view.save(path)
    captions = [r["conversations"][1]["value"] for r in json.loads(Path(data["pretrain"]).read_text())]
    texts = [{"id": f"text-{i}", "conversations": [{"from": "human", "value": f"Repeat after me: {line}"},
                                                   {"from": "gpt", "value": line}]}
             for i, line in enumerate(captions[::8])]  # fmt: skip
    records = json.loads(Path(data["finetune"]).read_text()) + texts
    Path(data["finetune"]).write_text(json.dumps(records, indent=1))
    corpus = [*synthetic.corpus(), "Repeat after me:"]
    tokenizer = train_sentencepiece(corpus, out / "tokenizer.model", vocab_size=320, overwrite=True)
    add_tokens(tokenizer, out / "tokenizer_chat.model", list(CHAT_TOKENS), "user_defined", overwrite=True)
    build_llm(out / "llm_hf", out / "tokenizer_chat.model", vocab=320 + len(CHAT_TOKENS), hidden=64, family="qwen2")
    convert_hf_to_nemo(str(out / "llm_hf"), out / "llm.nemo", overwrite=True)
    siglip = build_siglip(out / "siglip", image_size)
    return {**data, "llm": out / "llm.nemo", "siglip": siglip, "tokenizer": out / "tokenizer_chat.model"}


def train_stage(nproc: int, overrides: list[str]) -> None:
    """``torchrun --nproc_per_node N -m neva_tools train ...`` (as ``scripts/train.sh N`` runs it)."""
    cmd = [sys.executable, "-m", "neva_tools.utils.launch", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "neva_tools", "train", *overrides]  # fmt: skip
    print(f"$ torchrun --nproc_per_node={nproc} -m neva_tools train {' '.join(overrides)}", flush=True)
    subprocess.run(cmd, check=True)


def evaluate(final: Path, clip: Path, heldout: Path, images: Path, template: str) -> dict[str, dict[str, float]]:
    """Accuracy per question kind on ``heldout``: the candidate answer with the highest likelihood wins.

    This is ``neva eval``'s multiple-choice metric; the candidates are written beside ``heldout`` as
    ``candidates.json``, so ``neva eval --model FINAL --data HELDOUT --image-folder IMAGES --vision CLIP
    --candidates candidates.json`` reproduces these numbers.
    """
    from neva_tools.inference.evaluate import EvalSettings
    from neva_tools.inference.evaluate import evaluate as evaluate_model
    from neva_tools.inference.load import load_neva
    from neva_tools.inference.session import inference_session
    from neva_tools.utils.atomic import atomic_path

    with atomic_path(heldout.with_name("candidates.json")) as tmp:
        tmp.write_text(json.dumps(CANDIDATES, indent=1) + "\n")
    with inference_session(1, "eval"):
        loaded = load_neva(final, vision=clip, template=template)
        report, _ = evaluate_model(loaded, heldout, images, EvalSettings(metrics=("choice",), candidates=CANDIDATES))
    return {kind: {"accuracy": r["accuracy"], "chance": r["chance"], "questions": r["questions"]}
            for kind, r in report["choice"]["by_kind"].items()}  # fmt: skip


def run(out: Path, *, train: int = 1200, heldout: int = 60, stage1_steps: int = 100, stage2_steps: int = 700,
        nproc: int = 2, image_size: int = 64, mc_share: float = demo_mmbench.MC_SHARE) -> dict[str, Any]:  # fmt: skip
    """The whole demo; returns the accuracy report and the MMBench summary (also written to ``out/eval.json``).

    Both stages run ``recipes/tiny_cpu/`` (the hyperparameters live there); only this run's paths, step counts and
    the global batch of ``nproc`` processes (micro batch × DP, DP = ``nproc`` / TP 2) are given on the command line.
    """
    from neva_tools.config.load import load_config

    start = time.time()
    recipes = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu"
    recipe1, recipe2 = recipes / "stage1_pretrain.yaml", recipes / "stage2_finetune.yaml"
    cfg1, cfg2 = load_config(recipe1), load_config(recipe2)
    paths = prepare(out, train=train, heldout=heldout, image_size=image_size, mc_share=mc_share)
    runs, m = out / "runs", cfg1.model
    batch = m.micro_batch_size * nproc // m.tensor_model_parallel_size  # micro batch × DP
    common = [f"exp_manager.exp_dir={runs}", f"model.mm_cfg.llm.from_pretrained={paths['llm']}",
              f"model.mm_cfg.vision_encoder.from_pretrained={paths['clip']}",
              f"model.data.image_folder={paths['images']}", f"model.global_batch_size={batch}"]  # fmt: skip
    train_stage(nproc, [str(recipe1), *common, f"model.data.data_path={paths['pretrain']}",
                        f"trainer.max_steps={stage1_steps}"])  # fmt: skip
    stage1 = runs / cfg1.name / f"{cfg1.name}.nemo"
    mc_length = [f"model.data.max_seq_length={demo_mmbench.MC_MAX_SEQ_LENGTH}"] if mc_share > 0 else []
    warmup = min(int(cfg2.model.optim.sched.warmup_steps), stage2_steps // 10)
    train_stage(nproc, [str(recipe2), *common, f"model.data.data_path={paths['finetune']}",
                        f"model.mm_cfg.pretrain_mm_mlp_adapter={stage1}", f"trainer.max_steps={stage2_steps}",
                        f"model.optim.sched.warmup_steps={warmup}", *mc_length])  # fmt: skip
    final = runs / cfg2.name / f"{cfg2.name}.nemo"
    template = cfg2.model.data.conv_template
    report = evaluate(final, paths["clip"], paths["heldout"], paths["images"], template)
    tsv = demo_mmbench.write_tsv(paths["heldout"].with_name("heldout_mmbench.tsv"),
                                 demo_mmbench.mmbench_rows(paths["heldout"], paths["images"], CANDIDATES))  # fmt: skip
    mmbench = demo_mmbench.evaluate(final, paths["clip"], tsv, out / "mmbench", template)
    logs = runs / cfg2.name / "logs"
    result = {"eval": report, "mmbench": mmbench, "final_nemo": str(final), "logs": str(logs),
              "loss_png": str(logs / "loss.png"), "seconds": round(time.time() - start)}  # fmt: skip
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
