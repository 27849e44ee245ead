"""``neva config validate``: each rule fires on a crafted config and names both values; a valid config passes.

The files are tiny and built here: a 300-token sentencepiece model, a 2-layer LLaMA converted to ``.nemo``
(4 heads, 2 query groups, FFN 96, hidden 64, encoder_seq_length 128), a 3-layer open_clip CLIP (32 px, patch 8:
16 image tokens; 4 heads, width 64), a Hugging Face CLIP config, stage-1 projectors and the synthetic data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import build_tiny_llm, caption_corpus

from neva_tools.cli.main import main
from neva_tools.config.load import load_config
from neva_tools.train.validate import advisories, check_config

PROJECTOR = "model.embedding.word_embeddings.adapter_layer.mm_projector_adapter.mm_projector."


def _projector_nemo(path: Path, llm_hidden: int, vision_hidden: int, *, kind: str = "mlp2x_gelu") -> Path:
    """A legacy NeVA ``.nemo`` holding only a projector (what stage 2 reads from a stage-1 run)."""
    from neva_tools.checkpoint.nemo_archive import CONFIG_NAME, weights_member
    from neva_tools.checkpoint.nemo_writer import NemoWriter

    state = {
        PROJECTOR + "0.weight": torch.zeros(llm_hidden, vision_hidden),
        PROJECTOR + "0.bias": torch.zeros(llm_hidden),
    }
    if kind == "mlp2x_gelu":
        state |= {
            PROJECTOR + "2.weight": torch.zeros(llm_hidden, llm_hidden),
            PROJECTOR + "2.bias": torch.zeros(llm_hidden),
        }
    with NemoWriter(path) as writer:
        writer.add_yaml(CONFIG_NAME, {"mm_cfg": {"mm_mlp_adapter_type": kind}})
        writer.add_torch(weights_member(0, 1), state)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, shapes: dict) -> dict[str, Path]:
    from neva_tools.convert.hf_to_nemo import convert_hf_to_nemo
    from neva_tools.demo import build_clip
    from neva_tools.tokenizer.add_tokens import add_tokens
    from neva_tools.tokenizer.train import train_sentencepiece

    root = tmp_path_factory.mktemp("validate")
    tok = train_sentencepiece(caption_corpus(), root / "tok.model", vocab_size=300)
    convert_hf_to_nemo(str(build_tiny_llm("llama", root / "llm_hf", sp_model=tok)), root / "llm.nemo")
    add_tokens(tok, root / "tok_extended.model", [f"<extra_id_{i}>" for i in range(8)])
    hf_clip = root / "hf_clip"
    hf_clip.mkdir()
    (hf_clip / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "image_size": 32,
        "patch_size": 8, "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3,
        "intermediate_size": 96}))  # fmt: skip
    return {"llm": root / "llm.nemo", "tok_extended": root / "tok_extended.model", "clip": build_clip(root / "clip"),
            "hf_clip": hf_clip, "root": root, "data": shapes["pretrain"], "images": shapes["images"]}  # fmt: skip


def _base(files: dict[str, Path]) -> list[str]:
    return [f"model.mm_cfg.llm.from_pretrained={files['llm']}", f"model.mm_cfg.vision_encoder.from_pretrained="
            f"{files['clip']}", f"model.data.data_path={files['data']}", f"model.data.image_folder={files['images']}",
            "model.data.max_seq_length=128", "model.mm_cfg.llm.model_type=plain"]  # fmt: skip


def _problems(files: dict[str, Path], *overrides: str, devices: int | None = None) -> list[str]:
    return check_config(load_config(None, [*_base(files), *overrides]), offline=False, devices=devices)


def _fires(problems: list[str], *parts: str) -> bool:
    return any(all(part in p for part in parts) for p in problems)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.global_batch_size=3", "model.micro_batch_size=2"], "global_batch_size (3) must be a multiple of "
                                                                    "model.micro_batch_size (2)"),
        (["model.virtual_pipeline_model_parallel_size=2"], "virtual_pipeline_model_parallel_size is 2 but "
                                                           "pipeline_model_parallel_size is 1"),
        (["model.data.conv_template=alpaca"], "conv_template (alpaca) is not one of plain"),
        (["model.mm_cfg.mm_mlp_adapter_type=qformer"], "mm_mlp_adapter_type (qformer) is not one of"),
        (["model.data.image_aspect_ratio=crop"], "image_aspect_ratio (crop) is not one of"),
        (["trainer.precision=8"], "trainer.precision (8) is not one of"),
        (["model.optim.name=adamw"], "model.optim.name (adamw) is not one of fused_adam, distributed_fused_adam"),
        (["trainer.precision=bf16-true", "model.megatron_amp_O2=false"],
         "bf16-true with model.megatron_amp_O2: false asks for bf16 weights without fp32 master weights"),
        (["model.optim.overlap_param_gather=true"],
         "overlap_param_gather needs model.optim.name distributed_fused_adam (not fused_adam)"),
        (["model.optim.sched.warmup_steps=90", "model.optim.sched.constant_steps=20"],
         "warmup_steps (90) + constant_steps (20) exceed trainer.max_steps (100)"),
        (["model.optim.sched.min_lr=1.0"], "min_lr (1.0) is larger than model.optim.lr (0.002)"),
        (["model.activations_checkpoint_granularity=full"],
         "model.activations_checkpoint_method is None; full recompute needs uniform or block"),
    ],
)  # fmt: skip
def test_each_offline_rule_names_the_values(overrides: list[str], expected: str) -> None:
    problems = check_config(load_config(None, overrides), offline=True)
    assert any(expected in p for p in problems), problems
    assert check_config(load_config(None, []), offline=True) == []


def test_engine_precisions_and_optimizers() -> None:
    """Every NeMo precision maps to fp32, bf16 or fp16 weights (16-bit ones with fp32 master weights); bf16-true is
    bf16 with master weights unless megatron_amp_O2 is false, which is refused (also with neva train, below)."""
    from neva_tools.train.run import trainer_precision

    expected = {"32": "32", "32-true": "32", "bf16": "bf16", "bf16-mixed": "bf16", "bf16-true": "bf16",
                "16": "fp16", "16-mixed": "fp16"}  # fmt: skip
    assert {value: trainer_precision(value) for value in expected} == expected
    assert trainer_precision("bf16-mixed", False) == "bf16" and trainer_precision(32, False) == "32"
    for ok in (["trainer.precision=bf16-true"], ["trainer.precision=bf16", "model.megatron_amp_O2=false"],
               ["trainer.precision=16-mixed"], ["model.optim.name=distributed_fused_adam",
                                                "model.optim.overlap_grad_reduce=true",
                                                "model.optim.overlap_param_gather=true"]):  # fmt: skip
        assert check_config(load_config(None, ok), offline=True) == [], ok


def test_cli_refuses_bf16_without_master_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """... and unknown optimizers: ``neva config validate`` and ``neva train`` (NeVA and text jobs) name both problems
    and what to use instead."""
    bad = ["model.optim.name=adamw", "trainer.precision=bf16-true", "model.megatron_amp_O2=false",
           f"exp_manager.exp_dir={tmp_path}"]  # fmt: skip
    messages = ("model.optim.name (adamw) is not one of fused_adam, distributed_fused_adam",
                "trainer.precision bf16-true with model.megatron_amp_O2: false asks for bf16 weights without fp32 "
                "master weights", "Use trainer.precision=bf16")  # fmt: skip
    assert main(["config", "validate", "--offline", *bad]) == 1
    out = capsys.readouterr().out
    assert all(m in out for m in messages) and "FAILED: 2 problems" in out
    for job in ([], ["model.text_pretrain.enabled=true", "model.text_pretrain.data_path=corpus_text_document"]):
        assert main(["train", *bad, *job]) == 2
        err = capsys.readouterr().err
        assert all(m in err for m in messages), err


def test_stage2_without_projector_is_a_note_not_a_problem() -> None:
    cfg = load_config(None, ["model.mm_cfg.llm.freeze=false"])
    assert check_config(cfg, offline=True) == []
    assert any("without model.mm_cfg.pretrain_mm_mlp_adapter" in n for n in advisories(cfg))
    assert advisories(load_config(None, [])) == []


def test_a_valid_config_passes(files: dict[str, Path]) -> None:
    assert _problems(files) == []
    assert _problems(files, "model.tensor_model_parallel_size=2", devices=2) == []
    stage1 = _projector_nemo(files["root"] / "stage1.nemo", 64, 64)
    stage2 = ["model.mm_cfg.llm.freeze=false", f"model.mm_cfg.pretrain_mm_mlp_adapter={stage1}",
              "model.mm_cfg.llm.model_type=vicuna_v1"]  # fmt: skip
    assert _problems(files, *stage2) == []


@pytest.mark.parametrize(
    ("overrides", "parts"),
    [
        (["model.tensor_model_parallel_size=4"], ["tensor_model_parallel_size (4) must divide num_query_groups (2)"]),
        (["model.data.max_seq_length=256"],
         ["model.data.max_seq_length (256) exceeds the LLM's encoder_seq_length (128)", "would cut"]),
        (["model.data.max_seq_length=16"],
         ["an image becomes 16 tokens ((image_size 32 / patch 8)²), not less than model.data.max_seq_length (16)"]),
        (["model.mm_cfg.vision_encoder.vision_select_layer=-5"],
         ["vision_select_layer", "select_layer (-5)", "3-layer vision encoder", "-3..-1"]),
        (["model.mm_cfg.vision_encoder.vision_select_layer=0"], ["select_layer (0)", "1..3"]),
        (["model.mm_cfg.llm.model_type=chatml"], ["lacks ['<|im_start|>', '<|im_end|>'] needed by template chatml"]),
        (["model.mm_cfg.llm.model_type=llama_3"], ["'<|eot_id|>'] needed by template llama_3"]),
    ],
)  # fmt: skip
def test_each_file_rule_names_both_values(files: dict[str, Path], overrides: list[str], parts: list[str]) -> None:
    problems = _problems(files, *overrides)
    assert _fires(problems, *parts), problems


def test_tp_must_divide_the_vision_heads(files: dict[str, Path]) -> None:
    """The LLM (4 heads, 2 groups) allows TP 2; the Hugging Face CLIP's 3 heads do not."""
    problems = _problems(files, f"model.mm_cfg.vision_encoder.from_pretrained={files['hf_clip']}",
                         "model.tensor_model_parallel_size=2")  # fmt: skip
    assert problems == ["tensor_model_parallel_size (2) must divide the vision num_attention_heads (3)"]


