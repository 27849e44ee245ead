"""``neva plan`` and ``neva config validate --plan`` on the tiny recipe, with the LLM and tower read from a Hugging
Face ``config.json`` each (no download, no conversion); the shapes readers; the layout search's rules."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan_models import TINY_VISION

from neva_tools.cli.main import main
from neva_tools.plan.shapes import llm_shape, open_clip_equivalent, vision_shape

RECIPE = "recipes/tiny_cpu/stage2_finetune.yaml"
HF_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}  # fmt: skip


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("plan")
    (root / "llm").mkdir()
    (root / "llm" / "config.json").write_text(json.dumps(HF_LLAMA))
    (root / "clip.json").write_text(json.dumps(TINY_VISION.to_hf_config()))
    return root / "llm", root / "clip.json"


def _plan(configs: tuple[Path, Path], capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    llm, vision = configs
    code = main(["plan", RECIPE, "--gpus-per-node", "4", "--nodes", "1", "--llm-config", str(llm), "--vision-config",
                 str(vision), *extra])  # fmt: skip
    return code, capsys.readouterr().out


def test_plan_json_lists_the_config_layout_and_every_valid_layout(
    configs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _plan(configs, capsys, "--gpu-memory", "80GB", "--json")
    report = json.loads(out)
    assert code == 0 and report["layout"]["fits"] and report["gpus"]["mfu"] == 0.35
    layout = report["layout"]
    assert (layout["tp"], layout["pp"], layout["dp"], layout["micro_batch"]) == (2, 1, 2, 8)  # TP 2 on 4 GPUs
    assert report["model"]["llm"]["num_layers"] == 4 and report["model"]["llm"]["groups"] == 2
    stage = layout["stages"][0]
    assert layout["precision"] == "32" and 0 < stage["gradients"] < stage["weights"]  # fp32; the frozen tower: no grads
    grid = {(c["tp"], c["pp"], c["dp"]) for c in report["candidates"]}
    assert grid == {(tp, pp, 4 // (tp * pp)) for tp in (1, 2) for pp in (1, 2, 4) if tp * pp <= 4}  # groups 2: TP ≤ 2
    times = [c["step_seconds"] for c in report["candidates"]]
    assert times == sorted(times) and all(c["largest_micro_batch"] == 4 // c["dp"] * 2 for c in report["candidates"])


def test_plan_table_and_a_card_too_small(configs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _plan(configs, capsys, "--gpu-memory", "80GB", "--mfu", "0.5")
    assert code == 0 and "FITS: peak" in out and "MFU 0.5" in out and "TP 2 × PP 1 × DP 2" in out
    code, out = _plan(configs, capsys, "--gpu-memory", "0.001GB", "--reserve", "0")
    assert code == 1 and "DOES NOT FIT" in out and "largest micro batch that fits: none" in out


def test_largest_micro_batch_is_the_boundary(configs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Between a card that holds micro batch 8 and one that does not hold 1, the reported micro batch fits and the
    next larger choice does not."""
    from neva_tools.config.load import load_config
    from neva_tools.plan.estimate import estimate, micro_batch_choices
    from neva_tools.plan.recipe import plan_inputs

    llm, vision = configs
    inputs = plan_inputs(load_config(RECIPE), llm_config=str(llm), vision_config=str(vision), gpus=4)
    small = estimate(inputs.model, replace(inputs.layout, micro_batch=1), inputs.batch, capacity=1 << 40, reserve=0)
    big = estimate(inputs.model, replace(inputs.layout, micro_batch=4), inputs.batch, capacity=1 << 40, reserve=0)
    capacity = (small.peak.total + big.peak.total) // 2
    _, out = _plan(configs, capsys, "--gpu-memory", f"{capacity / (1 << 30)}GB", "--reserve", "0", "--json")
    largest = json.loads(out)["largest_micro_batch"]
    assert largest in micro_batch_choices(inputs.layout) and 1 <= largest < 4
    fits = estimate(inputs.model, replace(inputs.layout, micro_batch=largest), inputs.batch, capacity=capacity,
                    reserve=0)  # fmt: skip
    nxt = micro_batch_choices(inputs.layout)[micro_batch_choices(inputs.layout).index(largest) + 1]
    too_big = estimate(
        inputs.model, replace(inputs.layout, micro_batch=nxt), inputs.batch, capacity=capacity, reserve=0
    )
    assert fits.fits and not too_big.fits


