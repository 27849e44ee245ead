"""LLM continued pretraining on mmap text (``model.text_pretrain.enabled: true``; the NEO recipe).

The LLM of ``model.mm_cfg.llm.from_pretrained`` is trained alone (no vision encoder, projector or LLaVA
data) on megatron-core ``GPTDataset`` samples blended from ``model.text_pretrain.data_path`` by
``BlendedMegatronDatasetBuilder``, with the NeVA engine: the Lightning trainer and megatron strategy, the
same optimizer, schedule, dist checkpoints with resume (samples continue where they stopped), logs and
``loss.png``. Every ``eval_interval`` steps the loss on the first ``eval_iters`` global batches of the
validation split is logged as ``val_loss`` (also ``val_loss.csv``). At the end the run writes a GPT
``.nemo`` in the converter's layout (``runs/NAME/NAME.nemo``).

``model.pipeline_model_parallel_size`` > 1 trains pipeline stages with megatron-core's schedules
(:mod:`neva_tools.train.pipeline`; ``model.virtual_pipeline_model_parallel_size`` interleaves them); the
validation loss then runs the forward-only schedule over the same micro-batches.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from neva_tools.errors import NevaError
from neva_tools.model.recompute import recompute_keys
from neva_tools.train.paths import resume_checkpoint, run_directory

logger = logging.getLogger(__name__)


def gpt_forward(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A GPT (pipeline stage)'s output for a ``collate_text`` batch (the last stage: the per-token cross-entropy
    ``[b, s]``) and the batch's loss mask (:data:`~neva_tools.train.pipeline.StageForward`)."""
    losses = model(batch["input_ids"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return losses, batch["loss_mask"].float()


def gpt_loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over the loss-masked tokens, number of those tokens) for a ``collate_text`` batch."""
    from neva_tools.train.pipeline import masked_mean

    return masked_mean(*gpt_forward(model, batch))


class TextValidation(pl.Callback):
    """Every ``every`` optimizer steps and at the end: the token-mean loss over the batches of ``make_loader()``."""

    def __init__(self, make_loader: Callable[[], Any], every: int, directory: Path) -> None:
        self.make_loader, self.every, self.directory = make_loader, every, Path(directory)
        self.history: list[tuple[int, float]] = []
        self._last = -1
        self._step_before = 0  # trainer.global_step when the current micro-batch started

    def evaluate(self, module: pl.LightningModule) -> float:
        """The validation loss, summed over tokens on every data-parallel rank."""
        from megatron.core import parallel_state

        from neva_tools.train import pipeline

        module.gather_weights()  # the weights of the last step (overlap_param_gather)
        model = module.chunk  # through Float16Module: bf16/fp16 weights take the integer batch as in training
        total = torch.zeros(2, dtype=torch.float64, device=module.device)  # summed on the device: no sync per batch
        batches = [{k: v.to(module.device) for k, v in batch.items()} for batch in self.make_loader()]
        if module.pipelined:  # the forward-only schedule; the micro-batch losses come back on every stage
            step = pipeline.evaluate(module.chunks, batches, gpt_forward)
            tokens = step.tokens.double()
            total += torch.stack([(step.losses.double() * tokens).sum(), tokens.sum()])
            batches = []
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in batches:
                loss, tokens = gpt_loss(model, batch)
                tokens = tokens.double()
                total += torch.stack([loss.double() * tokens, tokens])
        model.train(was_training)
        if parallel_state.get_data_parallel_world_size() > 1:
            device = module.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
            total = total.to(device)
            torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return float(total[0] / total[1].clamp(min=1))

    def _run(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last or step == 0:
            return
        self._last = step
        value = self.evaluate(module)
        self.history.append((step, value))
        for log in trainer.loggers:
            log.log_metrics({"val_loss": value}, step=step)

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        from neva_tools.train.loss_plot import read_val_loss

        if trainer.global_step:  # resumed: val_loss.csv keeps the losses up to the checkpoint (the whole run)
            self.history = read_val_loss(self.directory / "val_loss.csv", upto=trainer.global_step)

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        stepped = trainer.global_step != self._step_before  # not in the middle of gradient accumulation
        if self.every > 0 and stepped and trainer.global_step % self.every == 0:
            self._run(trainer, module)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.every > 0:
            self._run(trainer, module)
        if trainer.is_global_zero and self.history:
            self.directory.mkdir(parents=True, exist_ok=True)
            rows = "".join(f"{s},{v}\n" for s, v in self.history)
            (self.directory / "val_loss.csv").write_text("step,val_loss\n" + rows)


class FinalGptNemo(pl.Callback):
    """Writes the run's GPT ``.nemo`` when training ends (while the parallel groups still exist)."""

    def __init__(self, path: Path, source: Path, tokenizer: Path | None) -> None:
        self.path, self.source, self.tokenizer = path, source, tokenizer
        self.output: Path | None = None

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        from neva_tools.model.gpt_nemo import save_gpt_nemo

        module.gather_weights()
        self.output = save_gpt_nemo(module.model, self.path, self.source, self.tokenizer)


def validation_batches(dataset: Any, iters: int, global_batch: int, micro_batch: int, vocab: int) -> Any:
    """This data-parallel rank's share of the first ``iters`` global batches of ``dataset``, in micro-batches."""
    from megatron.core import parallel_state
    from torch.utils.data import DataLoader, Subset

    from neva_tools.data.gpt_blend import collate_text

    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    indices = list(range(rank, iters * global_batch, dp))  # interleaved like ResumableSampler
    return DataLoader(Subset(dataset, indices), batch_size=micro_batch, collate_fn=lambda b: collate_text(b, vocab))


def train_text(cfg: DictConfig) -> Path | None:
    """Run the text-pretraining job described by ``cfg``; return the final GPT ``.nemo`` (on global rank 0)."""
    from megatron.core import parallel_state
    from torch.utils.data import DataLoader

    from neva_tools.data.gpt_blend import DatasetTokenizer, TextDataSettings, build_text_datasets, collate_text
    from neva_tools.model import neva_io
    from neva_tools.model.from_nemo import load_gpt_chunks_from_nemo
    from neva_tools.model.gpt import gpt_model_kwargs
    from neva_tools.model.vocab_mask import mask_padded_vocab
    from neva_tools.train.fit import (
        PeriodicCheckpoint,
        TrainerSettings,
        consumed_samples,
        fit,
        loader_workers,
        make_trainer,
    )
    from neva_tools.train.module import NevaModule, ScheduleSettings
    from neva_tools.train.run import (
        engine_problems,
        llm_overrides,
        loss_scale_settings,
        optim_settings,
        trainer_precision,
    )
    from neva_tools.train.sampler import ResumableSampler
    from neva_tools.train.steps import run_length
    from neva_tools.train.summary import run_info
    from neva_tools.train.text_mixture import apply_mixture
    from neva_tools.train.text_validate import text_problems

    cfg = apply_mixture(cfg)  # a mixture YAML as data_path also sets max_steps, global_batch_size, seq_length
    m, t = cfg.model, cfg.model.text_pretrain
    tp, pp = int(m.tensor_model_parallel_size), int(m.pipeline_model_parallel_size)
    vpp = OmegaConf.select(m, "virtual_pipeline_model_parallel_size", default=None)
    problems = engine_problems(cfg) + text_problems(cfg, offline=False)
    if problems:
        raise NevaError("the text-pretraining config has problems:\n  " + "\n  ".join(problems))
    llm_path = Path(m.mm_cfg.llm.from_pretrained)
    run_dir = run_directory(cfg)
    llm_cfg, vocab = neva_io.llm_config(llm_path)
    override = Path(m.tokenizer.model) if m.tokenizer.model else None
    tokenizer = override or neva_io.extract_tokenizer(llm_path, neva_io.scratch_dir())
    data_tok = DatasetTokenizer(tokenizer)
    if data_tok.vocab_size > vocab:
        raise NevaError(f"tokenizer {tokenizer} has {data_tok.vocab_size} tokens but the LLM's vocabulary is "
                        f"{vocab}; use the LLM's tokenizer")  # fmt: skip
    seq = int(t.seq_length)
    positions = gpt_model_kwargs(llm_cfg)
    if positions["position_embedding_type"] != "rope" and seq > int(positions["max_sequence_length"]):
        raise NevaError(f"model.text_pretrain.seq_length ({seq}) exceeds the LLM's learned positions "
                        f"({positions['max_sequence_length']}, encoder_seq_length of {llm_path})")  # fmt: skip
    length = run_length(cfg, None)  # trainer.max_steps (max_epochs is for NeVA data), warmup_ratio
    settings = TrainerSettings(
        max_steps=length.max_steps, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None if vpp is None else int(vpp),
        micro_batch_size=int(m.micro_batch_size), global_batch_size=int(m.global_batch_size),
        precision=trainer_precision(cfg.trainer.precision, m.megatron_amp_O2),
        gradient_clip_val=float(cfg.trainer.gradient_clip_val), log_every_n_steps=int(cfg.trainer.log_every_n_steps),
        num_nodes=int(cfg.trainer.num_nodes), seed=int(m.seed), progress=bool(cfg.trainer.enable_progress_bar),
        tf32=bool(m.tf32), **loss_scale_settings(m),
    )  # fmt: skip
    data = TextDataSettings(
        data_path=t.data_path, seq_length=seq, split=str(t.split), seed=int(m.seed),
        index_cache=Path(t.index_cache) if t.index_cache else run_dir / "index_cache",
        reset_position_ids=bool(t.reset_position_ids), reset_attention_mask=bool(t.reset_attention_mask),
        eod_mask_loss=bool(t.eod_mask_loss),
    )  # fmt: skip
    every, iters = int(t.eval_interval), int(t.eval_iters)
    resume = resume_checkpoint(cfg, run_dir)
    consumed = consumed_samples(resume, settings.global_batch_size)
    datasets: dict[str, Any] = {}

    def build_data() -> None:  # collective (barriers): called on every rank once the process group exists
        if not datasets:
            gbs = settings.global_batch_size
            valid = iters * gbs if every > 0 else 0
            datasets["train"], datasets["valid"] = build_text_datasets(data, data_tok, settings.max_steps * gbs, valid)

    def loader() -> DataLoader:
        build_data()
        sampler = ResumableSampler(len(datasets["train"]), dp_rank=parallel_state.get_data_parallel_rank(),
                                   dp_size=parallel_state.get_data_parallel_world_size(), shuffle=False,
                                   consumed_samples=consumed)  # fmt: skip
        return DataLoader(datasets["train"], batch_size=settings.micro_batch_size, sampler=sampler,
                          collate_fn=functools.partial(collate_text, vocab_size=vocab),
                          **loader_workers(int(m.data.num_workers)))  # fmt: skip

    def build() -> list[Any]:  # this rank's pipeline stage (interleaved: its chunks)
        chunks = load_gpt_chunks_from_nemo(llm_path, overrides={**recompute_keys(m), **llm_overrides(m)})[0]
        for model in chunks:
            if model.post_process:
                mask_padded_vocab(model.output_layer, vocab)  # the loss of the true vocabulary, at any TP
        return chunks

    o = m.optim
    optim = optim_settings(cfg)
    sched = ScheduleSettings(max_steps=settings.max_steps, warmup_steps=length.warmup_steps,
                             constant_steps=int(o.sched.constant_steps), min_lr=float(o.sched.min_lr))  # fmt: skip
    module = NevaModule(build, optim, sched, loss_fn=gpt_loss, loader=loader, forward_fn=gpt_forward)
    final = FinalGptNemo(run_dir / f"{cfg.name}.nemo", llm_path, override)
    mbs, gbs = settings.micro_batch_size, settings.global_batch_size
    validation = TextValidation(lambda: validation_batches(datasets["valid"], iters, gbs, mbs, vocab), every,
                                run_dir / "logs")  # fmt: skip
    every_save = int(cfg.exp_manager.checkpoint_every_n_steps)
    keep = int(OmegaConf.select(cfg, "exp_manager.save_top_k", default=-1))
    periodic = PeriodicCheckpoint(run_dir / "checkpoints", every_save, keep=keep, protect=resume)
    callbacks = [validation, periodic, final]
    trainer = make_trainer(settings, run_dir / "logs", callbacks=callbacks, run=run_info(cfg, vocab))
    return fit(trainer, module, resume, consumed, final, run_dir / "logs")
