"""One training run's objects, built in one order and closed in one place.

    with build_run(cfg) as run:          # distributed -> mesh -> data -> model ->
        train(run)                       # optimizer -> schedule -> checkpointer (-> resume)

`Run.close()` runs however the block is left (success, exception, Ctrl-C): it finishes
or gives up the checkpoint save in flight, releases the save group, stops the data
loader's thread and closes the metrics files. Tests and benchmarks build the same object
with `build_run(cfg, train=False)`: no data, no metrics, nothing written or resumed;
evaluation adds its batch size (`eval_batch`), and its memory plan is then forward-only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import torch
import torch.distributed as dist
import torch.nn as nn
from tabulate import tabulate
from torch.optim.lr_scheduler import LRScheduler

from titan.checkpoint import Checkpointer, CheckpointError, TrainState
from titan.config import ConfigError, JobConfig
from titan.data import SpikeDataLoader, build_dataloader, prepare_dataset
from titan.data.held_out import HeldOut
from titan.distributed import ParallelDims, init_distributed, restart_count
from titan.files import written_atomically
from titan.kernel_choice import AttnShape, KernelChoice, choose_attention
from titan.lifecycle import RunLock
from titan.logging import init_logger, logger
from titan.memory import (
    MemoryPlan,
    activation_dtype,
    format_plan,
    plan_here,
    refusal,
    start_refuses,
    with_eval_batch,
)
from titan.metrics import MetricsLogger
from titan.models.llama import ModelArgs, Transformer, flops_per_token, num_params
from titan.optim import build_lr_scheduler, build_optimizer, warn_about_the_schedule
from titan.parallelize import parallelize
from titan.preflight import check_run, shape_args


@dataclass
class Run:
    """Everything a training loop needs; fields are filled in build order."""

    cfg: JobConfig
    device: torch.device
    rank: int
    dims: ParallelDims
    train_state: TrainState
    model: nn.Module | None = None
    model_args: ModelArgs | None = None
    kernel: KernelChoice | None = None
    memory: MemoryPlan | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: LRScheduler | None = None
    dataloader: SpikeDataLoader | None = None
    checkpointer: Checkpointer | None = None
    metrics: MetricsLogger | None = None
    held_out: HeldOut | None = None
    """The validation split's windows (when validation is on)."""
    locks: list[RunLock] = field(default_factory=list)
    """Rank 0's hold on the dump folder and on the checkpoint folder (training only)."""

    @property
    def trained_already(self) -> bool:
        """Whether the resumed step is already the recipe's last: nothing left to train."""
        return self.train_state.step >= self.cfg.training.steps

    def close(self, failed: bool = False) -> None:
        """Release what the run holds; safe to call on a partly built run, and twice."""
        try:
            if self.checkpointer is not None:
                self.checkpointer.close(failed=failed)
        finally:
            if self.dataloader is not None:  # its thread must stop before interpreter exit
                self.dataloader.close()
            if self.metrics is not None:
                self.metrics.close()
            while self.locks:
                self.locks.pop().release()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc_type is not None)


def build_run(cfg: JobConfig, *, train: bool = True, eval_batch: int | None = None) -> Run:
    """Set up a run in the fixed order. With `train` (the trainer): prepare and load the
    data, resume from the newest checkpoint (or `initial_load_path`), save the resolved
    config and open the metrics; without (tests, benchmarks, evaluation): model,
    optimizer, schedule and checkpointer only. With `eval_batch` (evaluation: forward
    passes of that many sequences) the memory is planned without gradients, optimizer
    state or checkpointing. A failure part-way closes what was built."""
    device, rank, world = init_distributed(cfg.job.init_timeout_s)
    if train:  # tests and benchmarks set up logging themselves
        init_logger(rank)
    dims = ParallelDims.from_config(cfg, world, device.type, training=eval_batch is None)
    dims.build_mesh()
    torch.manual_seed(cfg.training.seed)
    if cfg.training.deterministic:
        torch.use_deterministic_algorithms(True)
    state = TrainState(
        dp_degree=dims.dp_degree,
        world_size=world,
        seq_len=cfg.training.seq_len,
        global_batch=dims.global_batch(cfg),
    )
    run = Run(cfg, device, rank, dims, state)
    try:
        if train:
            run_on_rank0(check_run, cfg)  # inputs, folders, disk space: before heavy work
            run_on_rank0(_take_folder, run)  # one run per dump folder
            _log_start(cfg)  # after the quick refusals, which are then the only line
            warn_about_the_schedule(cfg)
            run_on_rank0(prepare_dataset, cfg)
            # Every rank's data, before the heavy work: an empty source filter or a missing
            # validation split stops the run here.
            run.dataloader = build_dataloader(cfg, dims.dp_rank(), dims.dp_degree)
            if cfg.validation.enable:
                run.held_out = HeldOut.open(cfg, cfg.validation.split, "validation.split")
        run.model, run.model_args, run.kernel, run.memory = build_model(
            cfg, dims, device, eval_batch
        )
        if train:
            logger.info("\n" + plan_table(cfg, run.model_args, dims, run.kernel, run.memory))
        run.optimizer = build_optimizer(run.model, cfg, device)
        run.scheduler = build_lr_scheduler(run.optimizer, cfg)
        run.checkpointer = Checkpointer(
            cfg,
            model=run.model,
            optimizer=run.optimizer,
            lr_scheduler=run.scheduler,
            train_state=run.train_state,
            dataloader=run.dataloader,
            dp_rank=dims.dp_rank(),
            dims=dims,
        )
        if train:
            run.checkpointer.load()
            if rank == 0 and not run.trained_already:  # else the config of its steps stays
                save_config(cfg)
            run.metrics = build_metrics(cfg, run.model_args, device, rank)
            # redone steps replace theirs; an abandoned branch's go beside its steps
            run.metrics.keep_records_until(run.train_state.step, run.checkpointer.set_aside)
    except BaseException:
        run.close(failed=True)
        raise
    return run


