"""NeMo's ``mm_cfg.use_im_start_end``: every image between ``<extra_id_4>`` and ``<extra_id_5>`` in training data,
prompts and the exported chat template; a tokenizer without them is a config problem naming the fix. LLaVA-1's
flavour (``mm_cfg.im_start_end_tokens: [<im_start>, <im_end>]``) the same way with its two tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neva_tools.data.dataset import NevaDataset, collate
from neva_tools.data.images import ImageProcessor
from neva_tools.data.records import Turn
from neva_tools.data.registry import DatasetSpec, DatasetUse
from neva_tools.data.templates import (
    IGNORE_INDEX,
    IM_END_TOKEN,
    IM_START_TOKEN,
    IMAGE_TOKEN_INDEX,
    LLAVA_IM_TOKENS,
    get_template,
    image_wrap,
    marks_word_starts,
    tokenize_conversation,
)
from neva_tools.errors import NevaError
from neva_tools.inference.prompt import generation_prompt
from neva_tools.tokenizer.text import TextTokenizer

EXTRA_IDS = [f"<extra_id_{i}>" for i in range(8)]
QUESTION = [Turn("user", "<image>\nWhat colour is the shape?"), Turn("assistant", "Red.")]


@pytest.fixture(scope="module")
def neva_tok(shapes: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes tokenizer (320 pieces) plus NeMo's 8 ``<extra_id_*>`` tokens (ids 320-327)."""
    from neva_tools.tokenizer.add_tokens import add_tokens

    return add_tokens(shapes["tokenizer"], tmp_path_factory.mktemp("im") / "tok_neva.model", EXTRA_IDS).output


def _dataset(shapes: dict, tokenizer: Path, **kwargs: object) -> NevaDataset:
    use = DatasetUse(DatasetSpec("finetune", shapes["finetune"], shapes["images"], "vicuna_v1"))
    return NevaDataset([use], tokenizer, ImageProcessor(image_size=28), image_tokens=4, **kwargs)


def test_the_image_id_is_wrapped_and_unsupervised(neva_tok: Path) -> None:
    tok = TextTokenizer(neva_tok)
    assert (tok.token_id(IM_START_TOKEN), tok.token_id(IM_END_TOKEN)) == (324, 325)
    plain = tokenize_conversation(QUESTION, "vicuna_v1", tok)
    wrapped = tokenize_conversation(QUESTION, "vicuna_v1", tok, im_start_end=True)
    at = plain.input_ids.index(IMAGE_TOKEN_INDEX)
    assert wrapped.input_ids[at : at + 3] == [324, IMAGE_TOKEN_INDEX, 325]
    assert wrapped.input_ids == [*plain.input_ids[:at], 324, IMAGE_TOKEN_INDEX, 325, *plain.input_ids[at + 1 :]]
    assert wrapped.labels[at : at + 3] == [IGNORE_INDEX] * 3
    assert wrapped.labels[at + 3 :] == plain.labels[at + 1 :]  # the answer's supervision is unchanged
    assert wrapped.expanded_length(4) == plain.expanded_length(4) + 2  # counted against max_seq_length


def test_collated_batch_has_the_start_and_end_ids_around_each_image(shapes: dict, neva_tok: Path) -> None:
    ds, plain = _dataset(shapes, neva_tok, im_start_end=True), _dataset(shapes, neva_tok)
    batch = collate([ds[i] for i in range(4)], TextTokenizer(neva_tok).pad_id)
    rows, cols = torch.nonzero(batch["input_ids"] == IMAGE_TOKEN_INDEX, as_tuple=True)
    assert rows.tolist() == [0, 1, 2, 3] and len(batch["images"]) == 4
    assert batch["input_ids"][rows, cols - 1].tolist() == [324] * 4
    assert batch["input_ids"][rows, cols + 1].tolist() == [325] * 4
    for shift in (-2, -1, 0):  # the labels of the positions before start, image and end: their targets are unsupervised
        assert (batch["labels"][rows, cols + shift] == IGNORE_INDEX).all()
    assert [ds.length(i) for i in range(4)] == [plain.length(i) + 2 for i in range(4)]  # what packing counts


