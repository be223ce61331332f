"""The trainer: small builders, one `train_step`, one loop.

    torchrun --nproc_per_node 2 train.py --job.config_file train_configs/debug_model.toml

Loss normalization (DESIGN §4): each micro-batch's summed token cross-entropy is divided
by the number of target tokens in the whole global batch, so any split of the global
batch into ranks x micro-batches yields the gradient of one big batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LRScheduler

from titan.checkpoint import Checkpointer, CheckpointError, TrainState
from titan.config import ConfigError, JobConfig, format_help, load_config
from titan.data import build_dataloader, prepare_dataset
from titan.distributed import (
    ParallelDims,
    env_rank,
    init_distributed,
    launched_world_size,
    restart_count,
)
from titan.logging import init_logger, logger
from titan.metrics import MetricsLogger
from titan.models.attention import resolve_attn_impl
from titan.models.llama import ModelArgs, Transformer, build_model_args, flops_per_token, num_params
from titan.optim import build_lr_scheduler, build_optimizer
from titan.parallelize import parallelize

# ----------------------------------------------------------------------------- builders


def resolve_attention(cfg: JobConfig, device: torch.device) -> str:
    """The attention kernel `model.attn_impl` stands for on this device (logged)."""
    try:
        attn = resolve_attn_impl(cfg.model.attn_impl, device)
    except ValueError as e:
        raise ConfigError(f"model.attn_impl = {cfg.model.attn_impl!r}: {e}") from None
    logger.info(f"Attention kernel: {attn} (model.attn_impl = {cfg.model.attn_impl})")
    return attn


def build_model(
    cfg: JobConfig, dims: ParallelDims, device: torch.device
) -> tuple[Transformer, ModelArgs]:
    """Build on the meta device, wrap (AC, compile, FSDP2), then materialize and init."""
    attn = resolve_attention(cfg, device)
    args = build_model_args(cfg.model.flavor, cfg.training.vocab_size, cfg.training.seq_len, attn)
    with torch.device("meta"):
        model = Transformer(args)
    parallelize(model, cfg, dims, device)
    return model, args


def build_metrics(
    cfg: JobConfig, args: ModelArgs, device: torch.device, rank: int
) -> MetricsLogger:
    return MetricsLogger(
        dump_folder=Path(cfg.job.dump_folder),
        device=device,
        flops_per_token=flops_per_token(args, cfg.training.seq_len, causal=False),
        flops_per_token_causal=flops_per_token(args, cfg.training.seq_len, causal=True),
        total_steps=cfg.training.steps,
        enable_tensorboard=cfg.metrics.enable_tensorboard,
        tb_folder=cfg.metrics.save_tb_folder,
        enabled=rank == 0,
    )


def plan_table(
    cfg: JobConfig, args: ModelArgs, dims: ParallelDims, n_params: int, n_embed: int
) -> str:
    """The start-up summary: model, mesh, batch arithmetic, data."""
    t = cfg.training
    accum = dims.accumulation_steps(cfg)
    global_seqs = t.batch_size * dims.dp_degree * accum
    rows = [
        (
            "model",
            f"{cfg.model.name} {cfg.model.flavor}: {n_params:,} parameters "
            f"({n_params - n_embed:,} without embedding)",
        ),
        (
            "shape",
            f"{args.n_layers} layers, dim {args.dim}, {args.n_heads} heads / "
            f"{args.n_kv_heads} kv heads, FFN {args.ffn_hidden_dim}, vocab {args.vocab_size}",
        ),
        (
            "context",
            f"{t.seq_len:,} tokens, RoPE theta {args.rope_theta:g}"
            + (f", Llama-3.1 scaling x{args.rope_scale_factor:g}" if args.use_scaled_rope else ""),
        ),
        (
            "mesh",
            f"world {dims.world_size} = {dims.dp_replicate} replicate x {dims.dp_shard} shard "
            f"({'HSDP' if dims.dp_replicate > 1 else 'FSDP2'}) on {dims.device_type}",
        ),
        (
            "micro-batch",
            f"{t.batch_size} x {t.seq_len:,} = {t.batch_size * t.seq_len:,} tokens per rank",
        ),
        (
            "step",
            f"{global_seqs} sequences = {global_seqs * t.seq_len:,} tokens "
            f"({accum} accumulation step{'s' if accum > 1 else ''})",
        ),
        (
            "training",
            f"{t.steps:,} steps, lr {cfg.optimizer.lr:g}, warmup {t.warmup_steps}, "
            f"{cfg.lr_scheduler.decay_type} decay to {cfg.lr_scheduler.min_lr_ratio:g}x",
        ),
        (
            "kernels",
            f"attention {args.attn_impl}, AC {cfg.activation_checkpoint.mode}, "
            f"compile {t.compile}, params {t.mixed_precision_param}, "
            f"reduce {t.mixed_precision_reduce}",
        ),
        (
            "data",
            f"{t.dataset}"
            + (f" from {t.dataset_path}" if t.dataset_path else "")
            + f", split {cfg.data.split}"
            + (", streaming" if cfg.data.streaming else ""),
        ),
    ]
    return tabulate(rows, tablefmt="simple_outline")


def format_config(cfg: JobConfig) -> str:
    """One line per section: `[training] batch_size=4 seq_len=512 ...`."""
    return "\n".join(
        f"[{section}] " + " ".join(f"{k}={v!r}" for k, v in values.items())
        for section, values in cfg.to_dict().items()
    )


def save_config(cfg: JobConfig) -> None:
    """Write the resolved config beside the outputs, as a TOML recipe that reloads as is."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is not None:
                lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    folder = Path(cfg.job.dump_folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text("\n".join(lines))


# ----------------------------------------------------------------------------- step


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm over all shards (clipped in place when max_norm > 0)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):  # FSDP2: a partial norm; finish the reduction
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm, foreach=True)
    return norm


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    global_tokens: int,
    dp_degree: int,
    max_norm: float,
) -> tuple[float, float]:
    """Forward/backward over this rank's micro-batches, then one optimizer step unless the
    loss or gradient norm is not finite. Returns (global mean loss, grad norm)."""
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    for inputs, labels in micro_batches:
        inputs = inputs.to(device, non_blocking=True)  # (batch, seq)
        labels = labels.to(device, non_blocking=True)  # (batch, seq)
        logits = model(inputs)  # (batch, seq, vocab)
        loss = (
            F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
            / global_tokens
        )
        # FSDP averages gradients over the DP ranks; scaling by the degree makes it the sum.
        (loss * dp_degree).backward()
        loss_sum += loss.detach()
    grad_norm = clip_grad_norm(model, max_norm)
    dist.all_reduce(loss_sum)  # the global batch's mean token loss
    loss_value, norm_value = torch.stack([loss_sum, grad_norm.to(loss_sum.dtype)]).tolist()
    if math.isfinite(loss_value) and math.isfinite(norm_value):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value


