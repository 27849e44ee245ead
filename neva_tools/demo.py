"""The end-to-end demo: the whole NeVA pipeline on a laptop CPU, with nothing downloaded.

1. a synthetic visual-QA dataset of coloured shapes (captions for stage 1, questions for stage 2, held out);
2. a sentencepiece tokenizer trained on its text, extended with NeVA's special tokens;
3. a tiny random LLaMA in Hugging Face format → ``neva convert hf-to-nemo`` → ``neva repartition --tp 2``;
4. a tiny random open_clip CLIP;
5. stage 1 (projector only) and stage 2 (LLM + projector) with TP=2 on two CPU processes (torchrun);
6. held-out accuracy by answer likelihood, printed next to chance.
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

from neva_tools.data import synthetic

logger = logging.getLogger(__name__)

CLIP_CFG = {
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}  # fmt: skip
CANDIDATES = {"colour": list(synthetic.COLOURS), "shape": list(synthetic.SHAPES), "position": list(synthetic.POSITIONS)}


def neva(*args: str) -> None:
    """Run a ``neva`` subcommand in a fresh process, echoing it."""
    print("$ neva " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "neva_tools", *args], check=True)


def build_llm(out: Path, tokenizer: Path, vocab: int, hidden: int = 128, layers: int = 2) -> Path:
    """A tiny random LLaMA saved in Hugging Face format with ``tokenizer`` as its ``tokenizer.model``."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(out))
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


def prepare(out: Path, *, train: int, heldout: int, image_size: int = 32) -> dict[str, Any]:
    """Steps 1–4: data, tokenizer, LLM .nemo at TP=2, CLIP."""
    data = synthetic.make_dataset(out / "data", train=train, heldout=heldout, size=image_size)
    paths: dict[str, Any] = dict(data)
    text = out / "corpus.txt"
    text.write_text("\n".join(synthetic.corpus()) + "\n")
    neva("tokenizer", "train", "--input", str(text), "--output", str(out / "tokenizer.model"), "--vocab-size", "320",
         "--overwrite")  # fmt: skip
    neva("tokenizer", "add-tokens", "--input", str(out / "tokenizer.model"), "--output",
         str(out / "tokenizer_neva.model"), "--preset", "neva", "--tp", "2", "--overwrite")  # fmt: skip
    build_llm(out / "llm_hf", out / "tokenizer_neva.model", vocab=328)
    neva("convert", "hf-to-nemo", "--input", str(out / "llm_hf"), "--output", str(out / "llm.nemo"), "--overwrite")
    neva("repartition", "--input", str(out / "llm.nemo"), "--output", str(out / "llm_tp2.nemo"), "--tp", "2",
         "--overwrite")  # fmt: skip
    clip = build_clip(out / "clip", image_size)
    paths.update(llm=out / "llm_tp2.nemo", clip=clip, tokenizer=out / "tokenizer_neva.model")
    return paths