def test_the_two_tokens_count_against_max_seq_length(shapes: dict, neva_tok: Path) -> None:
    plain = _dataset(shapes, neva_tok)
    longest = tokenize_conversation(plain.items[0].record.turns(), "vicuna_v1", plain.tokenizer).expanded_length(4)
    assert _dataset(shapes, neva_tok, max_seq_length=longest).tokenize(0)[2] == 1  # fits without the wrap
    wrapped = _dataset(shapes, neva_tok, max_seq_length=longest + 1, im_start_end=True)
    with pytest.raises(NevaError, match=f"{longest + 2} tokens after image expansion, more than max_seq_length"):
        wrapped.tokenize(0)


def test_a_tokenizer_without_the_tokens_is_an_error_naming_the_fix(shapes: dict) -> None:
    tok = TextTokenizer(shapes["tokenizer"])
    with pytest.raises(NevaError) as err:
        tokenize_conversation(QUESTION, "vicuna_v1", tok, im_start_end=True)
    message = str(err.value)
    assert f"tokenizer {shapes['tokenizer']} lacks <extra_id_4>, <extra_id_5>" in message
    assert f"neva tokenizer add-tokens --input {shapes['tokenizer']} --output NEW_TOKENIZER --preset neva" in message


def test_generation_prompt_matches_the_training_ids(neva_tok: Path) -> None:
    tok = TextTokenizer(neva_tok)
    trained = tokenize_conversation(QUESTION, "vicuna_v1", tok, im_start_end=True)
    prompt = generation_prompt(QUESTION[:1], "vicuna_v1", tok, im_start_end=True)
    answer_start = next(i for i, label in enumerate(trained.labels) if label != IGNORE_INDEX)
    assert prompt.input_ids == trained.input_ids[:answer_start]
    at = prompt.input_ids.index(IMAGE_TOKEN_INDEX)
    assert prompt.input_ids[at - 1 : at + 2] == [324, IMAGE_TOKEN_INDEX, 325]
    assert generation_prompt(QUESTION[:1], "vicuna_v1", tok).input_ids.count(324) == 0


@pytest.mark.parametrize("template", ["vicuna_v1", "plain", "llama_2"])
def test_exported_chat_template_wraps_images_like_training(neva_tok: Path, template: str) -> None:
    from neva_tools.export.chat_template import chat_template
    from neva_tools.export.tokenizer import check_chat_template, ensure_image_token, hf_tokenizer

    ours, tpl = TextTokenizer(neva_tok), get_template(template)
    tok = hf_tokenizer(neva_tok, tpl)
    image_id = ensure_image_token(tok)
    jinja = chat_template(tpl, word_start_answers=marks_word_starts(ours), im_start_end=True)
    assert "<extra_id_4><image><extra_id_5>" in jinja
    check_chat_template(tok, ours, tpl, jinja, image_id, im_start_end=True)  # what neva export runs before writing
    unwrapped = chat_template(tpl, word_start_answers=marks_word_starts(ours))
    with pytest.raises(NevaError, match="does not reproduce template"):
        check_chat_template(tok, ours, tpl, unwrapped, image_id, im_start_end=True)


@pytest.fixture(scope="module")
def llm_nemo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from builders import build_tiny_llm

    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo

    root = tmp_path_factory.mktemp("im_llm")
    convert_hf_to_nemo(str(build_tiny_llm("llama", root / "hf")), root / "llm.nemo")
    return root / "llm.nemo"