# ----------------------------------------------------------------------------- loop


def maybe_profile(cfg: JobConfig, rank: int) -> contextlib.AbstractContextManager:
    """torch.profiler over one step every `profile_freq` steps, traces per rank."""
    p = cfg.profiling
    if not p.enable_profiling:
        return contextlib.nullcontext()
    folder = Path(cfg.job.dump_folder) / p.save_traces_folder

    def save(prof: torch.profiler.profile) -> None:
        out = folder / f"step-{prof.step_num}"
        out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out / f"rank{rank}_trace.json"))

    warmup = 1 if p.profile_freq > 1 else 0
    return torch.profiler.profile(
        schedule=torch.profiler.schedule(wait=p.profile_freq - 1 - warmup, warmup=warmup, active=1),
        on_trace_ready=save,
    )


def next_micro_batches(data: Iterator, n: int) -> tuple[list, float]:
    """The next `n` micro-batches and the seconds spent waiting for them."""
    begin = time.perf_counter()
    batches = [next(data) for _ in range(n)]
    return batches, time.perf_counter() - begin


def train(
    cfg: JobConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    dataloader: Iterable,
    dims: ParallelDims,
    checkpointer: Checkpointer,
    train_state: TrainState,
    metrics: MetricsLogger,
    rank: int,
) -> None:
    """Steps from `train_state.step` to `training.steps`: fetch, step, log, checkpoint."""
    t = cfg.training
    accum = dims.accumulation_steps(cfg)
    global_tokens = t.batch_size * t.seq_len * accum * dims.dp_degree
    data, bad_in_a_row, skipped = iter(dataloader), 0, 0
    metrics.record_start(train_state.step)
    with maybe_profile(cfg, rank) as profiler:
        while train_state.step < t.steps:
            batches, wait_s = next_micro_batches(data, accum)
            loss, grad_norm = train_step(
                model, optimizer, batches, global_tokens, dims.dp_degree, t.max_norm
            )
            train_state.step += 1
            train_state.tokens_seen += global_tokens
            scheduler.step()
            metrics.record_step(global_tokens // dims.dp_degree, wait_s)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                bad_in_a_row, skipped = bad_in_a_row + 1, skipped + 1
                logger.warning(
                    f"step {train_state.step}: loss {loss}, grad norm {grad_norm}: "
                    f"not finite, update skipped ({bad_in_a_row} in a row)"
                )
                if bad_in_a_row >= t.max_consecutive_bad_steps:
                    raise TrainingDiverged(
                        f"{bad_in_a_row} consecutive steps with a non-finite loss or gradient norm "
                        f"(last at step {train_state.step}); lower optimizer.lr or resume from an "
                        "earlier checkpoint with --checkpoint.load_step"
                    )
                continue  # never checkpoint a bad step
            bad_in_a_row = 0
            if train_state.step % cfg.metrics.log_freq == 0 or train_state.step in (1, t.steps):
                metrics.log(
                    train_state.step,
                    loss,
                    grad_norm,
                    scheduler.get_last_lr()[0],
                    {"skipped_steps": skipped},
                )
            checkpointer.maybe_save(train_state.step)
            if profiler is not None:
                profiler.step()
    checkpointer.close()
    metrics.summary(train_state.step, train_state.tokens_seen)


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the message is one line."""


def run_on_rank0(fn, *args) -> None:
    """Run `fn` on rank 0 only; a ConfigError there stops every rank (no rank is left
    waiting at a barrier for a rank that has failed)."""
    error = [None]
    if dist.get_rank() == 0:
        try:
            fn(*args)
        except ConfigError as e:
            error[0] = str(e)
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise ConfigError(error[0])


def setup_and_train(cfg: JobConfig) -> None:
    device, rank, world = init_distributed()
    init_logger(rank)
    dims = ParallelDims.from_config(cfg, world, device.type)
    dims.build_mesh()
    torch.manual_seed(cfg.training.seed)
    if cfg.training.deterministic:
        torch.use_deterministic_algorithms(True)
    if rank == 0:
        save_config(cfg)
        logger.info(
            f"Resolved config (saved to {Path(cfg.job.dump_folder) / 'config.toml'}):\n"
            + format_config(cfg)
        )
        if restart_count():
            logger.warning(
                f"torchrun restart {restart_count()}: resuming from the newest checkpoint"
            )
    run_on_rank0(prepare_dataset, cfg)
    model, args = build_model(cfg, dims, device)
    logger.info(
        "\n"
        + plan_table(
            cfg,
            args,
            dims,
            num_params(model),
            num_params(model) - num_params(model, exclude_embedding=True),
        )
    )
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_lr_scheduler(optimizer, cfg)
    dataloader = build_dataloader(cfg, dims.dp_rank(), dims.dp_degree)
    train_state = TrainState(dp_degree=dims.dp_degree, world_size=world)
    checkpointer = Checkpointer(
        cfg, model, optimizer, scheduler, dataloader, train_state, dims.dp_rank()
    )
    checkpointer.load()
    if train_state.step >= cfg.training.steps:
        logger.info(
            f"Already trained {train_state.step} of {cfg.training.steps} steps: nothing to do"
        )
        return
    metrics = build_metrics(cfg, args, device, rank)
    try:
        train(
            cfg,
            model,
            optimizer,
            scheduler,
            dataloader,
            dims,
            checkpointer,
            train_state,
            metrics,
            rank,
        )
    finally:  # stop the prefetch thread before the interpreter shuts down
        metrics.close()
        dataloader.close()


def dry_run(cfg: JobConfig) -> None:
    """Resolve the plan (model on the meta device, mesh, batch) without a process group.
    The world size comes from WORLD_SIZE, else from the recipe's explicit degrees."""
    rank, t = env_rank()[0], cfg.training
    world = launched_world_size()
    if world is None:  # the recipe's explicit degrees, else a single process
        explicit = t.data_parallel_shard_degree > 0
        world = t.data_parallel_replicate_degree * t.data_parallel_shard_degree if explicit else 1
    init_logger(rank)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dims = ParallelDims.from_config(cfg, world, device.type)
    attn = resolve_attention(cfg, device)
    args = build_model_args(cfg.model.flavor, t.vocab_size, t.seq_len, attn)
    with torch.device("meta"):
        model = Transformer(args)
    n = num_params(model)
    logger.info(
        "dry run: the resolved plan and config follow; nothing is trained\n"
        + plan_table(cfg, args, dims, n, n - num_params(model, exclude_embedding=True))
        + f"\nFLOPs per token: {flops_per_token(args, t.seq_len, causal=False):.4g} "
        f"(causal-aware {flops_per_token(args, t.seq_len, causal=True):.4g})\n" + cfg.to_json()
    )


def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(format_help())
        return 0
    try:
        cfg = load_config(argv)
        if cfg.job.dry_run:
            dry_run(cfg)
            return 0
        setup_and_train(cfg)
    except (ConfigError, CheckpointError, TrainingDiverged) as e:
        if env_rank()[0] == 0:  # every rank hits the same error; say it once
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
