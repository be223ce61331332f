"""Activation-memory plan: per block, the fastest activation checkpointing policy that fits.

    plan = plan_memory(cfg, args, dims, capacity_bytes=80 * 2**30)
    print(format_plan(plan))

Policies, fastest first (what a block keeps from its forward to its backward):

- "none":  everything autograd saves in the block (nothing is recomputed);
- "attn":  the block input and the attention kernel's outputs (output and log-sum-exp);
           the rest of the block is recomputed in the backward, attention is not;
- "full":  the block input only; the whole block is recomputed.

Per-GPU estimate: sharded fp32 parameters, gradients and AdamW state; FSDP's unsharded
parameter and gradient buffers; the activations every block keeps under its policy;
while a checkpointed block runs its backward, its recomputed activations (the "none" set
of one block) and the gradients in flight; the output layer's logits and loss.
What a block saves under "none" is not a formula: one block is run on the meta device
(shapes only, no memory) with hooks that record every tensor autograd saves, with the
attention kernel replaced by a stand-in that saves what FlashAttention-style kernels
save (q, k, v, output, log-sum-exp). So the estimate follows the model code.

`mode = "auto"` keeps the attention output in as many blocks as fit (the largest time
saving per byte at long context, where attention dominates), then upgrades blocks to
"none" while they fit, and uses "none" everywhere when everything fits. More memory never
gives any block a slower policy. Compiled blocks fuse the float32 up-casts of the norms
and RoPE and usually need less than this eager estimate, which is then an upper bound.

An evaluation (`training=False`) holds the sharded parameters, FSDP's gathered blocks and
the largest transient of a forward pass without gradients, bounded above by what one
block (or the output layer) would save for a backward; no gradients, no optimizer state,
no checkpointing.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from titan.config import ConfigError, JobConfig
from titan.config.sections import gpu_gib
from titan.distributed import ParallelDims, local_world_size
from titan.models.llama import (
    ModelArgs,
    Transformer,
    TransformerBlock,
    param_shapes,
    rope_table,
    token_loss_sum,
)

POLICIES = ("none", "op", "attn", "full")
"""Per-block policies, fastest first ("op" keeps every matmul output; explicit only)."""
AUTO_LADDER = ("none", "attn", "full")

GiB = 2**30


def gpu_capacity(name: str) -> int:
    """Bytes of a GPU named in `job.plan_for` (a GPUS key, or e.g. "75gib": the config
    check at load refuses any other name)."""
    size = gpu_gib(name)
    assert size is not None, f"job.plan_for {name!r} passed the config check"
    return int(size * GiB)


def device_capacity(cfg: JobConfig, device: torch.device, local_ranks: int) -> int:
    """Bytes one rank may use: the GPU's memory, or on CPU the machine's RAM shared by the
    ranks of this node; at most `activation_checkpoint.memory_limit_gib` when that is set."""
    if device.type == "cuda":
        return capped(cfg, torch.cuda.get_device_properties(device).total_memory)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return capped(cfg, ram // max(1, local_ranks))


def capped(cfg: JobConfig, capacity: int) -> int:
    """`capacity` bytes, at most `activation_checkpoint.memory_limit_gib` when that is set."""
    limit = int(cfg.activation_checkpoint.memory_limit_gib * GiB)
    return min(capacity, limit) if limit > 0 else capacity


# ----------------------------------------------------------------------------- activations


class _FlashLike(torch.autograd.Function):
    """Stand-in attention for tracing on the meta device: saves what FlashAttention-style
    kernels save for their backward (q, k, v, output, log-sum-exp)."""

    @staticmethod
    def forward(ctx, q, k, v):
        b, h, s, _ = q.shape  # (batch, heads, seq, head_dim)
        out, lse = torch.empty_like(q), q.new_empty((b, h, s), dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):  # pragma: no cover - shapes only, never run
        raise NotImplementedError


def _saved_bytes(fn, inputs: tuple, ignore: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while running `fn(*inputs)` (tensors
    sharing a storage count once), not counting the storages of `ignore`."""
    seen = [t.untyped_storage() for t in ignore]
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if not any(storage is s for s in seen):
            seen.append(storage)
            saved.append(storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(saved)


@dataclass(frozen=True)
class ActivationBytes:
    """Activation bytes of one micro-batch (per rank)."""

    kept: dict[str, int]
    """Policy -> bytes one block keeps from its forward to its backward."""
    working: int
    """Gradients in flight inside one block's backward (a checkpointed block also holds
    its recomputed saved set then)."""
    head: int
    """Final norm, output layer, logits and the loss, with their gradients (their
    backward runs before any block's, so this and the blocks' transients never add up)."""


def activation_bytes(args: ModelArgs, batch: int, seq: int, dtype: torch.dtype) -> ActivationBytes:
    """What each policy keeps per block, by tracing one block on the meta device."""
    a = dataclasses.replace(args, max_seq_len=seq, attn_impl="sdpa")
    e, tokens = dtype.itemsize, batch * seq
    with torch.device("meta"):
        block = TransformerBlock(0, a).to(dtype)
        head = Transformer(dataclasses.replace(a, n_layers=0)).to(dtype)
        x = torch.empty(batch, seq, a.dim, dtype=dtype, requires_grad=True)
        rope = rope_table(a, "meta")
        tokens_in = torch.zeros(batch, seq, dtype=torch.long)
    block.attention.attn = _FlashLike.apply
    none = _saved_bytes(block, (x, rope), [*block.parameters(), rope])
    # the trainer's own loss, through the embedding, the final norm and the output layer
    head_saved = _saved_bytes(
        token_loss_sum, (head, tokens_in, tokens_in), [*head.parameters(), *head.buffers()]
    )
    x_bytes = tokens * a.dim * e
    attention_out = tokens * a.n_heads * a.head_dim * e + tokens * a.n_heads * 4  # out + lse
    matmuls = tokens * (a.n_heads * a.head_dim + 2 * a.n_kv_heads * a.head_dim + 2 * a.dim)
    matmuls += tokens * 2 * a.ffn_hidden_dim
    kept = {
        "none": none,
        "op": x_bytes + matmuls * e + attention_out,
        "attn": x_bytes + attention_out,
        "full": x_bytes,
    }
    # Gradients in flight inside a block's backward: the gradient of its output and one
    # FFN-wide gradient while all its saved tensors are still alive.
    working = tokens * (a.ffn_hidden_dim + a.dim) * e
    # On top of what the head saves (the float32 log-softmax), its backward holds the
    # gradient it receives and the one it makes, both float32.
    head_total = head_saved + tokens * a.vocab_size * 2 * 4
    return ActivationBytes(kept, working, head_total)


# ----------------------------------------------------------------------------- the plan


@dataclass
class MemoryPlan:
    """Per-block policies and the estimate of one rank's peak memory, by component."""

    policies: list[str]
    components: dict[str, int]
    capacity: int
    usable: int
    fits: bool
    advice: str = ""
    training: bool = True
    """False: an evaluation's plan (forward passes only, no block checkpointed)."""

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def policy_summary(self) -> str:
        return summarize_policies(self.policies)


def summarize_policies(policies: list[str]) -> str:
    """`attn x 20, full x 12` in block order."""
    runs: list[list] = []
    for p in policies:
        if runs and runs[-1][0] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return ", ".join(f"{p} x {n}" for p, n in runs)


def _fixed_bytes(
    cfg: JobConfig, args: ModelArgs, dims: ParallelDims, e: int, training: bool = True
) -> dict[str, int]:
    """Memory that does not depend on the activation policy (`training`: with gradients
    and optimizer state; evaluation has neither)."""
    shapes = param_shapes(args)
    total = sum(math.prod(s) for s in shapes.values())
    block = sum(math.prod(s) for n, s in shapes.items() if n.startswith("layers.0."))
    root = total - args.n_layers * block
    reduce_bytes = getattr(torch, cfg.training.mixed_precision_reduce).itemsize
    per_rank = math.ceil(total / dims.dp_shard)
    if not training:  # two blocks gathered (current + prefetched), the last one (never
        # resharded after its forward: no backward follows) and the root's parameters
        return {"parameters (fp32, sharded)": per_rank * 4, "FSDP buffers": (3 * block + root) * e}
    return {
        "parameters (fp32, sharded)": per_rank * 4,
        "gradients (fp32, sharded)": per_rank * 4,
        "AdamW state (sharded)": per_rank * 8,
        # two blocks gathered (current + prefetched), one block's unsharded gradients in
        # the compute and reduce dtypes, the root's parameters and gradients
        "FSDP buffers": block * (3 * e + (reduce_bytes if reduce_bytes != e else 0)) + 2 * root * e,
    }


def _activation_total(policies: list[str], act: ActivationBytes) -> tuple[int, int]:
    """(bytes kept by all blocks, the largest transient of the backward: a block's
    recomputed set and gradients in flight, or the output layer's)."""
    kept = sum(act.kept[p] for p in policies)
    recomputed = act.kept["none"] if any(p != "none" for p in policies) else 0
    return kept, max(recomputed + act.working, act.head)


def plan_policies(n_layers: int, act: ActivationBytes, budget: int) -> list[str] | None:
    """The auto ladder under `budget` bytes for activations; None when even full
    recomputation everywhere does not fit. Blocks get the better policies first."""
    if sum(_activation_total(["none"] * n_layers, act)) <= budget:
        return ["none"] * n_layers
    kept_full = act.kept["full"] * n_layers
    room = budget - kept_full - max(act.kept["none"] + act.working, act.head)
    if room < 0:
        return None
    step_attn = act.kept["attn"] - act.kept["full"]
    n_attn = min(n_layers, room // step_attn) if step_attn > 0 else n_layers
    room -= n_attn * step_attn
    step_none = act.kept["none"] - act.kept["attn"]
    n_none = min(n_attn, n_layers - 1, room // step_none) if n_attn == n_layers else 0
    return ["none"] * n_none + ["attn"] * (n_attn - n_none) + ["full"] * (n_layers - n_attn)


def configured_policies(cfg: JobConfig, n_layers: int) -> list[str]:
    """Per-block policies of an explicit (not "auto") activation_checkpoint section."""
    ac = cfg.activation_checkpoint
    if ac.mode in ("none", "full"):
        return [ac.mode] * n_layers
    option = ac.selective_ac_option
    if option.isdigit():
        return ["full" if i % int(option) == 0 else "none" for i in range(n_layers)]
    return [option] * n_layers  # "op" or "attn"


def activation_dtype(cfg: JobConfig, device_type: str) -> torch.dtype:
    """The dtype blocks compute in: float32 on CPU, else the FSDP parameter dtype."""
    if device_type == "cpu":
        return torch.float32
    return getattr(torch, cfg.training.mixed_precision_param)


def plan_memory(
    cfg: JobConfig,
    args: ModelArgs,
    dims: ParallelDims,
    capacity: int,
    dtype: torch.dtype,
    advise: bool = True,
    training: bool = True,
) -> MemoryPlan:
    """The plan for the configured mode (auto: chosen here) on a device of `capacity`;
    with `advise`, a plan that does not fit says what would. Without `training` (an
    evaluation: forward passes without gradients) nothing is kept for a backward, so no
    block is checkpointed, and the largest transient is one block's or the output layer's."""
    t = cfg.training
    e = dtype.itemsize
    act = activation_bytes(args, t.batch_size, t.seq_len, dtype)
    fixed = _fixed_bytes(cfg, args, dims, e, training)
    usable = int(capacity * (1 - cfg.activation_checkpoint.memory_headroom))
    if not training:
        components = {**fixed, "forward working set (largest)": max(act.kept["none"], act.head)}
        fits = sum(components.values()) <= usable
        plan = MemoryPlan(["none"] * args.n_layers, components, capacity, usable, fits,
                          training=False)  # fmt: skip
        if not fits and advise:
            plan.advice = _advice(cfg, args, dims, capacity, dtype, training)
        return plan
    budget = usable - sum(fixed.values())
    if cfg.activation_checkpoint.mode == "auto":
        policies = plan_policies(args.n_layers, act, budget)
    else:
        policies = configured_policies(cfg, args.n_layers)
    fits = policies is not None
    shown = policies if fits else ["full"] * args.n_layers
    kept, transient = _activation_total(shown, act)
    components = {
        **fixed,
        "activations kept (all blocks)": kept,
        "backward working set (largest)": transient,
    }
    fits = fits and sum(components.values()) <= usable
    plan = MemoryPlan(shown, components, capacity, usable, fits)
    if not fits and advise:
        plan.advice = _advice(cfg, args, dims, capacity, dtype)
    return plan


def with_eval_batch(cfg: JobConfig, batch: int) -> JobConfig:
    """`cfg` as an evaluation plans it: `batch` windows per forward on each rank."""
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, batch_size=batch))


def plan_here(
    cfg: JobConfig, args: ModelArgs, dims: ParallelDims, device: torch.device, training: bool
) -> tuple[str, MemoryPlan]:
    """(the device's name, the plan) for this machine's device, as a start plans it."""
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "this CPU"
    capacity = device_capacity(cfg, device, local_world_size())
    dtype = activation_dtype(cfg, device.type)
    return label, plan_memory(cfg, args, dims, capacity, dtype, training=training)


def start_refuses(cfg: JobConfig, plan: MemoryPlan) -> bool:
    """Whether a start stops on `plan`: an evaluation that does not fit, or training in the
    auto mode that does not (an explicit mode is warned about and tried: the estimate may
    be pessimistic)."""
    return not plan.fits and (not plan.training or cfg.activation_checkpoint.mode == "auto")


def dry_run_plans(
    cfg: JobConfig, args: ModelArgs, dims: ParallelDims, device: torch.device, training: bool
) -> list[tuple[str, MemoryPlan]]:
    """(GPU, plan) for each GPU of `job.plan_for`, each planned as a start there would plan
    it (at most `memory_limit_gib`, blocks in `mixed_precision_param`); without plan_for,
    for this machine's device, refused (ConfigError) where a start here would refuse it."""
    if cfg.job.plan_for:
        dtype = activation_dtype(cfg, "cuda")
        return [
            (
                name,
                plan_memory(
                    cfg, args, dims, capped(cfg, gpu_capacity(name)), dtype, training=training
                ),
            )
            for name in cfg.job.plan_for
        ]
    label, plan = plan_here(cfg, args, dims, device, training)
    if start_refuses(cfg, plan):
        raise ConfigError(refusal(cfg, plan, label))
    return [(label, plan)]


def _advice(
    cfg: JobConfig,
    args: ModelArgs,
    dims: ParallelDims,
    capacity: int,
    dtype: torch.dtype,
    training: bool = True,
) -> str:
    """'would fit with: ...': the auto plan (for an explicit mode), else with auto a
    smaller micro-batch that keeps the global batch, a shorter sequence, or more ranks; or
    why nothing would. An evaluation is told only of a smaller eval.batch_size or more
    ranks (its sequence length is what it measures)."""
    t = cfg.training

    def auto_plan(batch: int, seq: int, shard: int) -> MemoryPlan:
        c = dataclasses.replace(cfg, training=dataclasses.replace(t, batch_size=batch, seq_len=seq))
        c.activation_checkpoint = dataclasses.replace(cfg.activation_checkpoint, mode="auto")
        d = dataclasses.replace(dims, dp_shard=shard, mesh=None)
        return plan_memory(c, args, d, capacity, dtype, advise=False, training=training)

    def fits(batch: int, seq: int, shard: int) -> bool:
        return auto_plan(batch, seq, shard).fits

    if training and cfg.activation_checkpoint.mode != "auto":
        plan = auto_plan(t.batch_size, t.seq_len, dims.dp_shard)
        if plan.fits:
            return (
                f'would fit with: activation_checkpoint.mode = "auto" '
                f"(blocks: {plan.policy_summary()})"
            )
    options = []
    batch, too_big = 0, t.batch_size  # bisection: `batch` fits (or is 0), `too_big` does not
    while too_big - batch > 1:
        middle = (batch + too_big) // 2
        if fits(middle, t.seq_len, dims.dp_shard):
            batch = middle
        else:
            too_big = middle
    # The global batch (sequences per optimizer step) stays: a smaller micro-batch that
    # divides it is made up by gradient accumulation.
    if training:
        per_rank = dims.global_batch(cfg) // dims.dp_degree
        batch = next((d for d in range(batch, 0, -1) if per_rank % d == 0), 0)
    if batch:
        option = f"{'training' if training else 'eval'}.batch_size = {batch}"
        if training and t.global_batch_size == -1:  # keep the sequences per optimizer step
            option += f" with training.global_batch_size = {dims.global_batch(cfg)}"
        options.append(option)
    elif training:
        seq = t.seq_len // 2
        while seq >= 1024 and not fits(1, seq, dims.dp_shard):
            seq //= 2
        if seq >= 1024:
            options.append(
                f"training.batch_size = 1, training.seq_len = {seq}"
                if t.batch_size > 1
                else f"training.seq_len = {seq}"
            )
    shard = dims.dp_shard * 2
    while shard <= 4096 and not fits(t.batch_size, t.seq_len, shard):
        shard *= 2
    if shard <= 4096:
        ranks = f"{shard} ranks per replica (training.data_parallel_shard_degree)"
        per_pass = t.batch_size * dims.dp_replicate * shard
        if training and t.global_batch_size > 0 and t.global_batch_size % per_pass:
            ranks += f" with training.global_batch_size a multiple of {per_pass}"
        options.append(ranks)
    if not options:
        shorter = ", sequences down to 1,024 tokens" if training else ""
        return (
            f"nothing smaller would fit (micro-batch 1{shorter}, up to 4,096 ranks per "
            "replica): it needs a device with more memory"
        )
    auto = (
        ""
        if cfg.activation_checkpoint.mode == "auto" or not training
        else 'activation_checkpoint.mode = "auto" and '
    )
    return "would fit with: " + auto + " or ".join(options)


def refusal(cfg: JobConfig, plan: MemoryPlan, label: str) -> str:
    """Why a run does not fit on `label` (a plan that does not fit) and what would."""
    t = cfg.training
    batch = "batch_size" if plan.training else "eval.batch_size"
    return (
        f"training.seq_len = {t.seq_len} with {batch} {t.batch_size} needs about "
        f"{gib(plan.total)} per rank but {label} has {gib(plan.usable)} usable; {plan.advice}"
    )


def gib(nbytes: int) -> str:
    """`71.3 GiB`, or `0.08 GiB` for small amounts."""
    value = nbytes / GiB
    return f"{value:.1f} GiB" if value >= 10 else f"{value:.2f} GiB"


def format_plan(plan: MemoryPlan, label: str) -> str:
    """A few lines: the policy per block and the estimate per component."""
    blocks = plan.policy_summary() if plan.training else "forward only (evaluation)"
    lines = [
        f"memory plan for {label}: {gib(plan.total)} estimated of "
        f"{gib(plan.usable)} usable ({gib(plan.capacity)} total); blocks: {blocks}"
    ]
    lines += [f"    {name:<36} {b / GiB:8.2f} GiB" for name, b in plan.components.items()]
    if not plan.fits:
        how = ""
        if plan.training:
            full = set(plan.policies) == {"full"}
            how = " even with full recomputation" if full else " with these policies"
        lines.append(f"    does not fit{how}; {plan.advice}")
    return "\n".join(lines)
