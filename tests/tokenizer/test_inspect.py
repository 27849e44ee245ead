"""``inspect`` summaries of sentencepiece and Hugging Face tokenizers."""

from pathlib import Path

from neva_tools.tokenizer.add_tokens import add_tokens
from neva_tools.tokenizer.inspect import inspect_tokenizer
from neva_tools.tokenizer.tokens import PRESETS


def test_inspect_sentencepiece_lists_added_pieces_and_sample(sp_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "neva.model"
    report = add_tokens(sp_model, out, PRESETS["neva"], "user_defined")
    info = inspect_tokenizer(out)
    assert info["vocab_size"] == report.vocab_size
    assert info["counts"]["user_defined"] == 8 and info["counts"]["control"] == 2  # <s>, </s>
    assert info["special_ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": -1}
    assert [e["piece"] for e in info["user_defined"]] == PRESETS["neva"]
    assert [r.id for r in report.results] == [e["id"] for e in info["user_defined"]]
    assert set(info["sample"]["ids"]) >= {r.id for r in report.results}


def test_inspect_huggingface_with_custom_text(hf_tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tok"
    report = add_tokens(hf_tokenizer_dir, out, ["<image>"], "user_defined")
    info = inspect_tokenizer(out, text="a <image> b")
    assert info["vocab_size"] == report.vocab_size
    assert {"id": report.results[0].id, "piece": "<image>", "special": True} in info["added_tokens"]
    assert info["sample"]["pieces"].count("<image>") == 1