def test_config_validate_plan(configs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    llm, vision = configs
    code = main(["config", "validate", RECIPE, "--offline", "--plan", "--gpus-per-node", "2", "--llm-config",
                 str(llm), "--vision-config", str(vision)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "OK: the config is valid" in out and "Config layout TP 2 × PP 1 × DP 1" in out


def test_plan_without_llm_config_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", RECIPE])
    assert code == 2 and "--llm-config" in capsys.readouterr().err


def test_llm_shape_same_from_hf_config_and_converted_model_config(tmp_path: Path, configs: tuple[Path, Path]) -> None:
    """The converter's ``model_config.yaml`` for the same HF config gives the same shapes."""
    from neva_tools.convert.hf_to_nemo import nemo_config
    from neva_tools.mappings.llama import LlamaArch

    cfg = nemo_config(LlamaArch.from_hf_config(HF_LLAMA), HF_LLAMA, 1, "bf16", 128)
    (tmp_path / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    from_hf, from_yaml = llm_shape(configs[0]), llm_shape(tmp_path / "model_config.yaml")
    assert replace(from_hf, source="") == replace(from_yaml, source="")
    assert (from_hf.ffn, from_hf.kv_channels, from_hf.gated, from_hf.normalization) == (96, 16, True, "RMSNorm")


HUB_NAMES = [("openai/clip-vit-large-patch14-336", "ViT-L-14-336"), ("clip-vit-large-patch14", "ViT-L-14"),
             ("google/siglip-so400m-patch14-384", "ViT-SO400M-14-SigLIP-384")]  # fmt: skip


@pytest.mark.parametrize(("hub", "name"), HUB_NAMES)
def test_hub_names_read_offline_as_open_clip(hub: str, name: str) -> None:
    from neva_tools.train.vision_arch import vision_arch

    assert open_clip_equivalent(hub) == name
    shape = vision_shape(hub)
    assert shape.arch == vision_arch(name) and name in shape.source


def test_unknown_tower_names_the_option(tmp_path: Path) -> None:
    from neva_tools.errors import NevaError

    with pytest.raises(NevaError, match="--vision-config"):
        vision_shape(str(tmp_path / "missing-tower"))


def _layouts(**kw: Any) -> list[Any]:
    from neva_tools.plan.estimate import Layout
    from neva_tools.plan.model import PlannedModel
    from neva_tools.plan.search import layouts
    from neva_tools.plan.shapes import LlmShape

    llm = LlmShape(num_layers=6, hidden=96, ffn=192, heads=12, groups=4, kv_channels=8, vocab=100, gated=True,
                   normalization="RMSNorm", bias=False, qkv_bias=False, tied=False)  # fmt: skip
    base = Layout(tp=1, pp=1, dp=1, micro_batch=1, global_batch=kw.pop("global_batch", 48))
    return layouts(PlannedModel(llm), base, **kw)


def test_layouts_follow_megatron_rules() -> None:
    """TP divides the query groups (4) and stays in a node, PP divides the layers (6), DP the global batch."""
    found = {(x.tp, x.pp, x.dp) for x in _layouts(gpus_per_node=8, nodes=3)}
    expected = {(tp, pp, 24 // (tp * pp)) for tp in (1, 2, 4) for pp in (1, 2, 3, 6) if 24 % (tp * pp) == 0}
    assert found == {e for e in expected if 48 % e[2] == 0}
    assert {(x.tp, x.pp) for x in _layouts(gpus_per_node=2, nodes=2, global_batch=2)} == {(2, 1), (1, 2), (2, 2)}


def test_llm_shape_same_from_nemo_and_its_hf_config(llama_hf: Path, tmp_path: Path) -> None:
    """The ``.nemo`` ``neva convert hf-to-nemo`` writes gives the shapes its source ``config.json`` gives."""
    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo

    convert_hf_to_nemo(str(llama_hf), tmp_path / "llm.nemo", dtype="fp32")
    from_nemo, from_hf = llm_shape(tmp_path / "llm.nemo"), llm_shape(llama_hf / "config.json")
    assert replace(from_nemo, source="") == replace(from_hf, source="")
