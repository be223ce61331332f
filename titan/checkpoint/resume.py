"""Loading what `Checkpointer` saved: resuming a run, and the model weights alone.

Before anything is loaded, a step directory is checked: the files `.metadata` names are
there and long enough, every file matches the checksum its marker recorded (the ranks
share the reading), and the model tensors it holds have this model's names and shapes.
Then one `dcp.load` reads model, optimizer, schedule, counters, loader positions and RNG
states, and the loaded weights and optimizer state must be finite. A damaged or
non-finite step stops the run with one line, or with `checkpoint.fallback_on_corruption`
the previous complete step is tried; a step saved by another model is refused outright.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from titan.checkpoint import storage
from titan.checkpoint.errors import CheckpointError
from titan.checkpoint.states import set_rng_state
from titan.config import ConfigError
from titan.logging import logger

if TYPE_CHECKING:
    from titan.checkpoint.manager import Checkpointer


def candidates(ckpt: Checkpointer) -> list[storage.StepDir]:
    """Complete full checkpoints, newest first (or just `load_step`); a step whose marker
    is damaged is one of them, to be refused by `check`."""
    steps = [
        s for s in storage.list_steps(ckpt.folder)
        if s.kind == storage.FULL or s.kind not in storage.KINDS
    ]  # fmt: skip
    if ckpt.cfg.load_step >= 0:
        chosen = [s for s in steps if s.step == ckpt.cfg.load_step]
        if not chosen:
            have = ", ".join(str(s.step) for s in steps) or "none"
            raise ConfigError(
                f"checkpoint.load_step = {ckpt.cfg.load_step}: no complete checkpoint of that "
                f"step in {ckpt.folder} (complete steps: {have})"
            )
        return chosen
    return steps[::-1]


def resume(ckpt: Checkpointer, branch: bool) -> bool:
    """Load the newest usable step; False when there is none to resume from. With `branch`,
    resuming an older `load_step` starts a branch: once it has loaded, the newer steps
    are set aside (unless they are that branch's own, from an earlier start)."""
    rewind = branch and ckpt.cfg.load_step >= 0
    if rewind and (continued := storage.branch_head(ckpt.folder, ckpt.cfg.load_step)):
        logger.info(
            f"checkpoint.load_step = {ckpt.cfg.load_step}: this run already continued from "
            f"step-{ckpt.cfg.load_step}, and {continued.path.name} is on that branch: resuming "
            "it (to rewind again, move the newer steps out of the checkpoint folder)"
        )
        _load_first_usable(ckpt, [continued], fallback=False)
        return True
    if not rewind and (final := final_export(ckpt.folder, ckpt.total_steps)) is not None:
        # before config.toml is written (no data read)
        refuse_another_model(model_shapes(ckpt.model), final.path)
        ckpt.train_state.step = final.step
        logger.info(
            f"{final.path} is this run's final model-only export (step {final.step} of "
            f"{ckpt.total_steps}): the run is finished, nothing is loaded"
        )
        return True
    steps = candidates(ckpt)
    if not steps:
        if problem := export_without_full_step(ckpt.folder):
            raise ConfigError(problem)
        return False
    _load_first_usable(ckpt, steps, fallback=ckpt.cfg.fallback_on_corruption and not rewind)
    if rewind:
        _set_aside_newer(ckpt, ckpt.cfg.load_step)
        ckpt.branch_from = ckpt.cfg.load_step
    else:
        _move_newer_exports(ckpt)
    return True


def _move_newer_exports(ckpt: Checkpointer) -> None:
    """A longer run after a final model-only export resumes the full step before it: the
    export moves into `replaced/` (kept, but no longer a step that retention counts or a
    load_step names), and the log says which steps are trained again."""
    loaded = ckpt.train_state.step
    if ckpt.rank == 0:
        for export in storage.list_steps(ckpt.folder):
            if export.kind == storage.MODEL_ONLY and export.step > loaded:
                aside = storage.move_aside(export.path, "replaced")
                logger.warning(
                    f"{export.path} is a model-only export, which cannot be resumed: resumed "
                    f"step-{loaded} instead, so steps {loaded + 1}-{export.step} are trained "
                    f"again; moved the export to {aside}"
                )
    dist.barrier()


def export_without_full_step(folder: Path) -> str | None:
    """The refusal for a folder whose only loadable steps are model-only exports, when the
    run is not over: a fresh start there would redo the run over its metrics and export."""
    exports = [s for s in storage.list_steps(folder) if s.kind == storage.MODEL_ONLY]
    if not exports:
        return None
    return (
        f"{folder} holds the model-only export {exports[-1].path} but no full checkpoint to "
        "resume from; to train on from its weights, start a new run with "
        "checkpoint.initial_load_path = that step and another job.dump_folder"
    )


def train_on_advice(folder: Path, total_steps: int) -> str:
    """How to train a finished run on: a larger --training.steps, which after a final
    model-only export (never resumed) resumes the last full step before it."""
    final = final_export(folder, total_steps)
    if final is None:
        return "pass a larger --training.steps"
    full = [s for s in storage.list_steps(folder) if s.kind == storage.FULL and s.step < final.step]
    if not full:
        return (
            f"start a new run with checkpoint.initial_load_path = {final.path} and another "
            "job.dump_folder, as an export cannot be resumed"
        )
    return (
        f"a larger --training.steps resumes the last full checkpoint, {full[-1].path.name}, and "
        f"trains steps {full[-1].step + 1}-{final.step} again, as an export cannot be resumed"
    )


def final_export(folder: Path, total_steps: int) -> storage.StepDir | None:
    """The newest complete step when it is a model-only export of the run's last step
    (`model_weights_only`): the run is over, and resuming an older full step would redo it."""
    complete = [s for s in storage.list_steps(folder) if s.complete]
    newest = complete[-1] if complete else None
    if newest and newest.kind == storage.MODEL_ONLY and newest.step >= total_steps:
        return newest
    return None


def _load_first_usable(ckpt: Checkpointer, steps: list[storage.StepDir], fallback: bool) -> None:
    """Load the first of `steps` that is intact; with `fallback`, a damaged one is moved
    into `<folder>/damaged/` (kept, never loaded or counted again) and the next is tried."""
    problems = []
    for candidate in steps:
        problem = check(ckpt, candidate.path) or load_full(ckpt, candidate.path)
        if problem is None:
            ckpt.branch_from = storage.read_marker(candidate.path).get("branch_from")
            return
        message = f"checkpoint {candidate.path} is corrupted: {problem}"
        if not fallback:
            fix = (
                "choose another --checkpoint.load_step"
                if ckpt.cfg.load_step >= 0
                else "delete it, or set --checkpoint.fallback_on_corruption to resume from "
                "the previous complete checkpoint"
            )
            raise CheckpointError(f"{message}; {fix}")
        aside = None
        if ckpt.rank == 0:
            aside = storage.move_aside(candidate.path, "damaged")
        dist.barrier()
        logger.warning(
            f"{message}; falling back to the previous checkpoint"
            + (f" (moved it to {aside})" if aside is not None else "")
        )
        problems.append(f"{candidate.path.name}: {problem}")
    raise CheckpointError(
        f"no complete checkpoint in {ckpt.folder} can be loaded ({'; '.join(problems)}, "
        f"moved into {ckpt.folder / 'damaged'}); start afresh, or restore one"
    )


def _set_aside_newer(ckpt: Checkpointer, step: int, why: str | None = None) -> None:
    """The loaded older step starts a new branch: the newer steps move aside, so a later
    plain resume continues this branch, not the abandoned one."""
    if ckpt.rank == 0:
        moved = storage.set_aside_newer(ckpt.folder, step)
        if moved is not None:
            folder, names = moved
            ckpt.set_aside = folder
            logger.warning(
                f"{why or f'Resuming step-{step} starts a new branch'}: set aside "
                f"{', '.join(names)} into {folder} (move them back to return to that branch)"
            )
    dist.barrier()


def _gathered_problem(mine: str | None) -> str | None:
    """The first problem any rank found (one all-gather)."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return next((p for p in everyone if p is not None), None)


def integrity_problem(path: Path, prefix: str = "") -> str | None:
    """Marker, files, sizes and checksums of a complete DCP directory (only the files that
    hold keys starting with `prefix`, e.g. "model." to read no optimizer state), the
    reading shared by the ranks when a process group is up; the first problem any rank
    found, or None (the same answer on every rank)."""
    group = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if group else (0, 1)
    needed, problem = storage.data_files(path, prefix)
    problem = storage.marker_problem(path) or problem or storage.size_problem(path, needed)
    if problem is None:
        files = {".metadata", *needed}
        recorded = sorted(set(storage.recorded_checksums(path)) & files)
        problem = storage.verify_checksums(path, recorded[rank::world])
    return _gathered_problem(problem) if group else problem


def model_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter name -> full (unsharded) shape of a built model."""
    return {name: tuple(t.shape) for name, t in get_model_state_dict(model).items()}


def refuse_another_model(shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """CheckpointError when the run's step holds another model than `shapes` (no other step
    would do better), judged from its small files alone."""
    mismatch = storage.shape_mismatch(shapes, path)
    if mismatch is not None:
        raise CheckpointError(
            f"checkpoint {path} was saved by another model: {mismatch} (model.flavor or "
            "training.vocab_size changed?); resume with the run's own settings (its "
            "config.toml), or start a new job.dump_folder"
        )


def refuse_other_weights(shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """CheckpointError when the weights to load (an evaluation's) are not of the model
    `shapes` describes, judged from small files alone."""
    mismatch = storage.shape_mismatch(shapes, path)
    if mismatch is not None:
        raise CheckpointError(f"{path}: {mismatch}; check model.flavor and training.vocab_size")


def check(ckpt: Checkpointer, path: Path) -> str | None:
    """The integrity problem of a step directory in a few words, or None; CheckpointError
    when the step holds another model."""
    refuse_another_model(model_shapes(ckpt.model), path)
    return integrity_problem(path)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly distributed) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _not_finite(ckpt: Checkpointer) -> str | None:
    """The first loaded weight or optimizer state on this rank that is not finite."""
    for name, param in ckpt.model.named_parameters():
        if not torch.isfinite(_local(param.detach())).all():
            return f"model weight {name} is not finite"
    for state in ckpt.states["optimizer"].optimizer.state.values():
        for key, value in state.items():
            value = _local(value)
            if value.is_floating_point() and value.numel() and not torch.isfinite(value).all():
                return f"optimizer state {key} is not finite"
    return None


def load_full(ckpt: Checkpointer, path: Path) -> str | None:
    """Everything in one `dcp.load`; what the saved run's layout was is read from the
    metadata's keys first. A problem found in the loaded data, or None."""
    begin = time.perf_counter()
    state = ckpt.train_state
    exclude = set(ckpt.cfg.exclude_from_loading)
    applied = set(storage.read_marker(path).get("exclusions_applied", []))
    if exclude and exclude <= applied:
        # This line of saves began by loading without them: a restart or requeue of the
        # same command resumes its own state whole (else each would reset them again).
        logger.info(
            f"checkpoint.exclude_from_loading = {sorted(exclude)} was applied when this run's "
            f"line of saves began; {path.name} is loaded whole"
        )
        exclude = set()
    ckpt.exclusions_applied = sorted(exclude | applied)
    keys = storage.checkpoint_keys(path)
    saved_dp = sum(k.startswith("dataloader.dp_rank_") for k in keys)
    saved_world = sum(k.startswith("rng.rank_") for k in keys)
    request: dict[str, Any] = {k: v for k, v in ckpt.states.items() if k not in exclude}
    counters = {k: torch.tensor(0) for k in state.state_dict() if f"train_state.{k}" in keys}
    request["train_state"] = counters
    load_data = ckpt.dataloader is not None and "dataloader" not in exclude
    if load_data:
        ranks = [ckpt.dp_rank] if saved_dp == state.dp_degree else range(saved_dp)
        request["dataloader"] = {f"dp_rank_{r}": b"" for r in ranks}
    same_world = saved_world == state.world_size
    if same_world:
        request["rng"] = {f"rank_{ckpt.rank}": b""}
    optimizer = ckpt.states["optimizer"].optimizer
    recipe = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    dcp.load(request, checkpoint_id=str(path))
    saved = {k: int(v) for k, v in counters.items()}
    try:
        loader_states = [pickle.loads(v) for v in request.get("dataloader", {}).values()]
        rng = pickle.loads(request["rng"][f"rank_{ckpt.rank}"]) if same_world else None
        mine = _not_finite(ckpt)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        mine = f"a saved data loader or RNG state is unreadable ({e})"
    problem = _gathered_problem(mine)  # every rank meets this one gather
    if problem is not None:
        return problem
    if "train_state" not in exclude:
        state.step, state.tokens_seen = saved["step"], saved["tokens_seen"]
    else:  # counting starts again: the old line's steps would be newer than the new saves
        _set_aside_newer(ckpt, state.step, "Leaving out train_state starts the count at 0")
    _recipe_settings(optimizer, ckpt.states["lr_scheduler"], recipe)
    asked = set(ckpt.cfg.exclude_from_loading)
    if load_data and "dataloader" in asked - exclude:  # applied when this line began...
        fingerprint = ckpt.dataloader.reader.fingerprint
        if any(s.get("fingerprint") != fingerprint for s in loader_states):
            # ...but the data changed again since: a second change of the same kind
            load_data = False
            exclude.add("dataloader")
            logger.info(
                "The data changed since this run's line of saves began (the saved position "
                "is for other data): checkpoint.exclude_from_loading = ['dataloader'] applies "
                "again; the data starts from the beginning"
            )
    if load_data:
        if saved_dp == state.dp_degree:
            ckpt.dataloader.load_state_dict(loader_states[0])
        else:
            ckpt.dataloader.load_state_dict({"resharded_from": loader_states})
    if rng is not None:
        set_rng_state(rng)
    _log_layout_change(saved, state, saved_world)
    logger.info(
        f"Resumed from {path} at step {state.step} ({state.tokens_seen:,} tokens seen) in "
        f"{time.perf_counter() - begin:.2f}s"
        + (f"; not loaded: {', '.join(sorted(exclude))}" if exclude else "")
    )
    return None


def _recipe_settings(optimizer: Any, scheduler: Any, recipe: list[dict[str, Any]]) -> None:
    """Give the optimizer the recipe's settings (`recipe`: its groups as built, before the
    load) over the saved ones, and the next step the recipe's schedule at the saved step:
    the moments and the step count are the checkpoint's, the hyperparameters are the
    command's (a rerun after a divergence lowers optimizer.lr; a GPU run's fused AdamW is
    resumed on CPU). Logged when they differ from what was saved."""
    changes = {}
    for group, wanted in zip(optimizer.param_groups, recipe, strict=True):
        for key, value in wanted.items():
            if key not in ("lr", "initial_lr") and group.get(key) != value:
                changes.setdefault(key, (group.get(key), value))
                group[key] = value
    peaks = [g["initial_lr"] for g in recipe]  # LambdaLR's base rates, as built
    if scheduler.base_lrs != peaks:
        changes["lr (peak)"] = (max(scheduler.base_lrs), max(peaks))
    scheduler.base_lrs = peaks
    # the rate of the next step: the schedule's at the saved step (closed form, as
    # LambdaLR.step computes it; the optimizer's saved rate is the old schedule's)
    rates = [
        base * f(scheduler.last_epoch) for base, f in zip(peaks, scheduler.lr_lambdas, strict=True)
    ]
    for group, base, rate in zip(optimizer.param_groups, peaks, rates, strict=True):
        group["initial_lr"], group["lr"] = base, rate
    scheduler._last_lr = rates
    if changes:
        said = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())
        logger.info(f"Optimizer settings from this command, not the checkpoint: {said}")


def _log_layout_change(saved: dict[str, int], state: Any, saved_world: int) -> None:
    """One WARNING line when the resumed run steps differently from the saved one."""
    changes = []
    if saved.get("global_batch", state.global_batch) != state.global_batch:
        changes.append(f"global batch {saved['global_batch']} -> {state.global_batch} sequences")
    if saved.get("seq_len", state.seq_len) != state.seq_len:
        changes.append(f"seq_len {saved['seq_len']} -> {state.seq_len}")
    if saved_world != state.world_size:
        changes.append(
            f"world size {saved_world} -> {state.world_size} (model, optimizer and data "
            "resharded; RNG states start fresh)"
        )
    if changes:
        logger.warning(f"Resuming with another layout: {', '.join(changes)}")


def newest_weights(folder: Path, load_step: int) -> Path:
    """The step directory of checkpoint folder `folder` that evaluation reads by default:
    `load_step` (when >= 0), else the newest complete step with model weights (a full save
    or a model-only export)."""
    steps = [
        s
        for s in storage.list_steps(folder)
        if s.complete and s.kind in (storage.FULL, storage.MODEL_ONLY)
    ]
    if load_step >= 0:
        if chosen := [s.path for s in steps if s.step == load_step]:
            return chosen[0]
        have = ", ".join(str(s.step) for s in steps) or "none"
        raise ConfigError(
            f"checkpoint.load_step = {load_step}: no complete checkpoint of that step in "
            f"{folder} (complete steps: {have}); choose one of them, or -1 for the newest"
        )
    if not steps:
        raise ConfigError(
            f"no complete checkpoint in {folder}; train first, or name one with "
            "--eval.checkpoint PATH"
        )
    return steps[-1].path


def load_weights(ckpt: Checkpointer, path: Path) -> None:
    """Every model weight from a DCP directory (a training step, a model-only export or
    a conversion), and nothing else: the optimizer's state is never read."""
    if not (path / ".metadata").is_file():
        raise ConfigError(f"{path}: not a DCP checkpoint directory (no .metadata)")
    refuse_other_weights(model_shapes(ckpt.model), path)
    problem = integrity_problem(path, "model.")
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is corrupted: {problem}")
    dcp.load({"model": ckpt.states["model"]}, checkpoint_id=str(path))
    logger.info(f"Loaded the model weights of {path}")