def test_offline_open_clip_names_are_checked_from_the_package_config() -> None:
    """An open_clip model name needs no file: ViT-L/14-336 has 16 heads and 576 image tokens."""
    cfg = load_config(None, ["model.mm_cfg.vision_encoder.from_pretrained=ViT-L-14-336-quickgelu:missing.pt",
                             "model.tensor_model_parallel_size=32", "model.data.max_seq_length=512"])  # fmt: skip
    problems = check_config(cfg, offline=True)
    assert "tensor_model_parallel_size (32) must divide the vision num_attention_heads (16)" in problems
    assert _fires(problems, "an image becomes 576 tokens ((image_size 336 / patch 14)²)", "max_seq_length (512)")
    files_problems = check_config(cfg, offline=False)
    assert _fires(files_problems, "open_clip model ViT-L-14-336-quickgelu needs a local checkpoint", "'missing.pt'")


def test_added_tokens_beyond_the_vocabulary_are_no_problem_for_neva(files: dict[str, Path]) -> None:
    """NeMo's 8 added tokens make 308 tokens; the LLM has 300 rows: NeVA training gives them rows of their own
    (``neva_tools.model.added_vocab``), so no problem at TP 1 or 2; without them the config is valid too."""
    for tp in (1, 2):
        problems = _problems(files, f"model.tokenizer.model={files['tok_extended']}",
                             f"model.tensor_model_parallel_size={tp}")  # fmt: skip
        assert not _fires(problems, "has 308 tokens"), problems
        assert not _fires(problems, "tokenizer"), problems