def run_locks(cfg: JobConfig) -> list[RunLock]:
    """The locks a run takes: the dump folder's and the checkpoint folder's, since an
    absolute `checkpoint.folder` (e.g. on a scratch file system) may be another run's,
    whatever the dump folders."""
    dump = Path(cfg.job.dump_folder)
    locks = [RunLock(dump, "job.dump_folder")]
    checkpoints = dump / cfg.checkpoint.folder
    if cfg.checkpoint.enable_checkpoint and checkpoints.resolve() != dump.resolve():
        locks.append(RunLock(checkpoints, "checkpoint.folder"))
    return locks


def _take_folder(run: Run) -> None:
    for lock in run_locks(run.cfg):
        lock.acquire()
        run.locks.append(lock)


def _log_start(cfg: JobConfig) -> None:
    logger.info("Resolved config:\n" + format_config(cfg))
    if restart_count():
        logger.warning(f"torchrun restart {restart_count()}: resuming from the newest checkpoint")


# ----------------------------------------------------------------------------- builders


def attention_shape(cfg: JobConfig, args: ModelArgs, device_type: str) -> AttnShape:
    """One attention call of this run: the micro-batch, context, heads and compute dtype."""
    t = cfg.training
    dtype = activation_dtype(cfg, device_type)
    return AttnShape(t.batch_size, t.seq_len, args.n_heads, args.n_kv_heads, args.head_dim, dtype)


def model_args(
    cfg: JobConfig, device: torch.device, measure_auto: bool = True
) -> tuple[ModelArgs, KernelChoice]:
    """The model's architecture with the attention kernel `model.attn_impl` stands for on
    this device (logged; `measure_auto=False`, as a dry run: "auto" is not timed)."""
    args = shape_args(cfg)
    try:
        shape = attention_shape(cfg, args, device.type)
        choice = choose_attention(cfg.model.attn_impl, device, shape, measure_auto=measure_auto)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"model.attn_impl = {cfg.model.attn_impl!r}: {e}") from None
    logger.info(f"Attention kernel: {choice.summary()}")
    return dataclasses.replace(args, attn_impl=choice.impl), choice


def build_model(
    cfg: JobConfig, dims: ParallelDims, device: torch.device, eval_batch: int | None = None
) -> tuple[Transformer, ModelArgs, KernelChoice, MemoryPlan]:
    """Choose the attention kernel and the activation policy of each block (none for an
    evaluation of `eval_batch` sequences per forward), build on the meta device, wrap (AC,
    compile, FSDP2), then materialize and initialize."""
    args, kernel = model_args(cfg, device)
    planned = cfg if eval_batch is None else with_eval_batch(cfg, eval_batch)
    label, memory = plan_here(planned, args, dims, device, training=eval_batch is None)
    logger.info(format_plan(memory, label))
    if not memory.fits:
        message = refusal(planned, memory, label)
        if start_refuses(planned, memory):
            raise ConfigError(message)
        logger.warning(message + " (training anyway: the estimate may be pessimistic)")
    with torch.device("meta"):
        model = Transformer(args)
    parallelize(model, cfg, dims, device, memory.policies)
    return model, args, kernel, memory


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


def run_on_rank0(fn, *args) -> None:
    """Run `fn` on rank 0 only; a bad input there (ConfigError, or a CheckpointError such as
    a step of another model) stops every rank with its line (no rank is left waiting at a
    barrier for a rank that has failed)."""
    error = [None]
    if dist.get_rank() == 0:
        try:
            fn(*args)
        except (ConfigError, CheckpointError) as e:
            error[0] = str(e)
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise ConfigError(error[0])


# ----------------------------------------------------------------------------- reporting


def plan_table(
    cfg: JobConfig,
    args: ModelArgs,
    dims: ParallelDims,
    kernel: KernelChoice,
    memory: MemoryPlan | None,
) -> str:
    """The start-up summary: model, mesh, batch arithmetic, kernels, data."""
    t = cfg.training
    with torch.device("meta"):
        model = Transformer(args)
    n_params, n_embed = num_params(model), model.tok_embeddings.weight.numel()
    accum, global_seqs = dims.accumulation_steps(cfg), dims.global_batch(cfg)
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
        ("attention", kernel.summary()),
        (
            "kernels",
            f"AC {cfg.activation_checkpoint.mode}"
            + (f" ({memory.policy_summary()})" if memory is not None else "")
            + f", compile {t.compile}, params {t.mixed_precision_param}, "
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
    """Write the resolved config beside the outputs, as a TOML recipe that reloads as is
    (TOML has no null: an unset key is left out)."""
    recipe = {
        section: {key: value for key, value in values.items() if value is not None}
        for section, values in cfg.to_dict().items()
    }
    folder = Path(cfg.job.dump_folder)
    folder.mkdir(parents=True, exist_ok=True)
    with written_atomically(folder / "config.toml") as tmp:  # never half a recipe
        tmp.write_text(tomli_w.dumps(recipe), encoding="utf-8")
    logger.info(f"Resolved config saved to {folder / 'config.toml'}")