def train_stage(nproc: int, overrides: list[str]) -> None:
    """``torchrun --nproc_per_node N -m neva_tools train ...``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "neva_tools", "train", *overrides]  # fmt: skip
    print(f"$ torchrun --nproc_per_node={nproc} -m neva_tools train {' '.join(overrides)}", flush=True)
    subprocess.run(cmd, check=True)


@torch.no_grad()
def evaluate(final: Path, clip: Path, heldout: Path, images: Path, template: str) -> dict[str, dict[str, float]]:
    """Accuracy per question kind on ``heldout``: the candidate answer with the highest likelihood wins."""
    from neva_tools.data.dataset import collate
    from neva_tools.data.images import ImageProcessor
    from neva_tools.data.records import Turn
    from neva_tools.data.templates import tokenize_conversation
    from neva_tools.mappings.clip import open_clip_state_to_mcore, transformer_config
    from neva_tools.model import neva_io
    from neva_tools.model.neva import NevaParts, build_neva_model
    from neva_tools.model.parallel import destroy_distributed, init_distributed
    from neva_tools.model.vision import load_mcore_state, read_clip_vision
    from neva_tools.tokenizer.text import TextTokenizer

    init_distributed(tp=1)
    try:
        cfg, vocab = neva_io.llm_config(final)
        state, arch, _ = read_clip_vision(clip)
        parts = NevaParts({**cfg, "tensor_model_parallel_size": 1}, neva_io.llm_padded_vocab(cfg, vocab, 1),
                          transformer_config(arch, 1), arch.image_size, arch.patch_size, "mlp2x_gelu")  # fmt: skip
        model = build_neva_model(parts).eval()
        neva_io.load_llm(model, final, 1, 0)
        neva_io.load_projector(model, final, "mlp2x_gelu", 1, 0)
        load_mcore_state(model.vision_model, open_clip_state_to_mcore(state, arch), _splits(arch))
        tok = TextTokenizer(neva_io.extract_tokenizer(final, neva_io.scratch_dir()))
        process = ImageProcessor(arch.image_size, "pad")
        scores: dict[str, list[bool]] = {}
        for record in json.loads(heldout.read_text()):
            question, truth = record["conversations"][0]["value"], record["conversations"][1]["value"]
            image = process(images / record["image"])
            batch = []
            for answer in CANDIDATES[record["kind"]]:
                t = tokenize_conversation([Turn("user", question), Turn("assistant", answer)], template, tok)
                ids, labels = torch.tensor(t.input_ids), torch.tensor(t.labels)
                batch.append({"input_ids": ids[:-1], "labels": labels[1:], "images": image[None], "id": answer})
            b = collate(batch, tok.pad_id)
            loss, mask = model(b["images"], b["input_ids"], b["position_ids"], None,
                               labels=b["labels"].clamp(min=0), loss_mask=b["loss_mask"])  # fmt: skip
            nll = (loss * mask).sum(dim=1)
            best = CANDIDATES[record["kind"]][int(nll.argmin())]
            scores.setdefault(record["kind"], []).append(best == truth)
        return {k: {"accuracy": sum(v) / len(v), "chance": 1 / len(CANDIDATES[k]), "questions": len(v)}
                for k, v in scores.items()}  # fmt: skip
    finally:
        destroy_distributed()


def _splits(arch: Any) -> Any:
    from neva_tools.mappings.clip import mcore_splits

    return mcore_splits(arch)


def run(out: Path, *, train: int = 1200, heldout: int = 60, stage1_steps: int = 100, stage2_steps: int = 700,
        nproc: int = 2, image_size: int = 64) -> dict[str, Any]:  # fmt: skip
    """The whole demo; returns the accuracy report (also written to ``out/eval.json``)."""
    start = time.time()
    paths = prepare(out, train=train, heldout=heldout, image_size=image_size)
    common = [f"exp_manager.exp_dir={out / 'runs'}", f"model.mm_cfg.llm.from_pretrained={paths['llm']}",
              f"model.mm_cfg.vision_encoder.from_pretrained={paths['clip']}", "model.tensor_model_parallel_size=2",
              f"model.data.image_folder={paths['images']}", "model.data.num_workers=1",
              "model.data.max_seq_length=256", "model.micro_batch_size=8", f"model.global_batch_size={8 * nproc // 2}",
              "exp_manager.checkpoint_every_n_steps=0", "trainer.log_every_n_steps=10"]  # fmt: skip
    train_stage(nproc, [*common, "name=stage1", f"model.data.data_path={paths['pretrain']}",
                        "model.mm_cfg.llm.model_type=plain", f"trainer.max_steps={stage1_steps}",
                        "model.optim.lr=1e-3", "model.optim.sched.min_lr=1e-4"])  # fmt: skip
    stage1 = out / "runs" / "stage1" / "stage1.nemo"
    train_stage(nproc, [*common, "name=stage2", f"model.data.data_path={paths['finetune']}",
                        "model.mm_cfg.llm.model_type=vicuna_v1", "model.mm_cfg.llm.freeze=false",
                        f"model.mm_cfg.pretrain_mm_mlp_adapter={stage1}", f"trainer.max_steps={stage2_steps}",
                        "model.optim.lr=2e-3", f"model.optim.sched.warmup_steps={min(20, stage2_steps // 10)}",
                        "model.optim.sched.min_lr=1e-4"])  # fmt: skip
    final = out / "runs" / "stage2" / "stage2.nemo"
    report = evaluate(final, paths["clip"], paths["heldout"], paths["images"], "vicuna_v1")
    logs = out / "runs" / "stage2" / "logs"
    result = {"eval": report, "final_nemo": str(final), "logs": str(logs), "loss_png": str(logs / "loss.png"),
              "seconds": round(time.time() - start)}  # fmt: skip
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