def test_the_tokenizer_needs_eos(files: dict[str, Path], tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(caption_corpus(), trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(tmp_path / "no_eos"))
    problems = _problems(files, f"model.tokenizer.model={tmp_path / 'no_eos'}")
    assert _fires(problems, f"tokenizer {tmp_path / 'no_eos'} has no EOS token")


def test_the_global_batch_must_divide_by_micro_times_dp(files: dict[str, Path]) -> None:
    problems = _problems(files, "model.micro_batch_size=3", "model.global_batch_size=9", devices=2)
    assert _fires(problems, "global_batch_size (9) must be divisible by micro_batch_size (3) × data-parallel size (2)",
                  "world size 2 = 2 processes per node × trainer.num_nodes 1")  # fmt: skip
    problems = _problems(files, "model.tensor_model_parallel_size=2", "trainer.num_nodes=3", devices=1)
    assert _fires(problems, "world size (3) must be divisible by TP×PP (2)")
    assert check_config(load_config(None, ["model.micro_batch_size=3", "model.global_batch_size=9"])) == []


def test_the_stage1_projector_must_match_both_models(files: dict[str, Path]) -> None:
    root, stage2 = files["root"], "model.mm_cfg.llm.freeze=false"
    cases = [
        (_projector_nemo(root / "v32.nemo", 64, 32), "takes 32 vision features but the vision encoder's hidden size is "
                                                     "64"),
        (_projector_nemo(root / "l48.nemo", 48, 64), "projects to 48 features but the LLM hidden size is 64"),
        (_projector_nemo(root / "lin.nemo", 64, 64, kind="linear"), "holds no mlp2x_gelu projector (missing"),
        (root / "none.nemo", "(" + str(root / "none.nemo") + ") does not exist; run stage 1 first"),
    ]  # fmt: skip
    for path, expected in cases:
        problems = _problems(files, stage2, f"model.mm_cfg.pretrain_mm_mlp_adapter={path}")
        assert _fires(problems, "model.mm_cfg.pretrain_mm_mlp_adapter", expected), (path, problems)


def test_missing_files_are_named(files: dict[str, Path], tmp_path: Path) -> None:
    problems = _problems(files, "model.mm_cfg.llm.from_pretrained=/nope.nemo",
                         f"model.mm_cfg.vision_encoder.from_pretrained={tmp_path}",
                         f"model.data.data_path={tmp_path / 'x.json'}",
                         f"model.data.image_folder={tmp_path / 'imgs'}")  # fmt: skip
    assert "model.mm_cfg.llm.from_pretrained (/nope.nemo) does not exist" in problems
    assert _fires(problems, f"({tmp_path}): {tmp_path} has neither config.json", "nor open_clip_config.json")
    assert f"dataset x: annotation file {tmp_path / 'x.json'} does not exist" in problems
    assert f"model.data.image_folder ({tmp_path / 'imgs'}) is not a directory" in problems
    problems = _problems(files, "model.mm_cfg.vision_encoder.from_pretrained=openai/clip-vit-large-patch14-336")
    assert _fires(
        problems,
        "(openai/clip-vit-large-patch14-336) is not a local CLIP directory",
        "(hf download openai/clip-vit-large-patch14-336 --local-dir clip-vit-large-patch14-336)",
    )


def test_registry_datasets_are_checked(files: dict[str, Path], tmp_path: Path) -> None:
    registry = tmp_path / "datasets.yaml"
    registry.write_text(f"shapes:\n  annotation_path: {files['data']}\n  data_path: {files['images']}\n"
                        f"  template: llama_3\ngone:\n  annotation_path: {tmp_path / 'gone.json'}\n"
                        f"  data_path: {tmp_path / 'gone'}\n")  # fmt: skip
    use = [f"model.data.registry={registry}", "model.data.image_folder=null"]
    problems = _problems(files, *use, "model.data.data_path=shapes%50")
    assert _fires(problems, "lacks", "needed by template llama_3")  # the registry entry's template is checked
    problems = _problems(files, *use, "model.data.data_path=shapes,gone")
    assert f"dataset gone: annotation file {tmp_path / 'gone.json'} does not exist" in problems
    assert f"dataset gone: image folder {tmp_path / 'gone'} is not a directory" in problems
    problems = _problems(files, *use, "model.data.data_path=shapez")
    assert _fires(problems, "model.data.data_path (shapez): unknown dataset 'shapez' (did you mean 'shapes'?)")


def test_text_pretraining_configs_get_the_text_rules(files: dict[str, Path]) -> None:
    text = ["model.text_pretrain.enabled=true", "model.text_pretrain.data_path=corpus_text_document",
            f"model.mm_cfg.llm.from_pretrained={files['llm']}"]  # fmt: skip
    assert check_config(load_config(None, [*text, "model.data.conv_template=nope"])) == []  # NeVA keys do not apply
    every = ["model.text_pretrain.eval_interval=5", "model.text_pretrain.eval_iters=0"]
    assert _fires(check_config(load_config(None, [*text, *every])), "eval_interval (5)")
    problems = check_config(load_config(None, [*text, "model.tensor_model_parallel_size=4"]), offline=False)
    assert _fires(problems, "tensor_model_parallel_size (4) must divide num_query_groups (2)")


def test_cli_validate(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "validate", *_base(files), "model.tensor_model_parallel_size=2", "--devices", "2"]) == 0
    assert "OK: the config is valid" in capsys.readouterr().out
    code = main(["config", "validate", *_base(files), "model.micro_batch_size=3", "model.global_batch_size=9",
                 "--devices", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1 and "problem: global_batch_size (9) must be divisible" in out and "FAILED: 1 problems" in out
