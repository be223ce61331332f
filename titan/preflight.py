"""Checks before heavy work: what a run will read exists and is of the right kind, and
where it will write can be written and has room, before any model is built or data prepared.

    run_on_rank0(check_run, cfg)    # build_run: rank 0 checks (only it touches the disk)
    check_dry_run(cfg)              # --job.dry_run: the same reads, nothing written

Each failure is a `ConfigError` (a `CheckpointError` for a step of another model): one
line naming the key, the value and the fix.

- `training.dataset` / `training.dataset_path`: a local path exists and is of the kind the
  dataset name says (`titan.data.sources.resolve_source`); a Hub id is not looked up here.
- `checkpoint.load_step`: the checkpoint folder holds that complete step (and checkpointing
  is on: a run without it resumes nothing); that step, or the newest a resume would load,
  holds this model's tensors (from its `.metadata`, no data file read); a folder of
  model-only exports alone has nothing to resume unless the run is over.
- `checkpoint.initial_load_path`, when no checkpoint will be resumed: a complete DCP
  directory whose settings and tensors fit the model (`titan.checkpoint.initial`).
- `job.dump_folder` and, with checkpointing on, the checkpoint folder: created if missing,
  writable (a probe file is written and deleted), and with room for one checkpoint, estimated
  from the parameter count. The dry run writes nothing: it refuses a folder that can
  certainly not be made, and only warns about space (it may not run where the job will).

These are training's checks; an evaluation checks what it reads and writes itself
(`titan.evaluate.planned`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from titan.checkpoint import storage
from titan.checkpoint.initial import plan_initial_load
from titan.checkpoint.resume import export_without_full_step, final_export, refuse_another_model
from titan.config import ConfigError, JobConfig
from titan.data.sources import resolve_source
from titan.files import cannot_write_in, inside_checkpoint, nearest_existing
from titan.logging import logger
from titan.memory import gib
from titan.models.llama import ModelArgs, build_model_args, num_params_from_args, param_shapes

ADAMW_BYTES_PER_PARAM = 4 + 4 + 4
"""A full checkpoint per parameter: the float32 weight and AdamW's two float32 moments."""


def check_run(cfg: JobConfig) -> None:
    """Everything, on rank 0 of a real training start (folders are created and probed)."""
    args = shape_args(cfg)
    check_inputs(cfg, args)
    check_outputs(cfg, args, write=True)


def check_dry_run(cfg: JobConfig) -> None:
    """What the dry run can check without writing anything."""
    args = shape_args(cfg)
    check_inputs(cfg, args)
    check_outputs(cfg, args, write=False)


def shape_args(cfg: JobConfig) -> ModelArgs:
    """The model's architecture from the recipe, without choosing an attention kernel:
    what the checks need (parameter shapes and count)."""
    return build_model_args(cfg.model.flavor, cfg.training.vocab_size, cfg.training.seq_len)


def checkpoint_folder(cfg: JobConfig) -> Path:
    return Path(cfg.job.dump_folder) / cfg.checkpoint.folder


# ----------------------------------------------------------------------------- inputs


