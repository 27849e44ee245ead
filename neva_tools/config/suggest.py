"""Suggestions for an unknown config key: the closest real keys by name, and by meaning (a curated alias table of the
names other tools give the same setting: LLaVA/transformers arguments, Megatron flags, common spellings)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

#: A leaf name used elsewhere → where that setting lives here.
ALIASES: dict[str, str] = {
    "learning_rate": "model.optim.lr",
    "lr": "model.optim.lr",
    "min_learning_rate": "model.optim.sched.min_lr",
    "warmup": "model.optim.sched.warmup_steps",
    "warmup_iters": "model.optim.sched.warmup_steps",
    "lr_warmup_iters": "model.optim.sched.warmup_steps",
    "lr_scheduler_type": "model.optim.sched.name",
    "scheduler": "model.optim.sched.name",
    "optimizer": "model.optim.name",
    "adam_beta1": "model.optim.betas",
    "adam_beta2": "model.optim.betas",
    "devices": "trainer.devices (or scripts/train.sh N: processes per node)",
    "gpus": "trainer.devices (or scripts/train.sh N: processes per node)",
    "nproc_per_node": "scripts/train.sh N (processes per node)",
    "world_size": "scripts/train.sh N and trainer.num_nodes",
    "nodes": "trainer.num_nodes",
    "nnodes": "trainer.num_nodes",
    "batch_size": "model.micro_batch_size (per rank) or model.global_batch_size",
    "per_device_train_batch_size": "model.micro_batch_size",
    "micro_batch": "model.micro_batch_size",
    "global_batch": "model.global_batch_size",
    "gradient_accumulation_steps": "model.global_batch_size (accumulation = global / (micro × data-parallel size))",
    "train_iters": "trainer.max_steps",
    "iterations": "trainer.max_steps",
    "steps": "trainer.max_steps",
    "epochs": "trainer.max_epochs",
    "num_train_epochs": "trainer.max_epochs",
    "num_epochs": "trainer.max_epochs",
    "max_grad_norm": "trainer.gradient_clip_val",
    "clip_grad": "trainer.gradient_clip_val",
    "grad_clip": "trainer.gradient_clip_val",
    "bf16": "trainer.precision (bf16)",
    "fp16": "trainer.precision (16)",
    "dtype": "trainer.precision",
    "tp": "model.tensor_model_parallel_size",
    "tp_size": "model.tensor_model_parallel_size",
    "tensor_parallel": "model.tensor_model_parallel_size",
    "tensor_model_parallel": "model.tensor_model_parallel_size",
    "pp": "model.pipeline_model_parallel_size",
    "output_dir": "exp_manager.exp_dir",
    "log_dir": "exp_manager.explicit_log_dir",
    "run_name": "name",
    "save_steps": "exp_manager.checkpoint_every_n_steps",
    "save_interval": "exp_manager.checkpoint_every_n_steps",
    "save_total_limit": "exp_manager.save_top_k",
    "resume": "exp_manager.resume_if_exists",
    "logging_steps": "trainer.log_every_n_steps",
    "log_interval": "trainer.log_every_n_steps",
    "model_name_or_path": "model.mm_cfg.llm.from_pretrained",
    "llm": "model.mm_cfg.llm.from_pretrained",
    "llm_path": "model.mm_cfg.llm.from_pretrained",
    "vision_tower": "model.mm_cfg.vision_encoder.from_pretrained",
    "vision_encoder": "model.mm_cfg.vision_encoder.from_pretrained",
    "mm_vision_select_layer": "model.mm_cfg.vision_encoder.vision_select_layer",
    "mm_projector_type": "model.mm_cfg.mm_mlp_adapter_type",
    "projector_type": "model.mm_cfg.mm_mlp_adapter_type",
    "mm_projector_lr": "model.optim.mm_projector_lr",
    "mm_vision_tower_lr": "model.optim.vision_tower_lr",
    "freeze_backbone": "model.mm_cfg.llm.freeze",
    "tune_mm_llm": "model.mm_cfg.llm.freeze (inverted)",
    "tune_mm_vision": "model.mm_cfg.vision_encoder.freeze (inverted)",
    "tune_mm_mlp": "model.mm_cfg.freeze_mm_mlp_adapter (inverted)",
    "tune_mm_mlp_adapter": "model.mm_cfg.freeze_mm_mlp_adapter (inverted)",
    "mm_tunable_parts": "model.mm_cfg.llm.freeze, model.mm_cfg.vision_encoder.freeze, "
    "model.mm_cfg.freeze_mm_mlp_adapter",
    "version": "model.mm_cfg.llm.model_type (the conversation template)",
    "template": "model.data.conv_template",
    "conv_version": "model.data.conv_template",
    "model_max_length": "model.data.max_seq_length",
    "max_seq_len": "model.data.max_seq_length",
    "seq_length": "model.data.max_seq_length (NeVA) or model.text_pretrain.seq_length",
    "seq_len": "model.data.max_seq_length (NeVA) or model.text_pretrain.seq_length",
    "tokenizer": "model.tokenizer.model",
    "tokenizer_model": "model.tokenizer.model",
    "tokenizer_path": "model.tokenizer.model",
    "image_dir": "model.data.image_folder",
    "images": "model.data.image_folder",
    "dataset": "model.data.data_path",
    "dataset_use": "model.data.data_path (registry names: a%50,b)",
    "datasets": "model.data.data_path (registry names: a%50,b)",
    "dataloader_num_workers": "model.data.num_workers",
    "workers": "model.data.num_workers",
    "gradient_checkpointing": "model.activations_checkpoint_granularity",
    "recompute_granularity": "model.activations_checkpoint_granularity",
    "recompute_method": "model.activations_checkpoint_method",
    "recompute_num_layers": "model.activations_checkpoint_num_layers",
    "deepspeed": "model.optim.name (distributed_fused_adam shards optimizer state like ZeRO)",
    "zero_stage": "model.optim.name (distributed_fused_adam)",
    "use_distributed_optimizer": "model.optim.name (distributed_fused_adam)",
    "group_by_modality_length": "model.data.group_by_modality_length",
    "mm_use_im_start_end": "model.mm_cfg.use_im_start_end with model.mm_cfg.im_start_end_tokens=[<im_start>,<im_end>]",
    "packing": "model.data.packing",
    "pack_sequences": "model.data.packing",
}


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").lstrip("_")


def by_name(key: str, ours: Sequence[str]) -> list[str]:
    """Up to 2 of ``ours`` whose last name part is closest to ``key``'s (same section first), else by the full key."""
    leaf = _norm(key.rsplit(".", 1)[-1])
    section = key.split(".", 1)[0]
    leaves: dict[str, list[str]] = {}
    for full in ours:
        leaves.setdefault(_norm(full.rsplit(".", 1)[-1]), []).append(full)
    close = difflib.get_close_matches(leaf, list(leaves), n=3, cutoff=0.75)
    found = [full for name in close for full in leaves[name]]
    found.sort(key=lambda full: (full.split(".", 1)[0] != section, close.index(_norm(full.rsplit(".", 1)[-1])),
                                 -difflib.SequenceMatcher(None, key, full).ratio()))  # fmt: skip
    if not found:
        found = difflib.get_close_matches(key, list(ours), n=1, cutoff=0.75)
    return found[:2]


def by_meaning(key: str) -> str | None:
    """Where the setting named ``key`` (its last part, as other tools spell it) lives here, if the table knows."""
    return ALIASES.get(_norm(key.rsplit(".", 1)[-1]))


def suggestions(key: str, ours: Sequence[str]) -> str:
    """``" (did you mean …?; …)"``-style text for an unknown ``key``, empty when nothing is close."""
    parts = []
    names = [n for n in by_name(key, ours) if n != key]
    if names:
        parts.append("did you mean " + " or ".join(repr(n) for n in names) + "?")
    meaning = by_meaning(key)
    if meaning and not any(meaning.startswith(n) for n in names):
        parts.append(f"the same setting here: {meaning}")
    return f" ({'; '.join(parts)})" if parts else ""
