"""The trainer: one `train_step`, one loop, and the `train.py` entry point.

    torchrun --nproc_per_node 2 train.py --job.config_file train_configs/debug_model.toml

Loss normalization: each micro-batch's summed token cross-entropy is divided by the number
of target tokens in the whole global batch, and FSDP's gradient average over the ranks is
undone by scaling with the data-parallel degree, so any split of the global batch into
ranks x micro-batches yields the gradient of one big batch (the tests check 1x4, 2x2, 4x1).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from titan.checkpoint.resume import train_on_advice
from titan.cli import StoppedOnSignal, StoppedUnsaved, TrainingDiverged, run_command
from titan.config import JobConfig
from titan.data.held_out import HeldOut
from titan.data.loader import build_dataloader
from titan.data.sources import quiet_datasets, resolve_source
from titan.distributed import ParallelDims, dry_run_world_size, env_rank, set_collective_timeout
from titan.evaluate import evaluate
from titan.lifecycle import StepWatch, StopSignals
from titan.logging import init_logger, logger
from titan.memory import dry_run_plans, format_plan, gib
from titan.metrics import peak_memory_gib
from titan.models.llama import flops_per_token, token_loss_sum
from titan.optim import warn_about_the_schedule
from titan.preflight import check_dry_run
from titan.run import Run, build_run, model_args, plan_table, run_locks

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
        loss = token_loss_sum(model, inputs, labels) / global_tokens
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


def train(run: Run, stop: StopSignals) -> None:
    """Steps from `train_state.step` to `training.steps`: fetch, step, log, checkpoint;
    a stop signal ends the loop with a complete checkpoint (StoppedOnSignal), or with
    checkpointing off with nothing saved (StoppedUnsaved)."""
    cfg, dims, state, metrics = run.cfg, run.dims, run.train_state, run.metrics
    t, job = cfg.training, cfg.job
    accum = dims.accumulation_steps(cfg)
    global_tokens = dims.global_batch(cfg) * t.seq_len
    data, watch, bad = iter(run.dataloader), StepWatch(), BadSteps(t.max_consecutive_bad_steps)
    first_step = state.step + 1
    metrics.record_start(state.step)
    with maybe_profile(cfg, run.rank) as prof:
        while state.step < t.steps:
            watch.start(state.step + 1)
            batches, wait_s = next_micro_batches(data, accum)
            loss, grad_norm = train_step(
                run.model, run.optimizer, batches, global_tokens, dims.dp_degree, t.max_norm
            )
            state.step += 1
            state.tokens_seen += global_tokens
            lr = run.scheduler.get_last_lr()[0]  # the rate this step used
            run.scheduler.step()
            metrics.record_step(global_tokens // dims.dp_degree, wait_s)
            watch.done()
            if state.step == first_step:  # set-up's long waits are over
                log_memory(run)
                set_collective_timeout(job.collective_timeout_s, dims)
            if bad.record(state.step, loss, grad_norm):
                if state.step % cfg.metrics.log_freq == 0 or state.step in (1, t.steps):
                    metrics.log(state.step, loss, grad_norm, lr, {"skipped_steps": bad.skipped})
                # validation first: a kill between the two then loses no validation record
                # (the resumed run starts after the saved step)
                if cfg.validation.enable and state.step % cfg.validation.freq == 0:
                    validate(run)
                run.checkpointer.maybe_save(state.step)  # never a bad step
            if stop.signals and state.step < t.steps and stop.stop_agreed(run.device):
                stop_and_save(run, stop.received or "a signal on another rank")
            if prof is not None:
                prof.step()
    watch.close()
    bad.check_end()
    run.checkpointer.wait()
    metrics.summary(state.step, state.tokens_seen)


class BadSteps:
    """Counts non-finite steps (their updates are skipped): too many in a row, or any at
    the very end (no final checkpoint), end the run with TrainingDiverged."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row, self.skipped, self.last = limit, 0, 0, 0

    def record(self, step: int, loss: float, grad_norm: float) -> bool:
        """True when the step was finite."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.in_a_row, self.skipped, self.last = self.in_a_row + 1, self.skipped + 1, step
        logger.warning(
            f"step {step}: loss {loss}, grad norm {grad_norm}: "
            f"not finite, update skipped ({self.in_a_row} in a row)"
        )
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(
                f"{self.in_a_row} consecutive steps with a non-finite loss or gradient norm "
                f"(last at step {step}); lower optimizer.lr or resume from an "
                "earlier checkpoint with --checkpoint.load_step"
            )
        return False

    def check_end(self) -> None:
        if self.in_a_row:
            raise TrainingDiverged(
                f"the run ended with {self.in_a_row} non-finite step(s) (last at step "
                f"{self.last}), so its final checkpoint was not written; resume from an "
                "earlier checkpoint with --checkpoint.load_step"
            )


NOTHING_SAVED = (
    "checkpointing is off (checkpoint.enable_checkpoint), so nothing was saved and a rerun "
    "starts at step 1"
)


def stop_and_save(run: Run, signal_name: str) -> None:
    """Every rank agreed to stop after this step: save it completely, then end the run
    (with checkpointing off: end it, with nothing saved)."""
    step = run.train_state.step
    if not run.checkpointer.enabled:
        raise StoppedUnsaved(f"{signal_name} at step {step}: {NOTHING_SAVED}")
    run.checkpointer.save(step, sync=True)
    raise StoppedOnSignal(
        f"{signal_name} at step {step}: saved checkpoint step-{step}; run the same command "
        "again to continue"
    )


def validate(run: Run) -> None:
    """Held-out loss on every rank (the same windows each time; the training data's
    position and the RNG are untouched), logged as a validation record."""
    v, begin = run.cfg.validation, time.perf_counter()
    batch = run.cfg.training.batch_size
    n_windows = run.held_out.windows_for(v.steps, v.max_tokens, run.dims.dp_degree, batch)
    result = evaluate(run.model, run.held_out, run.dims, batch, n_windows)
    run.metrics.log_validation(run.train_state.step, result, time.perf_counter() - begin)


def log_memory(run: Run) -> None:
    """The plan's estimate beside the measured peak, once the first step has run."""
    measured = peak_memory_gib(run.device)
    what = "peak allocated" if run.device.type == "cuda" else "peak RSS, Python itself included"
    logger.info(
        f"Memory after the first step: {measured:.2f} GiB measured ({what}), "
        f"{gib(run.memory.total)} planned ({run.memory.policy_summary()})"
    )


