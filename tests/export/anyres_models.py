"""Tiny pieces for the LLaVA-NeXT / LLaVA-OneVision / SigLIP-LLaVA export tests: a SigLIP tower, a Qwen2 LLM with a
byte-level ChatML tokenizer, our model's logits and generation on an image, and the exported model's.

Our side is ``neva_tools.inference.load.load_neva`` (the model, tiling and layout as training builds them) at the
running TP; the Hugging Face side is ``AutoModelForImageTextToText`` + ``AutoProcessor`` (PIL backend) loaded offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from builders import byte_level_tokenizer, caption_corpus
from neva_models import IMAGE, PATCH, VISION_HIDDEN, _randomize
from PIL import Image

#: The conversation every parity test feeds both sides (one image, then a question).
SYSTEM, QUESTION = "Answer briefly.", "What colour is the circle?"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


def build_hf_siglip(out: Path) -> Path:
    """A tiny random HF ``SiglipVisionModel`` (28 px, 7 px patches, 3 layers, tanh GELU, pooling head)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(4)
    cfg = SiglipVisionConfig(hidden_size=VISION_HIDDEN, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, image_size=IMAGE, patch_size=PATCH)  # fmt: skip
    model = SiglipVisionModel(cfg)
    _randomize(model)
    model.save_pretrained(str(out))
    return out


def _tiny_llm(family: str, hf: Path, out: Path, vocab: int, **config: Any) -> Path:
    """A tiny random ``family`` LLM (hidden 64, 2 layers, GQA, 512 positions: room for AnyRes images) saved in ``hf``
    (tokenizer files already there) and converted to ``out``."""
    import transformers

    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo

    name = {"llama": "Llama", "qwen2": "Qwen2"}[family]
    cfg = getattr(transformers, f"{name}Config")(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=512, rms_norm_eps=1e-5, **config)  # fmt: skip
    cfg.architectures = [f"{name}ForCausalLM"]
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            noise = torch.randn_like(param)
            param.copy_(1.0 + 0.1 * noise if "norm" in key else 0.2 * noise)  # 0.05: greedy repeats one token
    model.save_pretrained(str(hf))
    convert_hf_to_nemo(str(hf), out)
    return out


def build_llama(root: Path, sp_model: Path) -> Path:
    """A tiny random LLaMA (untied, vocabulary 300 = the sentencepiece model's: ``<image>`` needs a new row)."""
    (root / "llama_hf").mkdir(parents=True, exist_ok=True)
    (root / "llama_hf" / "tokenizer.model").write_bytes(sp_model.read_bytes())
    return _tiny_llm("llama", root / "llama_hf", root / "llama.nemo", 300, tie_word_embeddings=False)


