"""Each megatron-core CPU patch makes the call site it targets work (one test per patch)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from neva_tools.model import cpu_compat
from neva_tools.model.cpu_compat import apply_cpu_compat, model_parallel_seed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU patches are not applied when CUDA is available")


def _patched_objects() -> list[object]:
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel
    from megatron.core.optimizer import clip_grads, distrib_optimizer, grad_scaler
    from megatron.core.optimizer import optimizer as mcore_optimizer
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer import utils as transformer_utils

    return [
        torch.cuda.current_device,
        torch.cuda.synchronize,
        transformer_utils.get_default_causal_mask,
        fused_softmax.get_default_causal_mask,
        fused_softmax.get_sliding_window_causal_mask,
        CLIPViTModel.__init__,
        mcore_random._CUDA_RNG_STATE_TRACKER,
        mcore_optimizer.torch,
        clip_grads.torch,
        grad_scaler.torch,
        mcore_optimizer.Float16OptimizerWithFloat16Params.__init__,
        distrib_optimizer.DistributedOptimizer.__init__,
        clip_grads.clip_grad_by_total_norm_fp32,
        mcore_optimizer.clip_grad_by_total_norm_fp32,
        clip_grads.l2_norm_impl,
        mcore_random._get_cuda_rng_state,
        mcore_random._set_cuda_rng_state,
    ]


def test_apply_is_idempotent() -> None:
    apply_cpu_compat()
    before = _patched_objects()
    apply_cpu_compat()
    for patch in (
        cpu_compat.patch_rng_tracker,
        cpu_compat.patch_cuda_current_device,
        cpu_compat.patch_causal_masks,
        cpu_compat.patch_cuda_synchronize,
        cpu_compat.patch_recompute_rng,
        cpu_compat.patch_clip_vit_model,
        cpu_compat.patch_optimizer_cuda_tensors,
        cpu_compat.patch_optimizer_cuda_type_checks,
        cpu_compat.patch_grad_norm,
    ):
        patch()
    after = _patched_objects()
    assert all(a is b for a, b in zip(before, after, strict=True))
    assert "cuda" not in torch.Tensor.__dict__  # the construction-time .cuda() no-op did not leak
    assert "type" not in torch.Tensor.__dict__  # nor the optimizers' CUDA type names


def test_noop_when_cuda_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("check_megatron_version", "patch_rng_tracker", "patch_cuda_current_device", "patch_causal_masks"):
        monkeypatch.setattr(cpu_compat, name, lambda name=name: calls.append(name))
    monkeypatch.setattr(cpu_compat, "_APPLIED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    apply_cpu_compat()
    assert calls == []
    assert cpu_compat._APPLIED is False


def test_version_mismatch_warns(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import megatron.core

    assert cpu_compat.check_megatron_version()
    monkeypatch.setattr(megatron.core, "__version__", "0.99.0")
    with caplog.at_level(logging.WARNING, logger=cpu_compat.__name__):
        assert not cpu_compat.check_megatron_version()
    assert "0.99.0" in caplog.text and "0.16.1" in caplog.text


def test_rng_tracker_makes_dropout_work_and_reproducible() -> None:
    from megatron.core import tensor_parallel

    apply_cpu_compat()
    x = torch.ones(1000)

    def masked() -> torch.Tensor:
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return F.dropout(x, 0.5, training=True)

    model_parallel_seed(1234, tp_rank=0)
    outside = torch.get_rng_state()
    first = masked()
    assert torch.equal(torch.get_rng_state(), outside)  # the fork leaves the default CPU stream alone
    model_parallel_seed(1234, tp_rank=0)
    assert torch.equal(masked(), first)
    model_parallel_seed(1234, tp_rank=1)  # each TP rank gets its own model-parallel stream
    assert not torch.equal(masked(), first)
    # megatron's own seeding also works once the CPU tracker is installed, with the same streams
    tensor_parallel.model_parallel_cuda_manual_seed(1234, tp_rank=0, ep_rank=0, etp_rank=0)
    assert torch.equal(masked(), first)
    names = set(tensor_parallel.get_cuda_rng_tracker().get_states())
    assert names == {"model-parallel-rng", "data-parallel-rng", "expert-parallel-rng"}


def test_rng_tracker_nested_forks_keep_each_stream() -> None:
    from megatron.core import tensor_parallel

    apply_cpu_compat()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    model_parallel_seed(5)
    with tracker.fork():
        a1 = torch.rand(3)
        with tracker.fork("data-parallel-rng"):
            torch.rand(3)
        a2 = torch.rand(3)
    model_parallel_seed(5)
    with tracker.fork():
        expected = torch.rand(6)
    assert torch.equal(torch.cat([a1, a2]), expected)


def test_current_device_lets_rotary_embedding_and_buffers_run_on_cpu() -> None:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.utils import GlobalMemoryBuffer

    apply_cpu_compat()
    assert torch.cuda.current_device() == "cpu"
    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True)
    emb = rope(8)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    freqs = torch.outer(torch.arange(8, dtype=torch.float32), inv_freq)
    assert emb.device.type == "cpu" and emb.shape == (8, 1, 1, 16)
    assert torch.allclose(emb[:, 0, 0], torch.cat([freqs, freqs], dim=-1))
    assert GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "test").device.type == "cpu"


def test_causal_masks_are_built_on_cpu() -> None:
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func, get_default_causal_mask

    apply_cpu_compat()
    assert torch.equal(get_default_causal_mask(4), torch.ones(4, 4, dtype=torch.bool).triu(1))
    softmax = FusedScaleMaskSoftmax(
        input_in_fp16=False,
        input_in_bf16=False,
        attn_mask_type=AttnMaskType.causal,
        scaled_masked_softmax_fusion=False,
        mask_func=attention_mask_func,
        softmax_in_fp32=True,
        scale=None,
    )
    probs = softmax(torch.randn(1, 2, 4, 4), None)  # mask=None -> the default causal mask
    assert torch.all(probs.triu(1) == 0)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 2, 4))
    window = FusedScaleMaskSoftmax(False, False, AttnMaskType.causal, False, attention_mask_func, True, None, (1, 0))
    probs = window(torch.randn(1, 1, 4, 4), None)  # each query sees itself and one key back
    assert torch.all(probs.triu(1) == 0) and torch.all(probs.tril(-2) == 0)


def test_cuda_synchronize_lets_dist_checkpointing_save_and_load(dist: None, tmp_path: Path) -> None:
    from megatron.core import dist_checkpointing

    from neva_tools.model.gpt import build_gpt_model

    torch.cuda.synchronize()  # no-op instead of "Found no NVIDIA driver"
    cfg = {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "position_embedding_type": "rope"}
    model = build_gpt_model(cfg, padded_vocab_size=128)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    model_parallel_seed(99)
    other = build_gpt_model(cfg, padded_vocab_size=128)
    other.load_state_dict(dist_checkpointing.load(other.sharded_state_dict(), str(tmp_path)))
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


def test_recompute_restores_the_cpu_rng_for_dropout(dist: None) -> None:
    """megatron's ``checkpoint`` (activation recompute) saves and restores the "CUDA" RNG state: the CPU generator's."""
    from megatron.core import tensor_parallel

    apply_cpu_compat()
    model_parallel_seed(3)
    x = torch.randn(64, 32, requires_grad=True)

    def block(t: torch.Tensor) -> torch.Tensor:
        return F.dropout(t.tanh(), p=0.5, training=True)

    torch.manual_seed(0)
    plain = block(x)
    plain.sum().backward()
    expected, x.grad = x.grad.clone(), None
    torch.manual_seed(0)
    recomputed = tensor_parallel.checkpoint(block, False, x)
    recomputed.sum().backward()  # the recomputation must draw the same dropout mask
    assert torch.equal(recomputed, plain) and torch.equal(x.grad, expected)


def test_clip_vit_model_builds_and_runs_on_cpu(dist: None) -> None:
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.transformer import TransformerConfig

    apply_cpu_compat()
    config = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=2,
        ffn_hidden_size=64,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    vit = CLIPViTModel(config, get_vit_layer_with_local_spec(), img_h=28, img_w=28, patch_dim=14)
    assert isinstance(vit.ln_pre, torch.nn.LayerNorm)  # built through WrappedTorchNorm
    assert vit.position_ids.device.type == "cpu"
    assert vit(torch.randn(2, 3, 28, 28)).shape == (2, 2 * 2 + 1, 32)
    assert "cuda" not in torch.Tensor.__dict__


def test_optimizer_bookkeeping_tensors_are_allocated_on_cpu(dist: None) -> None:
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.clip_grads import count_zeros_fp32
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler
    from megatron.core.optimizer.optimizer import FP32Optimizer

    apply_cpu_compat()
    scaler = DynamicGradScaler(2.0**16, min_scale=1.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=1,
                               hysteresis=1)  # fmt: skip
    scaler.update(found_inf=True)
    assert scaler.scale.device.type == "cpu" and scaler.scale.item() == 2.0**15
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.tensor([0.0, 2.0, 0.0])
    assert count_zeros_fp32([param], grad_stats_parallel_group=parallel_state.get_model_parallel_group()) == 2
    optimizer = FP32Optimizer(torch.optim.AdamW([param]), OptimizerConfig(lr=0.1), lambda *args: None)
    assert optimizer.get_loss_scale().device.type == "cpu"
    assert torch.tensor([1.0], device="cpu").device.type == "cpu"  # torch itself is untouched
    with pytest.raises(RuntimeError):
        torch.zeros(1, device="cuda")


def test_optimizer_type_checks_accept_cpu_parameters(dist: None) -> None:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params
    from megatron.core.transformer.module import Float16Module

    from neva_tools.model.gpt import build_gpt_model

    apply_cpu_compat()
    half, full = torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16)), torch.nn.Parameter(torch.randn(3))
    config = OptimizerConfig(lr=0.1, bf16=True, params_dtype=torch.bfloat16)
    optimizer = Float16OptimizerWithFloat16Params(torch.optim.AdamW([half, full]), config, None, lambda *args: None)
    (main,) = optimizer.fp32_from_float16_groups[0]
    assert main.dtype == torch.float32 and torch.equal(main, half.float())
    assert optimizer.fp32_from_fp32_groups[0] == [full]
    assert half.type() == "torch.BFloat16Tensor" and "type" not in torch.Tensor.__dict__

    grad = torch.nn.Parameter(torch.zeros(2))
    grad.grad = torch.tensor([3.0, 4.0])
    clip_grad_by_total_norm_fp32([grad], max_norm=1.0, total_norm=5.0)
    assert torch.allclose(grad.grad, torch.tensor([0.6, 0.8]), atol=1e-6)

    # the distributed optimizer over megatron's DDP (whose grad and param buffers are on torch.cuda.current_device())
    model = build_gpt_model({"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2}, padded_vocab_size=128)
    model.config.bf16 = True
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    ddp = DistributedDataParallel(model.config, ddp_config, Float16Module(model.config, model))
    assert all(b.grad_data.device.type == "cpu" and b.grad_data.dtype == torch.float32 for b in ddp.buffers)
    config = OptimizerConfig(lr=0.1, bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(config, [ddp])
    (distributed,) = optimizer.chained_optimizers
    assert isinstance(distributed, DistributedOptimizer)
    assert all(p.dtype == torch.float32 for group in distributed.shard_fp32_from_float16_groups for p in group)
    ids = torch.randint(0, 128, (1, 8))
    ddp.zero_grad_buffer()
    ddp(ids, torch.arange(8)[None], None, labels=ids).float().mean().backward()
    ddp.finish_grad_sync()
    success, grad_norm, _ = optimizer.step()
    assert success and grad_norm > 0


def test_grad_norm_is_computed_on_cpu(dist: None) -> None:
    from megatron.core import parallel_state
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

    apply_cpu_compat()
    group = parallel_state.get_model_parallel_group()
    grads = [torch.tensor([3.0]), torch.tensor([[4.0, 12.0]])]
    assert get_grad_norm_fp32(grads, grad_stats_parallel_group=group) == pytest.approx(13.0)
    assert get_grad_norm_fp32([], grad_stats_parallel_group=group) == 0.0