def test_config_problem_names_the_tokenizer_the_tokens_and_the_command(
    shapes: dict, neva_tok: Path, llm_nemo: Path
) -> None:
    from neva_tools.config.load import load_config
    from neva_tools.train.validate_files import llm_problems

    def problems(tokenizer: Path, wrap: bool) -> list[str]:
        cfg = load_config(None, [f"model.mm_cfg.llm.from_pretrained={llm_nemo}", f"model.tokenizer.model={tokenizer}",
                                 f"model.mm_cfg.use_im_start_end={str(wrap).lower()}",
                                 "model.data.max_seq_length=128"])  # fmt: skip
        return llm_problems(cfg, templates=["vicuna_v1"])

    base = shapes["tokenizer"]
    found = [p for p in problems(base, True) if "use_im_start_end" in p]
    assert len(found) == 1, problems(base, True)
    assert f"tokenizer {base} lacks <extra_id_4>, <extra_id_5>" in found[0]
    new = base.with_name("tok_neva.model")
    assert f"neva tokenizer add-tokens --input {base} --output {new} --preset neva" in found[0]
    assert f"model.tokenizer.model={new}" in found[0]
    assert not any("use_im_start_end" in p for p in problems(base, False))
    assert problems(neva_tok, True) == []  # 328 tokens on a 300-token LLM: added tokens are no problem either


def test_image_tokens_plus_two_must_fit_max_seq_length() -> None:
    """ViT-L/14-336 makes 576 image tokens; wrapped in the two tokens 578, which max_seq_length 578 cannot hold."""
    from neva_tools.config.load import load_config
    from neva_tools.train.validate import check_config

    def problems(wrap: bool) -> list[str]:
        cfg = load_config(None, ["model.mm_cfg.vision_encoder.from_pretrained=ViT-L-14-336-quickgelu:missing.pt",
                                 "model.data.max_seq_length=578",
                                 f"model.mm_cfg.use_im_start_end={str(wrap).lower()}"])  # fmt: skip
        return [p for p in check_config(cfg, offline=True) if "an image becomes" in p]

    assert problems(False) == []
    assert problems(True) == ["an image becomes 578 tokens ((image_size 336 / patch 14)² + 2 (model.mm_cfg."
                              "use_im_start_end)), not less than model.data.max_seq_length (578)"]  # fmt: skip


# LLaVA-1's flavour: --mm_use_im_start_end True wraps images in <im_start> ... <im_end> (mm_cfg.im_start_end_tokens)


