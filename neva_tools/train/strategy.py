"""A Lightning strategy for megatron-core models: sets up tensor/pipeline parallel groups after the process
group, syncs gradients over the data-parallel group only, and shards data by data-parallel rank.

On GPU it runs with NCCL; on CPU with gloo (and the CPU compatibility patches). Launch under torchrun
or srun (the processes are created externally) or as one plain process.
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel


class MegatronStrategy(DDPStrategy):
    """``DDPStrategy`` whose DDP group is megatron's data-parallel group (see the module docstring)."""

    strategy_name = "megatron"

    def __init__(self, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                 seed: int = 1234, **kwargs: Any) -> None:  # fmt: skip
        kwargs.setdefault("process_group_backend", "nccl" if torch.cuda.is_available() else "gloo")
        super().__init__(**kwargs)
        self.tp, self.pp, self.seed = tensor_model_parallel_size, pipeline_model_parallel_size, seed

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
        parallel_state.initialize_model_parallel(self.tp, self.pp)
        if torch.cuda.is_available():
            tensor_parallel.model_parallel_cuda_manual_seed(self.seed)
        else:
            model_parallel_seed(self.seed)

    def _setup_model(self, model: torch.nn.Module) -> Any:
        from megatron.core import parallel_state

        group = parallel_state.get_data_parallel_group()
        if torch.distributed.get_world_size(group) == 1:
            return model
        device_ids = self.determine_ddp_device_ids()
        return DistributedDataParallel(module=model, device_ids=device_ids, process_group=group, **self._ddp_kwargs)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        from megatron.core import parallel_state

        return {
            "num_replicas": parallel_state.get_data_parallel_world_size(),
            "rank": parallel_state.get_data_parallel_rank(),
        }

    # -- checkpoints: megatron-core dist checkpoints instead of torch.save of full state dicts --------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        from neva_tools.train import checkpoint as ckpt

        common = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        optimizer = self.optimizers[0] if self.optimizers else None
        ckpt.save(filepath, self.lightning_module.model, optimizer, common)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load the model weights now (optimizers do not exist yet); the optimizer follows in
        ``load_optimizer_state_dict``."""
        from neva_tools.train import checkpoint as ckpt

        self._resume_path = checkpoint_path
        common = ckpt.load(checkpoint_path, self.lightning_module.model, None)
        return {**common, "state_dict": {}, "optimizer_states": [None]}

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """Weights were loaded by ``load_checkpoint``."""

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        from neva_tools.train import checkpoint as ckpt

        ckpt.load(self._resume_path, self.lightning_module.model, self.optimizers[0])

    def remove_checkpoint(self, filepath: Any) -> None:
        from neva_tools.train import checkpoint as ckpt

        if self.is_global_zero:
            ckpt.remove(filepath)

    def teardown(self) -> None:
        from megatron.core import parallel_state

        super().teardown()
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()


def tp_grad_norm(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients of a tensor-parallel model: split parameters counted on every
    rank, replicated ones once (on TP rank 0), summed over the TP group."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    total = torch.zeros((), dtype=torch.float32, device="cpu")
    for p in parameters:
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
            total = total + p.grad.detach().float().pow(2).sum().cpu()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        device = next((p.grad.device for p in parameters if p.grad is not None), torch.device("cpu"))
        total = total.to(device)
        torch.distributed.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
    return total.sqrt().cpu()


def clip_tp_grads(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients so their TP-global norm is at most ``max_norm``; return the norm before clipping."""
    norm = tp_grad_norm(parameters)
    if max_norm > 0:
        coef = max_norm / (float(norm) + 1e-6)
        if coef < 1.0:
            for p in parameters:
                if p.grad is not None:
                    p.grad.detach().mul_(coef)
    return norm
