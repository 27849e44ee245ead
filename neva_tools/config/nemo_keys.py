"""NeMo NeVA's config keys and their fate here: one table, as data (like the weight mappings).

Every key of NeMo 1's ``neva_config.yaml`` / ``neva_finetune.yaml`` (and the NeMo users' files built from them) is
one of

- ``Ours``: the same key with the same meaning in ``conf/neva_config.yaml``;
- ``Derived``: an architecture key; the value is read from the checkpoints, and a value given in the config is checked
  against them (``neva_tools.config.derived``), a disagreement being an error naming both;
- ``Mapped``: the same setting under another key here (moved when the config is loaded);
- ``Same``: must equal another key's value (NeMo's interpolations such as ``model.precision: ${trainer.precision}``);
- ``Inert``: accepted with no effect here (a kernel, logger or pipeline toggle), listed once in one note at start;
- ``Refused``: accepted at the values we honour (then inert), any other value is an error saying why.

``neva_tools.config.translate`` applies the table to one config source (a recipe or NeMo file, or the command
line); keys that are neither ours nor in the table are unknown, and every unknown key of a source is reported at once
with suggestions.
:func:`markdown_table` renders the table for ``docs/nemo_config_keys.md`` (a test keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Ours:
    """The same key, with the same meaning, in ``conf/neva_config.yaml``."""

    note: str = ""


@dataclass(frozen=True)
class Derived:
    """An architecture key read from a checkpoint (``against``); a value set in the config is checked against it."""

    against: str


@dataclass(frozen=True)
class Mapped:
    """Moved to ``target`` (``convert`` turns NeMo's value into ours; ``None`` drops the key after conversion)."""

    target: str
    note: str = ""
    convert: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Same:
    """Must equal the value of ``other`` (then dropped)."""

    other: str


@dataclass(frozen=True)
class Inert:
    """Accepted and ignored: ``reason`` says why it has no effect here."""

    reason: str


@dataclass(frozen=True)
class Refused:
    """Accepted (and inert) at the ``allowed`` values; any other value is an error: ``reason`` says why."""

    reason: str
    allowed: tuple[Any, ...] = field(default=(None, False))


Fate = Ours | Derived | Mapped | Same | Inert | Refused

_LLM = "the LLM .nemo (mm_cfg.llm.from_pretrained)"
_VISION = "the vision encoder (mm_cfg.vision_encoder.from_pretrained)"
_FUSION = "a kernel-fusion toggle: fusions are chosen per device (neva_tools.model.gpt.fusion_flags)"
_PP = "a pipeline-parallel setting this engine does not implement (megatron-core's schedules place the layers)"
_VAL = "NeVA training runs no validation loop (evaluate with neva eval)"
_CKPT = "checkpoints are the newest N dist checkpoints (exp_manager.save_top_k) and the run's .nemo at the end"
_FP8 = "fp8 needs Transformer Engine, which this stack does not use"
_INIT = "weights come from the checkpoints; a fresh projector uses megatron-core's initialisation"


def _not_false(value: Any) -> bool:
    return not (value is False or str(value).lower() == "false")


def _checkpoints_off(value: Any) -> int | None:
    """``create_checkpoint_callback: false`` → no periodic checkpoints (``checkpoint_every_n_steps: 0``)."""
    return None if _not_false(value) else 0


#: Every NeMo NeVA key (dotted, as in NeMo's files) and its fate here.
# fmt: off
NEMO_KEYS: dict[str, Fate] = {
    "name": Ours(),
    "restore_from_path": Mapped("model.mm_cfg.llm.from_pretrained", "NeMo's neva_pretrain reads the LLM .nemo here"),
    # trainer
    "trainer.devices": Ours("checked against the launcher's processes per node (scripts/train.sh N)"),
    "trainer.num_nodes": Ours(),
    "trainer.accelerator": Refused("the device comes from the launcher: CUDA where present, else CPU",
                                   ("gpu", "cuda", "cpu", "auto")),
    "trainer.strategy": Inert("the engine is megatron-core's DDP with tensor parallelism"),
    "trainer.precision": Ours(),
    "trainer.logger": Inert("logs go to exp_manager's run directory (logs/: CSV metrics, loss.png)"),
    "trainer.enable_checkpointing": Inert(_CKPT),
    "trainer.use_distributed_sampler": Inert("the data-parallel sampler is ours (resumable, seeded)"),
    "trainer.max_epochs": Ours("-1 or null: max_steps only"),
    "trainer.max_steps": Ours(),
    "trainer.log_every_n_steps": Ours(),
    "trainer.val_check_interval": Inert(_VAL),
    "trainer.check_val_every_n_epoch": Inert(_VAL),
    "trainer.limit_val_batches": Inert(_VAL),
    "trainer.limit_test_batches": Inert(_VAL),
    "trainer.num_sanity_val_steps": Inert(_VAL),
    "trainer.accumulate_grad_batches": Refused("gradient accumulation is derived: global_batch_size / (micro × DP)",
                                               (1, None)),
    "trainer.gradient_clip_val": Ours(),
    "trainer.benchmark": Inert("cuDNN autotuning only affects convolutions (the ViT patch embedding)"),
    "trainer.enable_model_summary": Inert("parameter counts are logged at start"),
    "trainer.enable_progress_bar": Ours(),
    # exp_manager
    "exp_manager.explicit_log_dir": Ours(),
    "exp_manager.exp_dir": Ours("null: runs"),
    "exp_manager.name": Mapped("name", "the run directory's name, exp_dir/name"),
    "exp_manager.create_wandb_logger": Refused("Weights & Biases is not a dependency; metrics go to logs/ in the run "
                                               "directory"),
    "exp_manager.wandb_logger_kwargs.project": Inert("only with create_wandb_logger"),
    "exp_manager.wandb_logger_kwargs.name": Inert("only with create_wandb_logger"),
    "exp_manager.create_tensorboard_logger": Inert("metrics go to logs/ in the run directory"),
    "exp_manager.resume_if_exists": Ours(),
    "exp_manager.resume_ignore_no_checkpoint": Ours(),
    "exp_manager.resume_from_checkpoint": Ours(),
    "exp_manager.create_checkpoint_callback": Mapped(
        "exp_manager.checkpoint_every_n_steps", "false: no periodic checkpoints (0)", _checkpoints_off),
    "exp_manager.checkpoint_callback_params.monitor": Inert(_CKPT),
    "exp_manager.checkpoint_callback_params.save_top_k": Mapped(
        "exp_manager.save_top_k", "the newest k are kept (no val_loss to rank them)"),
    "exp_manager.checkpoint_callback_params.mode": Inert(_CKPT),
    "exp_manager.checkpoint_callback_params.every_n_train_steps": Mapped("exp_manager.checkpoint_every_n_steps"),
    "exp_manager.checkpoint_callback_params.always_save_nemo": Inert(_CKPT),
    "exp_manager.checkpoint_callback_params.save_nemo_on_train_end": Inert(_CKPT),
    "exp_manager.checkpoint_callback_params.save_last": Inert(_CKPT),
    "exp_manager.checkpoint_callback_params.filename": Inert("checkpoint directories are checkpoints/step_N"),
    "exp_manager.checkpoint_callback_params.model_parallel_size": Inert("derived from the parallel sizes"),
    "exp_manager.ema.enable": Refused("weight EMA is not implemented here"),
    "exp_manager.ema.decay": Inert("only with ema.enable"),
    "exp_manager.ema.validate_original_weights": Inert("only with ema.enable"),
    "exp_manager.ema.every_n_steps": Inert("only with ema.enable"),
    "exp_manager.ema.cpu_offload": Inert("only with ema.enable"),
    "exp_manager.log_step_timing": Inert("step times are logged with the loss"),
    # model: batch and parallelism
    "model.precision": Same("trainer.precision"),
    "model.micro_batch_size": Ours(),
    "model.global_batch_size": Ours(),
    "model.tensor_model_parallel_size": Ours(),
    "model.pipeline_model_parallel_size": Ours(),
    "model.virtual_pipeline_model_parallel_size": Ours("interleaved pipeline stages per rank (null: none)"),
    "model.restore_from_path": Mapped("model.mm_cfg.pretrain_mm_mlp_adapter",
                                      "NeMo's finetuning start: the projector of that NeVA .nemo"),
    "model.resume_from_checkpoint": Mapped("exp_manager.resume_from_checkpoint"),
    "model.seed": Ours(),
    # model: multimodal
    "model.mm_cfg.llm.from_pretrained": Ours(),
    "model.mm_cfg.llm.freeze": Ours(),
    "model.mm_cfg.llm.model_type": Ours("NeMo's and LLaVA's template names are accepted as aliases"),
    "model.mm_cfg.vision_encoder.from_pretrained": Ours(),
    "model.mm_cfg.vision_encoder.from_hf": Ours("checked against what from_pretrained is"),
    "model.mm_cfg.vision_encoder.patch_dim": Derived(_VISION),
    "model.mm_cfg.vision_encoder.hidden_size": Derived(_VISION),
    "model.mm_cfg.vision_encoder.crop_size": Derived(_VISION),
    "model.mm_cfg.vision_encoder.class_token_length": Derived(_VISION),
    "model.mm_cfg.vision_encoder.vision_select_layer": Ours(),
    "model.mm_cfg.vision_encoder.freeze": Ours(),
    "model.mm_cfg.pretrain_mm_mlp_adapter": Ours(),
    "model.mm_cfg.mm_mlp_adapter_type": Ours(),
    "model.mm_cfg.use_im_start_end": Ours(),
    "model.mcore_gpt": Inert("the LLM is always megatron-core's GPTModel; legacy .nemo weights are converted on read"),
    # model: LLM architecture (read from the LLM .nemo)
    "model.encoder_seq_length": Mapped("model.data.max_seq_length", "the training sequence length; checked against "
                                       "the LLM's"),
    "model.max_position_embeddings": Derived(_LLM),
    "model.position_embedding_type": Derived(_LLM),
    "model.num_layers": Derived(_LLM),
    "model.hidden_size": Derived(_LLM),
    "model.ffn_hidden_size": Derived(_LLM),
    "model.num_attention_heads": Derived(_LLM),
    "model.num_query_groups": Derived(_LLM),
    "model.kv_channels": Derived(_LLM),
    "model.normalization": Derived(_LLM),
    "model.layernorm_epsilon": Derived(_LLM),
    "model.bias": Derived(_LLM),
    "model.activation": Derived(_LLM),
    "model.rotary_percentage": Derived(_LLM),
    "model.rotary_base": Derived(_LLM),
    "model.seq_len_interpolation_factor": Derived(_LLM),
    "model.share_embeddings_and_output_weights": Derived(_LLM),
    "model.init_method_std": Inert(_INIT),
    "model.use_scaled_init_method": Inert(_INIT),
    "model.hidden_dropout": Ours("null: the LLM .nemo's value"),
    "model.attention_dropout": Ours("null: the LLM .nemo's value"),
    "model.ffn_dropout": Refused("megatron-core has no separate FFN dropout (hidden_dropout applies)", (None, 0, 0.0)),
    "model.apply_query_key_layer_scaling": Inert("an fp16 overflow guard with the same result; megatron-core applies "
                                                 "it only in fp16"),
    "model.do_layer_norm_weight_decay": Refused("norms and biases are always excluded from weight decay"),
    "model.pre_process": Refused(_PP, (None, True)),
    "model.post_process": Refused(_PP, (None, True)),
    "model.persist_layer_norm": Inert(_FUSION),
    "model.headscale": Refused("megatron-core's attention has no head scaling"),
    "model.transformer_block_type": Refused("megatron-core's layers are pre-LN", (None, "pre_ln")),
    "model.normalize_attention_scores": Refused("attention scores are always scaled by 1/sqrt(head dim)",
                                                (None, True)),
    "model.attention_type": Refused("attention is multi-head (with query groups)", (None, "multihead")),
    "model.overlap_p2p_comm": Inert(_PP),
    "model.batch_p2p_comm": Inert(_PP),
    "model.use_flash_attention": Inert("attention runs through PyTorch SDPA, which picks flash attention on GPUs "
                                       "where it can"),
    # model: recompute, sequence parallelism
    "model.activations_checkpoint_granularity": Ours(),
    "model.activations_checkpoint_method": Ours(),
    "model.activations_checkpoint_num_layers": Ours(),
    "model.num_micro_batches_with_partial_activation_checkpoints": Refused(_PP, (None,)),
    "model.activations_checkpoint_layers_per_pipeline": Refused(_PP, (None,)),
    "model.sequence_parallel": Refused("megatron-core's LLaVAModel runs sequence parallelism only with Transformer "
                                       "Engine's attention, which this stack does not use; TP without it trains the "
                                       "same model (more activation memory: use activation recompute)"),
    # model: precision
    "model.native_amp_init_scale": Ours("fp16 (trainer.precision 16): the initial loss scale"),
    "model.native_amp_growth_interval": Ours("fp16: steps without overflow before the loss scale grows"),
    "model.hysteresis": Ours("fp16: overflows tolerated before the loss scale shrinks"),
    "model.fp32_residual_connection": Refused("residual connections stay in the training dtype"),
    "model.fp16_lm_cross_entropy": Refused("the cross-entropy is computed in fp32"),
    "model.megatron_amp_O2": Ours(),
    "model.async_grad_allreduce": Inert("megatron-core's DDP: see model.optim.overlap_grad_reduce"),
    "model.grad_allreduce_chunk_size_mb": Inert("megatron-core's DDP buckets gradients itself"),
    "model.grad_div_ar_fusion": Inert("megatron-core's DDP averages gradients itself"),
    "model.gradient_as_bucket_view": Inert("megatron-core's DDP always keeps gradients in contiguous buffers"),
    # model: fusions, kernels, legacy
    "model.masked_softmax_fusion": Inert(_FUSION),
    "model.bias_dropout_add_fusion": Inert(_FUSION),
    "model.bias_activation_fusion": Inert(_FUSION),
    "model.gradient_accumulation_fusion": Inert(_FUSION),
    "model.use_cpu_initialization": Inert("weights are read into CPU memory and copied to the device"),
    "model.onnx_safe": Inert("ONNX export is not a path here"),
    "model.openai_gelu": Refused("the activation comes from the LLM .nemo"),
    "model.megatron_legacy": Refused("legacy (non-megatron-core) models are converted on read, not built"),
    "model.transformer_engine": Inert("layers use megatron-core's local spec (no Transformer Engine)"),
    "model.fp8": Refused(_FP8),
    "model.fp8_e4m3": Refused(_FP8),
    "model.fp8_hybrid": Refused(_FP8),
    "model.fp8_margin": Inert("only with fp8"),
    "model.fp8_interval": Inert("only with fp8"),
    "model.fp8_amax_history_len": Inert("only with fp8"),
    "model.fp8_amax_compute_algo": Inert("only with fp8"),
    "model.use_emha": Refused("NeMo's EMHA is not available (and NeMo asks for False)"),
    "model.apex_transformer_log_level": Inert("logging goes through Python's logging (--verbose/--quiet)"),
    # model: tokenizer
    "model.tokenizer.library": Inert("the tokenizer is model.tokenizer.model or the one in the LLM .nemo; its kind "
                                     "is read from the file"),
    "model.tokenizer.type": Inert("the tokenizer's kind is read from its file"),
    "model.tokenizer.model": Ours(),
    "model.tokenizer.vocab_file": Refused("vocab/merge files (GPT-2 BPE) are not read: use a sentencepiece model or "
                                          "a Hugging Face tokenizer directory", (None,)),
    "model.tokenizer.merge_file": Refused("see model.tokenizer.vocab_file", (None,)),
    "model.tokenizer.delimiter": Inert("only for NeMo's tabular tokenizer"),
    "model.tokenizer.sentencepiece_legacy": Inert("added tokens are written into the model by neva tokenizer "
                                                  "add-tokens"),
    "model.tokenizer.additional_special_tokens": Refused("add tokens to the tokenizer file with neva tokenizer "
                                                         "add-tokens", (None,)),
    # model: data
    "model.data.num_workers": Ours(),
    "model.data.dataloader_type": Refused("the sampler is ours: shuffled, resumable (NeMo's cyclic)",
                                          (None, "cyclic", "single")),
    "model.data.data_path": Ours(),
    "model.data.lazy_preprocess": Inert("records are always tokenized lazily"),
    "model.data.is_multimodal": Refused("NeVA data is multimodal; text-only LLM training is model.text_pretrain",
                                        (None, True)),
    "model.data.media_type": Refused("each record says it: an 'image'/'images' or a 'video' field (image, video and "
                                     "text-only records mix)", (None, "image", "video")),
    "model.data.video_folder": Ours(),
    "model.data.num_frames": Refused("clips are sampled every model.data.base_interval seconds within "
                                     "[video_min_frames, video_max_frames]: set both to N for N uniform frames",
                                     (None,)),
    "model.data.splice_single_frame": Refused("one frame per clip: model.data.video_min_frames=1, "
                                              "video_max_frames=1 (the first frame)", (None,)),
    "model.data.sep_image_conv_front": Refused("the image stays where the record's <image> is", (None, False)),
    "model.data.image_token_len": Derived(_VISION + ": (image_size / patch_size)²"),
    "model.data.conv_template": Ours(),
    "model.data.image_folder": Ours(),
    "model.data.image_aspect_ratio": Ours(),
    "model.data.packed_sequence": Mapped("model.data.packing"),
    # model: profiling
    "model.nsys_profile.enabled": Refused("run the launcher under nsys profile instead"),
    "model.nsys_profile.start_step": Inert("only with nsys_profile.enabled"),
    "model.nsys_profile.end_step": Inert("only with nsys_profile.enabled"),
    "model.nsys_profile.ranks": Inert("only with nsys_profile.enabled"),
    "model.nsys_profile.gen_shape": Inert("only with nsys_profile.enabled"),
    # model: optimizer
    "model.optim.name": Ours("fused_adam or distributed_fused_adam; any other name is an error"),
    "model.optim.lr": Ours(),
    "model.optim.weight_decay": Ours(),
    "model.optim.betas": Ours(),
    "model.optim.sched.name": Ours("CosineAnnealing"),
    "model.optim.sched.warmup_steps": Ours(),
    "model.optim.sched.constant_steps": Ours(),
    "model.optim.sched.min_lr": Ours(),
}
# fmt: on


def markdown_table() -> str:
    """``docs/nemo_config_keys.md``: every NeMo key and its fate here."""
    lines = [
        "# NeMo's NeVA config keys here",
        "",
        "NeMo 1's `neva_config.yaml` and `neva_finetune.yaml` load as they are (`neva train NEMO_CONFIG.yaml "
        "key=value ...`, `neva config validate NEMO_CONFIG.yaml`). Each of their keys is *ours* (the same key in "
        "`conf/neva_config.yaml`), *derived* (read from the checkpoints; a value in the config is checked against "
        "them), *mapped* (moved to our key), *same as* another key, *inert* (no effect here; listed once in one note "
        "at start) or *refused* at the values we cannot honour (an error that says why). Generated from "
        "`neva_tools/config/nemo_keys.py` (`python -m neva_tools.config.nemo_keys`); a test keeps it current.",
        "",
        "| NeMo key | fate | here |",
        "|---|---|---|",
    ]
    for key, fate in NEMO_KEYS.items():
        if isinstance(fate, Ours):
            kind, text = "ours", fate.note
        elif isinstance(fate, Derived):
            kind, text = "derived", f"checked against {fate.against}"
        elif isinstance(fate, Mapped):
            kind, text = "mapped", f"`{fate.target}`" + (f": {fate.note}" if fate.note else "")
        elif isinstance(fate, Same):
            kind, text = "same as", f"`{fate.other}`"
        elif isinstance(fate, Inert):
            kind, text = "inert", fate.reason
        else:
            allowed = ", ".join("null" if a is None else f"`{a}`" for a in fate.allowed)
            kind, text = "refused", f"{fate.reason}; accepted: {allowed}"
        lines.append(f"| `{key}` | {kind} | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