@pytest.fixture(scope="module")
def llava_tok(shapes: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes tokenizer (320 pieces) plus LLaVA-1's ``<im_start>`` (320) and ``<im_end>`` (321)."""
    from neva_tools.tokenizer.add_tokens import add_tokens

    return add_tokens(shapes["tokenizer"], tmp_path_factory.mktemp("llava_im") / "tok_llava.model",
                      list(LLAVA_IM_TOKENS)).output  # fmt: skip


def test_im_start_end_tokens_come_from_the_config() -> None:
    from neva_tools.config.load import load_config

    def wrap(*overrides: str) -> tuple[str, str] | None:
        return image_wrap(load_config(None, list(overrides)).model.mm_cfg)

    assert wrap() is None and wrap("model.mm_cfg.im_start_end_tokens=[<im_start>,<im_end>]") is None
    assert wrap("model.mm_cfg.use_im_start_end=true") == (IM_START_TOKEN, IM_END_TOKEN)  # NeMo's by default
    assert wrap("model.mm_cfg.use_im_start_end=true", "model.mm_cfg.im_start_end_tokens=[<im_start>,<im_end>]") == (
        "<im_start>", "<im_end>")  # fmt: skip
    assert image_wrap({"use_im_start_end": True}) == (IM_START_TOKEN, IM_END_TOKEN)  # a .nemo saved before the key
    for bad in ("[<im_start>]", "[<im_start>,<im_start>]", "<im_start>"):
        with pytest.raises(NevaError, match=r"model.mm_cfg.im_start_end_tokens \(.*\) must be two distinct tokens"):
            wrap("model.mm_cfg.use_im_start_end=true", f"model.mm_cfg.im_start_end_tokens={bad}")


def test_collated_batch_has_llavas_tokens_around_each_image(shapes: dict, llava_tok: Path) -> None:
    ds = _dataset(shapes, llava_tok, im_start_end=LLAVA_IM_TOKENS)
    plain = _dataset(shapes, llava_tok)
    batch = collate([ds[i] for i in range(4)], TextTokenizer(llava_tok).pad_id)
    rows, cols = torch.nonzero(batch["input_ids"] == IMAGE_TOKEN_INDEX, as_tuple=True)
    assert rows.tolist() == [0, 1, 2, 3] and len(batch["images"]) == 4
    assert batch["input_ids"][rows, cols - 1].tolist() == [320] * 4
    assert batch["input_ids"][rows, cols + 1].tolist() == [321] * 4
    assert [len(ds[i]["input_ids"]) for i in range(4)] == [len(plain[i]["input_ids"]) + 2 for i in range(4)]


def test_inference_prompt_has_llavas_tokens_like_training(llava_tok: Path) -> None:
    tok = TextTokenizer(llava_tok)
    trained = tokenize_conversation(QUESTION, "vicuna_v1", tok, im_start_end=LLAVA_IM_TOKENS)
    prompt = generation_prompt(QUESTION[:1], "vicuna_v1", tok, im_start_end=LLAVA_IM_TOKENS)
    answer_start = next(i for i, label in enumerate(trained.labels) if label != IGNORE_INDEX)
    assert prompt.input_ids == trained.input_ids[:answer_start]
    at = prompt.input_ids.index(IMAGE_TOKEN_INDEX)
    assert prompt.input_ids[at - 1 : at + 2] == [320, IMAGE_TOKEN_INDEX, 321]


def test_a_tokenizer_without_llavas_tokens_names_them_and_the_command(shapes: dict, neva_tok: Path) -> None:
    for path in (shapes["tokenizer"], neva_tok):  # NeMo's <extra_id_4/5> are not LLaVA's tokens
        with pytest.raises(NevaError) as err:
            tokenize_conversation(QUESTION, "vicuna_v1", TextTokenizer(path), im_start_end=LLAVA_IM_TOKENS)
        message = str(err.value)
        assert f"in <im_start> ... <im_end>, but tokenizer {path} lacks <im_start>, <im_end>" in message
        command = f"neva tokenizer add-tokens --input {path} --output NEW_TOKENIZER --tokens '<im_start>' '<im_end>'"
        assert command in message


def test_exported_chat_template_wraps_images_in_llavas_tokens(llava_tok: Path) -> None:
    from neva_tools.export.chat_template import chat_template
    from neva_tools.export.tokenizer import check_chat_template, ensure_image_token, hf_tokenizer

    ours, tpl = TextTokenizer(llava_tok), get_template("vicuna_v1")
    tok = hf_tokenizer(llava_tok, tpl)
    image_id = ensure_image_token(tok)
    jinja = chat_template(tpl, word_start_answers=marks_word_starts(ours), im_start_end=LLAVA_IM_TOKENS)
    assert "<im_start><image><im_end>" in jinja and "<extra_id_4>" not in jinja
    check_chat_template(tok, ours, tpl, jinja, image_id, im_start_end=LLAVA_IM_TOKENS)
    nemo = chat_template(tpl, word_start_answers=marks_word_starts(ours), im_start_end=True)
    with pytest.raises(NevaError, match="does not reproduce template"):
        check_chat_template(tok, ours, tpl, nemo, image_id, im_start_end=LLAVA_IM_TOKENS)


def test_config_problem_names_llavas_tokens_and_the_command(shapes: dict, llava_tok: Path, llm_nemo: Path) -> None:
    from neva_tools.config.load import load_config
    from neva_tools.train.validate_files import llm_problems

    def problems(tokenizer: Path) -> list[str]:
        cfg = load_config(None, [f"model.mm_cfg.llm.from_pretrained={llm_nemo}", f"model.tokenizer.model={tokenizer}",
                                 "model.mm_cfg.use_im_start_end=true", "model.data.max_seq_length=128",
                                 "model.mm_cfg.im_start_end_tokens=[<im_start>,<im_end>]"])  # fmt: skip
        return [p for p in llm_problems(cfg, templates=["vicuna_v1"]) if "use_im_start_end" in p]

    base = shapes["tokenizer"]
    (found,) = problems(base)
    new = base.with_name("tok_neva.model")
    assert f"tokenizer {base} lacks <im_start>, <im_end> (every image is wrapped in <im_start> ... <im_end>" in found
    assert f"neva tokenizer add-tokens --input {base} --output {new} --tokens '<im_start>' '<im_end>'" in found
    assert problems(llava_tok) == []
