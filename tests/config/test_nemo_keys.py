"""NeMo's neva_config.yaml loads as it is: every key ours, derived, mapped, inert or refused (with a reason);
unknown keys all at once with suggestions by name and by meaning."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from neva_tools.config import nemo_keys
from neva_tools.config.load import BASE_CONFIG, ROOT, load_config, load_config_report
from neva_tools.config.translate import flat_items
from neva_tools.errors import NevaError

FIXTURES = Path(__file__).parent / "fixtures"
SEED = FIXTURES / "seed_004_neva_config.yaml"
PUBLISHED = [FIXTURES / "nemo_neva_config.yaml", FIXTURES / "nemo_neva_finetune.yaml"]


def _base_keys() -> set[str]:
    return {k for k, _ in flat_items(OmegaConf.load(BASE_CONFIG))}


def test_every_key_of_the_seed_and_of_nemos_configs_has_a_fate() -> None:
    base = _base_keys()
    for path in [SEED, *PUBLISHED]:
        keys = [k for k, _ in flat_items(OmegaConf.load(path))]
        assert len(keys) >= 150
        missing = [k for k in keys if k not in nemo_keys.NEMO_KEYS and k not in base]
        assert not missing, (path.name, missing)
    assert len([k for k, _ in flat_items(OmegaConf.load(SEED))]) == 161  # the issue's count


def test_table_targets_exist_in_our_config() -> None:
    base = _base_keys()
    for key, fate in nemo_keys.NEMO_KEYS.items():
        if isinstance(fate, (nemo_keys.Ours, nemo_keys.Derived)):
            assert key in base, key
        if isinstance(fate, nemo_keys.Mapped):
            assert fate.target in base, (key, fate.target)
        if isinstance(fate, nemo_keys.Same):
            assert fate.other in base, key
        if isinstance(fate, (nemo_keys.Inert, nemo_keys.Refused)):
            assert key not in base and fate.reason, key


def test_docs_table_is_current() -> None:
    assert (ROOT / "docs" / "nemo_config_keys.md").read_text() == nemo_keys.markdown_table()


def test_seed_config_loads_with_its_values_mapped() -> None:
    cfg, report = load_config_report(SEED)
    assert cfg.model.mm_cfg.llm.from_pretrained.endswith("llama-2-7b-chat-tp2.nemo")  # top-level restore_from_path
    assert cfg.name == "nemo_neva" and cfg.exp_manager.exp_dir == "runs"  # NeMo's exp_dir null
    assert cfg.exp_manager.save_top_k == 1 and cfg.model.data.max_seq_length == 4096  # encoder_seq_length
    assert cfg.trainer.devices == 2 and cfg.model.tensor_model_parallel_size == 2 and cfg.trainer.precision == "bf16"
    assert cfg.model.num_layers == 40 and cfg.model.rotary_percentage == 0.5  # kept, to be checked against the .nemo
    assert cfg.model.max_position_embeddings == 4096  # ${.encoder_seq_length} resolved inside the NeMo file
    assert cfg.model.mm_cfg.use_im_start_end is True and cfg.model.data.image_token_len == 256
    assert cfg.model.tokenizer.model.endswith("tokenizer_neva.model")
    assert "model.mcore_gpt" in report.inert and "model.fp8" in report.inert and "model.precision" not in report.inert
    assert "exp_manager.name → name" in report.mapped


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.stem)
def test_nemo_published_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.exp_manager.save_top_k == 10 and cfg.model.optim.name == "fused_adam"
    assert cfg.model.mm_cfg.mm_mlp_adapter_type == "linear"
    assert cfg.model.mm_cfg.vision_encoder.from_pretrained is None  # NeMo's "" (not set) is read as null


def test_unknown_keys_are_all_reported_with_suggestions(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  learning_rate: 1.0\n  mm_cfg:\n    vision_encodr:\n      freeze: false\n")
    with pytest.raises(NevaError) as err:
        load_config(recipe, ["trainer.gpus=2", "model.optim.lrr=1", "trainer.max_steps=3"])
    text = str(err.value)
    assert "4 unknown config key(s)" in text
    assert "r.yaml: model.learning_rate (the same setting here: model.optim.lr)" in text
    assert "'model.mm_cfg.vision_encoder.freeze'" in text.split("vision_encodr.freeze")[1].split("\n")[0]
    assert "command line: trainer.gpus (the same setting here: trainer.devices" in text
    assert "command line: model.optim.lrr (did you mean 'model.optim.lr'?)" in text


def test_the_issues_wrong_suggestions_are_gone() -> None:
    """NeMo keys are known now; the name-based suggestions compare the last part of a key first."""
    cfg = load_config(None, ["trainer.devices=2", "model.hidden_size=64", "restore_from_path=x.nemo"])
    assert cfg.trainer.devices == 2 and cfg.model.mm_cfg.llm.from_pretrained == "x.nemo"
    with pytest.raises(NevaError, match=r"trainer\.device \(did you mean 'trainer\.devices'\?\)"):
        load_config(None, ["trainer.device=2"])


def test_refused_values_say_why_and_accepted_values_are_inert() -> None:
    with pytest.raises(NevaError) as err:
        load_config(None, ["model.fp8=true", "trainer.accumulate_grad_batches=4", "exp_manager.ema.enable=true"])
    text = str(err.value)
    assert "model.fp8 is True, which is not supported here: fp8 needs Transformer Engine" in text
    assert "trainer.accumulate_grad_batches is 4" in text and "global_batch_size / (micro × DP)" in text
    assert "exp_manager.ema.enable is True" in text
    _, report = load_config_report(None, ["model.fp8=false", "trainer.accumulate_grad_batches=1"])
    assert report.inert == ["model.fp8", "trainer.accumulate_grad_batches"]


def test_mapped_keys_and_conflicts() -> None:
    cfg = load_config(None, ["exp_manager.checkpoint_callback_params.every_n_train_steps=7",
                             "exp_manager.create_checkpoint_callback=true",
                             "model.data.packed_sequence=true"])  # fmt: skip
    assert cfg.exp_manager.checkpoint_every_n_steps == 7 and cfg.model.data.packing is True
    cfg = load_config(None, ["exp_manager.create_checkpoint_callback=false"])
    assert cfg.exp_manager.checkpoint_every_n_steps == 0


def test_mapped_conflict_in_one_file(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("restore_from_path: a.nemo\nmodel:\n  mm_cfg:\n    llm:\n      from_pretrained: b.nemo\n")
    with pytest.raises(NevaError, match=r"restore_from_path \('a.nemo'\) and model.mm_cfg.llm.from_pretrained"):
        load_config(recipe)


def test_model_precision_must_agree_with_trainer_precision() -> None:
    assert load_config(None, ["trainer.precision=bf16", "model.precision=bf16"]).trainer.precision == "bf16"
    with pytest.raises(NevaError, match=r"model\.precision is 16 but trainer\.precision is 'bf16'"):
        load_config(None, ["trainer.precision=bf16", "model.precision=16"])


def test_shipped_recipe_found_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config("recipes/tiny_cpu/stage1_pretrain.yaml").name == "tiny_stage1"
    assert load_config("tiny_cpu/stage2_finetune.yaml").name == "tiny_stage2"
    with pytest.raises(NevaError, match=r"config nope\.yaml does not exist \(looked at .*nope\.yaml or "):
        load_config("nope.yaml")


def test_recipe_relative_input_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kit").mkdir()
    (tmp_path / "kit" / "llm.nemo").write_bytes(b"x")
    (tmp_path / "kit" / "r.yaml").write_text("model:\n  mm_cfg:\n    llm:\n      from_pretrained: llm.nemo\n"
                                             "  data:\n    image_folder: missing_dir\n")  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(tmp_path / "kit" / "r.yaml")
    assert cfg.model.mm_cfg.llm.from_pretrained == str(tmp_path / "kit" / "llm.nemo")
    assert cfg.model.data.image_folder == "missing_dir"  # exists nowhere: left as written (its error names it)
    (elsewhere / "llm.nemo").write_bytes(b"y")  # present in the current directory: today's meaning wins
    assert load_config(tmp_path / "kit" / "r.yaml").model.mm_cfg.llm.from_pretrained == "llm.nemo"
