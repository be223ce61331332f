"""Apply activation checkpointing, torch.compile and FSDP2 to a model built on the meta
device, then materialize and initialize it, in a fixed order (docs/design.md §4): per block
checkpointing, then compile, then `fully_shard`; then the root; then `to_empty` and init.

None of these wrappers changes parameter names, so state-dict keys stay Meta's plain
names (`layers.0.attention.wq.weight`) whatever is applied.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from titan.config import JobConfig
from titan.distributed import ParallelDims
from titan.logging import logger
from titan.memory import summarize_policies
from titan.models.attention import SDPA_OPS

# Outputs each selective policy keeps (the rest of the block is recomputed in the
# backward): "attn" the attention kernel's (output, log-sum-exp and whatever else the
# kernel returns for its backward); "op" also every matmul's. Norms, activations and RoPE
# are cheap to recompute.
_ATTENTION_OPS = {*SDPA_OPS, torch.ops.titan.flash_attention.default}
SAVED_OPS = {"attn": _ATTENTION_OPS, "op": {torch.ops.aten.mm.default, *_ATTENTION_OPS}}


def _keep(ops: set) -> Callable:
    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


def _checkpointed(forward: Callable, context_fn: Callable | None) -> Callable:
    @functools.wraps(forward)
    def run(*args: Any) -> Any:
        kwargs = {"context_fn": context_fn} if context_fn is not None else {}
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_ac(model: nn.Module, policies: list[str]) -> None:
    """Activation checkpointing per transformer block, one policy each: "none", "full"
    (recompute the whole block), "attn" or "op" (selective: keep those ops' outputs).

    The block's `forward` is replaced rather than the block wrapped, so parameter names
    stay plain and FSDP's hooks (on the module call) stay outside the recomputed region.
    """
    for block, policy in zip(model.layers.values(), policies, strict=True):
        if policy == "full":
            block.forward = _checkpointed(block.forward, None)
        elif policy in SAVED_OPS:
            block.forward = _checkpointed(block.forward, _keep(SAVED_OPS[policy]))


def apply_compile(model: nn.Module) -> None:
    """Compile each transformer block's forward (with its checkpointing, if any); FSDP's
    hooks stay outside the graph and names gain no `_orig_mod.` prefix. All blocks share
    one shape, so this is one compilation."""
    for block in model.layers.values():
        block.forward = torch.compile(block.forward, fullgraph=True)


def apply_fsdp(model: nn.Module, dims: ParallelDims, param_dtype: str, reduce_dtype: str) -> None:
    """`fully_shard` every block, then the root; HSDP when the mesh has a replicate dim."""
    assert dims.mesh is not None
    mp = MixedPrecisionPolicy(
        param_dtype=getattr(torch, param_dtype), reduce_dtype=getattr(torch, reduce_dtype)
    )
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's params are needed again right away by backward: keep them.
        fully_shard(block, mesh=dims.mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=dims.mesh, mp_policy=mp)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, device: torch.device) -> None:
    """Initialize every parameter as if the model were not sharded: each rank draws the
    full tensor from one seeded generator and keeps its own shard, so the model is the
    same on 1 or N ranks (DTensor random ops on a CPU mesh draw the same numbers on every rank)."""
    model.init_rope(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        full = torch.empty(param.shape, dtype=param.dtype, device=device)
        model.init_param(name, full, generator)
        if isinstance(param, DTensor):
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)


def parallelize(
    model: nn.Module,
    cfg: JobConfig,
    dims: ParallelDims,
    device: torch.device,
    ac_policies: list[str],
) -> None:
    """Wrap a meta-device model for training (`ac_policies`: one per block) and
    materialize it on `device`."""
    apply_ac(model, ac_policies)
    if cfg.training.compile:
        apply_compile(model)
    param_dtype = cfg.training.mixed_precision_param
    if device.type == "cpu" and param_dtype == "bfloat16":
        logger.warning("CPU run: bfloat16 compute is slow here; using float32 parameters")
        param_dtype = "float32"
    apply_fsdp(model, dims, param_dtype, cfg.training.mixed_precision_reduce)
    model.to_empty(device=device)
    init_weights(model, cfg.training.seed, device)
    logger.info(
        f"Applied activation checkpointing ({summarize_policies(ac_policies)}), "
        f"compile={cfg.training.compile}, "
        f"FSDP2 (params {param_dtype}, reduce {cfg.training.mixed_precision_reduce})"
    )