def build_qwen2(root: Path, vocab: int = 640) -> Path:
    """A tiny random Qwen2 (tied, QKV biases) with a byte-level ChatML tokenizer smaller than its vocabulary (as
    Qwen2's: ``<image>`` gets a free id), converted to ``root/qwen2.nemo``."""
    from transformers import AutoTokenizer

    tok_dir = byte_level_tokenizer(caption_corpus(), root / "qwen_tok", CHAT_TOKENS)
    AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(str(root / "qwen_hf"))
    return _tiny_llm("qwen2", root / "qwen_hf", root / "qwen2.nemo", vocab, tie_word_embeddings=True)


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB image of ``width`` × ``height``."""
    rng = np.random.default_rng(seed + 7 * width + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def messages(img: Image.Image, answer: str | None = "The circle is red.") -> list[dict[str, Any]]:
    """The parity conversation as chat messages for ``apply_chat_template``."""
    user = [{"type": "image", "image": img}, {"type": "text", "text": QUESTION}]
    out = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    if answer is not None:
        out.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return out


def our_ids(loaded: Any, answer: str | None = "The circle is red.") -> list[int]:
    """Our token ids of the parity conversation (-200 for the image); the generation prompt when ``answer`` is
    None."""
    from neva_tools.data.records import Turn
    from neva_tools.data.templates import tokenize_conversation
    from neva_tools.inference.prompt import generation_prompt

    if answer is None:
        return generation_prompt([Turn("user", f"<image>\n{QUESTION}")], loaded.template, loaded.tokenizer,
                                 system=SYSTEM).input_ids  # fmt: skip
    turns = [Turn("system", SYSTEM), Turn("user", f"<image>\n{QUESTION}"), Turn("assistant", answer)]
    return tokenize_conversation(turns, loaded.template, loaded.tokenizer).input_ids


def our_logits(loaded: Any, img: Image.Image) -> tuple[list[int], torch.Tensor, Any]:
    """(our ids, our logits cut to the vocabulary, the image batch) of the parity conversation on ``img``."""
    batch = loaded.image_processor.batch([img])
    ids = our_ids(loaded)
    tensor = torch.tensor([ids])
    with torch.no_grad():
        logits, _ = loaded.model(batch.pixels, tensor, torch.arange(len(ids))[None], None,
                                 num_image_tiles=batch.tiles, image_sizes=batch.sizes,
                                 runtime_gather_output=True)  # fmt: skip
    return ids, logits[..., : loaded.vocab_size], batch


def logits_job(rank: int, world_size: int, nemo: str, width: int, height: int) -> dict[str, Any]:
    """For ``run_distributed``: our ids, logits and greedy tokens at TP=world_size on ``image(width, height)``."""
    from neva_tools.inference.generate import generate
    from neva_tools.inference.load import load_neva
    from neva_tools.model.parallel import destroy_distributed, init_distributed

    init_distributed(tp=world_size, seed=1234)
    try:
        loaded = load_neva(nemo)
        img = image(width, height)
        ids, logits, batch = our_logits(loaded, img)
        out = generate(loaded.model, loaded.tokenizer, our_ids(loaded, None), batch, max_new_tokens=20, stop_ids=(),
                       vocab_size=loaded.vocab_size)  # fmt: skip
        return {"ids": ids, "logits": logits, "tokens": out.tokens}
    finally:
        destroy_distributed()


def expand(ids: list[int], image_id: int, count: int) -> list[int]:
    """Our ids with the image (-200) replaced by ``count`` Hugging Face image tokens."""
    out: list[int] = []
    for i in ids:
        out.extend([image_id] * count if i == -200 else [i])
    return out


def hf_model(directory: Path) -> Any:
    """The exported model through ``AutoModelForImageTextToText`` (fp32, eager attention, offline)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True,
                                                       attn_implementation="eager").eval()  # fmt: skip


def hf_inputs(directory: Path, img: Image.Image, answer: str | None = "The circle is red.") -> dict[str, Any]:
    """The exported processor's model inputs (offline; its image processor's PIL backend, which resamples as ours)
    for the parity conversation on ``img``."""
    from transformers import AutoImageProcessor, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(directory), local_files_only=True)  # OneVision: a video processor
    processor.image_processor = AutoImageProcessor.from_pretrained(str(directory), backend="pil", local_files_only=True)
    return dict(processor.apply_chat_template(messages(img, answer), tokenize=True, return_dict=True,
                                              return_tensors="pt", add_generation_prompt=answer is None))  # fmt: skip


def hf_logits(directory: Path, img: Image.Image) -> tuple[torch.Tensor, dict[str, Any]]:
    """(the exported model's logits, its processor's inputs) for the parity conversation on ``img``."""
    inputs = hf_inputs(directory, img)
    with torch.no_grad():
        return hf_model(directory)(**inputs).logits, inputs


def hf_greedy(directory: Path, img: Image.Image, new_tokens: int = 20) -> list[int]:
    """transformers' greedy continuation (``new_tokens``, no stop token) of the generation prompt on ``img``."""
    model = hf_model(directory)
    model.generation_config.eos_token_id = None  # ours is told not to stop either: compare every token
    inputs = hf_inputs(directory, img, answer=None)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1] :].tolist()