def check_inputs(cfg: JobConfig, args: ModelArgs) -> None:
    """The dataset path, and the checkpoint the run will resume or start from."""
    resolve_source(cfg)
    c, folder = cfg.checkpoint, checkpoint_folder(cfg)
    if c.load_step >= 0 and not c.enable_checkpoint:
        raise ConfigError(
            f"checkpoint.load_step = {c.load_step} but checkpoint.enable_checkpoint is false, "
            "so nothing would be loaded; set --checkpoint.enable_checkpoint, or drop load_step"
        )
    steps = storage.list_steps(folder)
    full = [s for s in steps if s.complete and s.kind == storage.FULL]
    if c.enable_checkpoint and c.load_step >= 0:
        if (head := storage.branch_head(folder, c.load_step)) is not None:
            # rewound before: the run continues that branch (older steps may be gone)
            refuse_another_model(param_shapes(args), head.path)
            return
        if not folder.is_dir():
            raise ConfigError(
                f"checkpoint.load_step = {c.load_step}: there is no checkpoint folder {folder} "
                "to resume from; fix job.dump_folder or checkpoint.folder, or set "
                "checkpoint.load_step = -1 to start afresh"
            )
        if c.load_step not in [s.step for s in full]:
            have = ", ".join(str(s.step) for s in full) or "none"
            found = [s for s in steps if s.step == c.load_step and s.complete]
            if found:  # weights only (a model-only export, a conversion): nothing to resume
                kind = "model-only export" if found[0].kind == storage.MODEL_ONLY else "conversion"
                raise ConfigError(
                    f"checkpoint.load_step = {c.load_step}: {found[0].path} is a {kind} (weights "
                    "only: no optimizer state, schedule or data position to resume); start a new "
                    "run from it with checkpoint.initial_load_path, or load a full checkpoint "
                    f"(steps: {have})"
                )
            raise ConfigError(
                f"checkpoint.load_step = {c.load_step}: no complete checkpoint of that step in "
                f"{folder} (complete steps: {have}); choose one of them, or -1 for the newest"
            )
        refuse_another_model(param_shapes(args), storage.step_path(folder, c.load_step))
        return
    loadable = [s for s in steps if s.complete and s.kind in (storage.FULL, storage.MODEL_ONLY)]
    if not c.enable_checkpoint and loadable:  # a new run over one that saved: its records go
        raise ConfigError(
            f"job.dump_folder = {cfg.job.dump_folder!r} holds a run's checkpoints (newest "
            f"{loadable[-1].path.name}), which a start with checkpoint.enable_checkpoint = false "
            "would not resume, replacing that run's config.toml and metrics.jsonl; set "
            "--checkpoint.enable_checkpoint to resume it, or choose another job.dump_folder"
        )
    if c.enable_checkpoint and loadable:  # the newest: a resume (or a finished run's export)
        refuse_another_model(param_shapes(args), loadable[-1].path)
    # Only exports, and the run is not over: nothing a start could resume (a step without
    # its marker yet may be completed by the start, so any such step lets it try).
    exports_only = bool(steps) and all(s.complete and s.kind == storage.MODEL_ONLY for s in steps)
    if c.enable_checkpoint and exports_only and not final_export(folder, cfg.training.steps):
        raise ConfigError(str(export_without_full_step(folder)))
    resumes = c.enable_checkpoint and bool(full)  # then initial_load_path is not read
    if c.initial_load_path and not resumes:
        plan_initial_load(c.initial_load_path, args, c.initial_load_allow)


# ----------------------------------------------------------------------------- outputs


def check_outputs(cfg: JobConfig, args: ModelArgs, *, write: bool) -> None:
    """The dump folder and the checkpoint folder can be written, and the latter holds one
    checkpoint. With `write`, both are created and probed with a file; without, nothing is
    written and a lack of space is a warning."""
    dump = Path(cfg.job.dump_folder)
    _check_writable(dump, "job.dump_folder", cfg.job.dump_folder, write)
    if not cfg.checkpoint.enable_checkpoint:
        return
    folder = checkpoint_folder(cfg)
    _check_writable(folder, "checkpoint.folder", cfg.checkpoint.folder, write)
    need, what = checkpoint_bytes(cfg, args)
    free = shutil.disk_usage(nearest_existing(folder)).free
    if free < need:
        message = (
            f"job.dump_folder = {cfg.job.dump_folder!r}: the checkpoint folder {folder} has "
            f"{gib(free)} free but one checkpoint needs about {gib(need)} ({what}); free space "
            "there, or set job.dump_folder to a larger filesystem"
        )
        if write:
            raise ConfigError(message)
        logger.warning(f"{message} (a real start refuses this)")


def checkpoint_bytes(cfg: JobConfig, args: ModelArgs) -> tuple[int, str]:
    """(bytes of the largest save the run makes, what they are): a full checkpoint, or only
    the model-only export when `model_weights_only` and no save comes before the last step."""
    c, n = cfg.checkpoint, num_params_from_args(args)
    export_only = c.model_weights_only and (
        c.interval_type == "steps" and c.interval >= cfg.training.steps
    )
    if export_only:
        size = getattr(torch, c.export_dtype).itemsize
        return n * size, f"a model-only export of {n:,} parameters in {c.export_dtype}"
    return n * ADAMW_BYTES_PER_PARAM, f"{n:,} float32 parameters and their two AdamW moments"


def _check_writable(folder: Path, key: str, value: str, write: bool) -> None:
    """Create `folder` and write and delete a probe file in it (`write`), or only check
    what can be known without writing."""
    fix = f"set {key} to a folder you can write to"
    if inside := inside_checkpoint(folder / "config.toml"):  # the folder itself, or above
        raise ConfigError(f"{key} = {value!r}: {folder} {inside}; set {key} to a folder outside it")
    existing = nearest_existing(folder)
    if not existing.is_dir():
        where = "it is a file" if existing == folder.absolute() else f"{existing} is a file"
        raise ConfigError(f"{key} = {value!r}: cannot make the folder {folder}: {where}; {fix}")
    if not write:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{key} = {value!r}: {existing} is not writable; {fix}")
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ConfigError(f"{key} = {value!r}: cannot make {folder} ({why}); {fix}") from None
    if why := cannot_write_in(folder):
        raise ConfigError(f"{key} = {value!r}: cannot write to {folder} ({why}); {fix}")