def setup_and_train(cfg: JobConfig) -> None:
    # The stop signals are caught from the start: a signal during set-up (a long checkpoint
    # load, say) must not kill the ranks, and the teardown runs with them still caught.
    with (
        StopSignals(cfg.checkpoint.save_on_signals, cfg.checkpoint.enable_checkpoint) as stop,
        build_run(cfg) as run,
    ):
        step = run.train_state.step
        if run.trained_already:
            logger.info(
                f"Already trained {step} of {cfg.training.steps} steps: nothing to do (to train "
                f"on, {train_on_advice(run.checkpointer.folder, cfg.training.steps)}; to go back, "
                "--checkpoint.load_step N)"
            )
            return
        if stop.signals and stop.stop_agreed(run.device):
            when = f"{stop.received or 'a signal on another rank'} during set-up"
            if not run.checkpointer.enabled:
                raise StoppedUnsaved(f"{when}: {NOTHING_SAVED}")
            raise StoppedOnSignal(
                f"{when}, before step {step + 1}: nothing new to save; run the same command "
                "again to continue"
            )
        stop.setting_up = False
        train(run, stop)


def dry_run(cfg: JobConfig) -> None:
    """Resolve the plan (model on the meta device, mesh, batch, attention kernel, memory
    per GPU) without a process group, after the checks of a real start that write nothing.
    The world size comes from WORLD_SIZE, else from the recipe's explicit degrees."""
    world = dry_run_world_size(cfg)  # checked first: env_rank() trusts what torchrun sets
    init_logger(env_rank()[0])
    check_dry_run(cfg)  # what a real start would refuse (writes nothing)
    for held in filter(None, (lock.held_by_another() for lock in run_locks(cfg))):
        logger.warning(f"A start now would be refused: {held}")  # the plan is still worth seeing
    warn_about_the_schedule(cfg)  # and what it would warn about
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dims = ParallelDims.from_config(cfg, world, device.type)
    t = cfg.training
    args, kernel = model_args(cfg, device, measure_auto=False)
    plans = dry_run_plans(cfg, args, dims, device, training=True)
    data = dry_run_data(cfg, dims.dp_degree)
    logger.info(
        "dry run: the resolved plan and config follow; nothing is trained\n"
        + plan_table(cfg, args, dims, kernel, None)
        + f"\n{data}"
        + f"\nFLOPs per token: {flops_per_token(args, t.seq_len, causal=False):.4g} "
        f"(causal-aware {flops_per_token(args, t.seq_len, causal=True):.4g})\n"
        + "\n".join(format_plan(plan, f"{label}, world {world}") for label, plan in plans)
        + "\n"
        + cfg.to_json()
    )


def dry_run_data(cfg: JobConfig, dp_world: int) -> str:
    """The data a dry run can check without writing: a dataset saved to disk is opened as a
    start opens it (split, column, data.source_datasets; and the validation split), since
    `datasets` maps it; a Hub id or parquet/arrow files are left to the real run, which
    converts them into `datasets`' cache."""
    src = resolve_source(cfg)
    if src.kind != "disk" or not Path(src.location).exists():
        what = "generates it" if src.kind == "disk" else "has `datasets` convert it"
        return f"data: {src.label} (not opened: the real run {what})"
    with quiet_datasets():
        units = build_dataloader(cfg, 0, dp_world).reader.units
        count = f"{units.num_units:,} {'rows' if units.kind == 'map' else 'shards'}"
        lines = [f"data: {src.label} [{cfg.data.split}], {count}"]
        if (v := cfg.validation).enable:
            held = HeldOut.open(cfg, v.split, "validation.split")
            n = held.windows_for(v.steps, v.max_tokens, dp_world, cfg.training.batch_size)
            every = f"every {v.freq:,} step{'s' * (v.freq != 1)}"
            lines.append(f"validation: {held.describe(n)} {every}")
    return "\n".join(lines)


def _train_or_plan(cfg: JobConfig) -> None:
    if cfg.job.dry_run:
        dry_run(cfg)
    else:
        setup_and_train(cfg)


def main(argv: list[str]) -> int:
    """`train.py`: train (or with --job.dry_run, plan) the run a recipe describes."""
    return run_command("train.py", argv, _train_or_plan)
