"""The Lightning module that trains a megatron-core NeVA (or GPT) model.

The model is built in ``configure_model`` (after the strategy has set up megatron's parallel groups).
The loss is the token-mean cross-entropy over supervised positions of the micro-batch. Gradients are
clipped by their tensor-parallel-global norm; loss, learning rates, grad norm, tokens/s and samples/s
are logged every step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch

from neva_tools.data.packing import packed_attention_mask
from neva_tools.data.templates import IGNORE_INDEX
from neva_tools.train.optim import OptimSettings, build_optimizer
from neva_tools.train.schedule import cosine_annealing
from neva_tools.train.strategy import clip_tp_grads


@dataclass(frozen=True)
class ScheduleSettings:
    """NeMo's ``optim.sched`` (CosineAnnealing)."""

    max_steps: int
    warmup_steps: int = 0
    constant_steps: int = 0
    min_lr: float = 0.0


def llava_loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over supervised tokens, number of supervised tokens) for a collated batch.

    Packed rows (``cu_seqlens`` from ``PackedNevaDataset``) get a block-diagonal causal mask in the
    image-expanded space, so samples never attend to each other. A batch without images (text-only records)
    still touches the trainable vision parameters with a zero-weighted term, so data-parallel gradient sync
    sees the same parameters used on every rank.
    """
    inner = getattr(model, "module", model)  # DDP-wrapped in training
    labels = batch["labels"]
    loss_mask = batch.get("loss_mask", (labels != -100).float())
    attention_mask = batch.get("attention_mask")
    cu_seqlens = batch.get("cu_seqlens") or []
    if attention_mask is None and any(cu is not None for cu in cu_seqlens):
        attention_mask = packed_attention_mask(batch["input_ids"], cu_seqlens, inner.img_seq_len,
                                               inner.image_token_index)  # fmt: skip
        # LLaVAModel cuts the combined rows (padding included) at the LLM's maximum length; cut the mask alike
        limit = inner.language_model.max_sequence_length
        attention_mask = attention_mask[..., :limit, :limit]
    out, new_mask = model(
        batch["images"],
        batch["input_ids"],
        batch["position_ids"],
        attention_mask,
        labels=torch.where(loss_mask > 0, labels, IGNORE_INDEX),  # no logits where there is no loss
        loss_mask=loss_mask,
        num_image_tiles=batch.get("num_image_tiles"),
    )
    tokens = new_mask.sum()
    loss = (out.float() * new_mask).sum() / tokens.clamp(min=1)
    if len(batch["images"]) == 0 and torch.is_grad_enabled():
        unused = [p for part in (inner.vision_projection, inner.vision_model) if part is not None
                  for p in part.parameters() if p.requires_grad]  # fmt: skip
        loss = loss + sum((0.0 * p.sum() for p in unused), torch.zeros((), device=loss.device))
    return loss, tokens


LossFn = Callable[[Any, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]


class NevaModule(pl.LightningModule):
    """Trains the model returned by ``build_model`` (called once the parallel groups exist)."""

    def __init__(
        self,
        build_model: Callable[[], torch.nn.Module],
        optim: OptimSettings,
        sched: ScheduleSettings,
        loss_fn: LossFn = llava_loss,
        loader: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        self.build_model, self.optim, self.sched, self.loss_fn = build_model, optim, sched, loss_fn
        self.loader = loader  # built lazily: the data-parallel rank is known only once training starts
        self.model: torch.nn.Module | None = None
        self.last_loss: torch.Tensor | None = None
        self._step_start = time.perf_counter()

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.build_model()

    def train_dataloader(self) -> Any:
        if self.loader is None:
            raise RuntimeError("pass a DataLoader to Trainer.fit or a loader factory to NevaModule")
        return self.loader()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, tokens = self.loss_fn(self.model, batch)
        self.last_loss = loss.detach()  # the micro-batch's loss, before Lightning scales it for accumulation
        now = time.perf_counter()
        elapsed, self._step_start = now - self._step_start, now
        self.log("train_loss", loss, prog_bar=True, on_step=True, batch_size=len(batch["input_ids"]))
        self.log("tokens_per_s", float(batch["input_ids"].numel()) / max(elapsed, 1e-9), on_step=True)
        self.log("samples_per_s", len(batch["input_ids"]) / max(elapsed, 1e-9), on_step=True)
        self.log("supervised_tokens", tokens.float(), on_step=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        assert self.model is not None
        optimizer = build_optimizer(self.model, self.optim)
        scheduler = cosine_annealing(optimizer, max_steps=self.sched.max_steps, min_lr=self.sched.min_lr,
                                     warmup_steps=self.sched.warmup_steps,
                                     constant_steps=self.sched.constant_steps)  # fmt: skip
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:  # fmt: skip
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = clip_tp_grads(params, float(gradient_clip_val or 0.0))
        self.log("grad_norm", norm, on_step=True)
        for group in optimizer.param_groups:
            self.log(f"lr_{group.get('part', 'all')}", group["lr"], on_step=True)
