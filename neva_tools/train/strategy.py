"""A Lightning strategy for megatron-core models: sets up tensor/pipeline parallel groups after the process
group, shards data by data-parallel rank, and leaves gradient sync and the optimizer to megatron-core.

The model is trained through megatron-core's own machinery (:mod:`neva_tools.train.megatron_optim`): the
:class:`~neva_tools.train.module.NevaModule` wraps it in ``Float16Module`` + megatron-core's
``DistributedDataParallel`` over the data-parallel group and steps megatron-core's optimizer itself (Lightning's
manual optimization). So this strategy wraps nothing in torch DDP, builds no Lightning optimizer, and checkpoints
the model and megatron-core's optimizer together as megatron-core dist checkpoints. :class:`EngineSettings` carries
the trainer-level settings the module reads (precision, gradient clipping, accumulation).

On GPU it runs with NCCL; on CPU with gloo (and the CPU compatibility patches). Launch under torchrun
or srun (the processes are created externally) or as one plain process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pytorch_lightning.strategies import DDPStrategy


@dataclass(frozen=True)
class EngineSettings:
    """What the module needs from the trainer's settings to train through megatron-core."""

    precision: str = "32"  # parameter dtype: "32", "bf16" or "fp16" (16-bit: fp32 master weights in the optimizer)
    clip_grad: float = 1.0  # clip the global (tensor- and data-parallel) gradient L2 norm to this; 0 disables
    accumulate: int = 1  # micro-batches per optimizer step on each data-parallel rank
    tf32: bool = True  # TF32 tensor cores for fp32 matmuls and convolutions on Ampere and newer GPUs (model.tf32)
    initial_loss_scale: float = 2.0**32  # fp16 only: the dynamic loss scale's start (model.native_amp_init_scale)
    loss_scale_window: int = 1000  # fp16 only: steps without overflow before it grows (native_amp_growth_interval)
    hysteresis: int = 2  # fp16 only: overflowing steps before it shrinks (model.hysteresis)


def set_tf32(enabled: bool) -> None:
    """Let CUDA fp32 matmuls and cuDNN convolutions use TF32 (``model.tf32``); the CPU is left as it is."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high" if enabled else "highest")
        torch.backends.cudnn.allow_tf32 = enabled


class MegatronStrategy(DDPStrategy):
    """``DDPStrategy`` whose process group carries megatron's parallel groups (see the module docstring)."""

    strategy_name = "megatron"

    def __init__(self, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                 seed: int = 1234, engine: EngineSettings | None = None,
                 virtual_pipeline_model_parallel_size: int | None = None, **kwargs: Any) -> None:  # fmt: skip
        kwargs.setdefault("process_group_backend", "nccl" if torch.cuda.is_available() else "gloo")
        super().__init__(**kwargs)
        self.tp, self.pp, self.seed = tensor_model_parallel_size, pipeline_model_parallel_size, seed
        self.vpp = virtual_pipeline_model_parallel_size  # interleaved pipeline stages per rank (None: not interleaved)
        self.engine = engine or EngineSettings()

    def setup_distributed(self) -> None:
        """The process group (Lightning), then megatron's parallel state and RNG streams."""
        from megatron.core import parallel_state, tensor_parallel

        from neva_tools.errors import NevaError
        from neva_tools.model.cpu_compat import apply_cpu_compat, model_parallel_seed

        if not torch.cuda.is_available():
            apply_cpu_compat()
        super().setup_distributed()
        world = torch.distributed.get_world_size()
        if world % (self.tp * self.pp):
            raise NevaError(f"world size ({world}) must be divisible by tensor_model_parallel_size ({self.tp}) × "
                            f"pipeline_model_parallel_size ({self.pp})")  # fmt: skip
        parallel_state.initialize_model_parallel(self.tp, self.pp, virtual_pipeline_model_parallel_size=self.vpp)
        set_tf32(self.engine.tf32)
        if torch.cuda.is_available():
            tensor_parallel.model_parallel_cuda_manual_seed(self.seed)
        else:
            model_parallel_seed(self.seed)

    def configure_ddp(self) -> None:
        """No torch DDP: the module's model is already a megatron-core ``DistributedDataParallel`` chunk."""
        self.model = self._setup_model(self.model)

    def _setup_model(self, model: torch.nn.Module) -> Any:
        return model

    def setup_optimizers(self, trainer: Any) -> None:
        """The module's ``configure_optimizers`` builds megatron-core's optimizer (and steps it itself); Lightning
        gets no optimizer or scheduler."""
        from pytorch_lightning.trainer import call

        call._call_lightning_module_hook(trainer, "configure_optimizers", pl_module=self.lightning_module)
        self.optimizers, self.lr_scheduler_configs = [], []

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        """Restore once ``setup`` built the optimizer: ``load_checkpoint`` loads it with the model."""
        return True

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        from megatron.core import parallel_state

        return {
            "num_replicas": parallel_state.get_data_parallel_world_size(),
            "rank": parallel_state.get_data_parallel_rank(),
        }

    # -- checkpoints: megatron-core dist checkpoints instead of torch.save of full state dicts --------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Nothing: ``save_checkpoint`` writes the model's sharded state dict itself."""
        return {}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """The model, megatron-core's optimizer and the rest of Lightning's checkpoint (loops, callbacks, the
        module's schedulers) as one dist checkpoint; every rank calls this."""
        from neva_tools.train import checkpoint as ckpt
        from neva_tools.train.megatron_optim import gather_params

        module = self.lightning_module
        common = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        common["neva_engine"] = self._engine_identity()
        gather_params(module.chunks)  # weights updated by the last step, with overlap_param_gather
        ckpt.save(filepath, module.model, module.optimizer, common)

    def _engine_identity(self) -> dict[str, Any]:
        """What decides the layout of the optimizer state in a checkpoint."""
        return {"optimizer": self.lightning_module.optim.name, "precision": self.engine.precision}

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load the model weights and the optimizer state (both exist after ``setup``); return the rest for Lightning
        (loops, callbacks, the module's ``on_load_checkpoint``)."""
        from neva_tools.train import checkpoint as ckpt

        module = self.lightning_module
        common = ckpt.load(checkpoint_path, module.model, module.optimizer, engine=self._engine_identity())
        return {**common, "state_dict": {}, "optimizer_states": [], "lr_schedulers": []}

    @property
    def lightning_restore_optimizer(self) -> bool:
        """The optimizer was restored by ``load_checkpoint``."""
        return False

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """Weights were loaded by ``load_checkpoint``."""

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        """The optimizer was loaded by ``load_checkpoint``."""

    def remove_checkpoint(self, filepath: Any) -> None:
        from neva_tools.train import checkpoint as ckpt

        if self.is_global_zero:
            ckpt.remove(filepath)

    def teardown(self) -> None:
        from megatron.core import parallel_state

        super().teardown()
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
