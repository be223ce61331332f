"""Saving and resuming a training run with Distributed Checkpoint (DCP).

Keys of a full step directory (see `titan.checkpoint.storage` for the layout on disk):

    model.<Meta parameter name>      model weights (plain names: no FSDP/compile/AC prefixes)
    optimizer.*                      AdamW state, sharded like the model
    lr_scheduler.*, train_state.*    LR schedule; step, tokens seen, layout it was saved with
    dataloader.dp_rank_<r>           each data-parallel rank's loader position (pickled)
    rng.rank_<r>                     each rank's RNG states (pickled)

DCP reshards model and optimizer on load, so a run may resume on another world size; the
loader positions of all old ranks are then handed to the loader to reshard.
"""

from __future__ import annotations

import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from titan.checkpoint import storage
from titan.checkpoint.initial import load_initial
from titan.checkpoint.states import (
    ModelState,
    OptimizerState,
    TrainState,
    rng_state,
    set_rng_state,
)
from titan.config import ConfigError, JobConfig
from titan.logging import logger


class CheckpointError(RuntimeError):
    """A checkpoint on disk cannot be used; the message is one line."""


class Checkpointer:
    """Saves and restores the state that defines a training run: model, optimizer, LR
    schedule, progress counters, and (when given) the data loader's position."""

    def __init__(
        self,
        cfg: JobConfig,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        train_state: TrainState,
        dataloader: Any | None,
        dp_rank: int,
    ) -> None:
        c = cfg.checkpoint
        self.cfg = c
        self.enabled = c.enable_checkpoint
        self.folder = Path(cfg.job.dump_folder) / c.folder
        self.total_steps = cfg.training.steps
        self.model, self.dataloader, self.train_state = model, dataloader, train_state
        self.states: dict[str, Any] = {
            "model": ModelState(model),
            "optimizer": OptimizerState(model, optimizer),
            "lr_scheduler": lr_scheduler,
        }
        self.rank = dist.get_rank()
        self.dp_rank = dp_rank
        self._pending: tuple[int, Any] | None = None  # (step, future) of the save in flight
        self._last_save_time = time.monotonic()
        self._pg = None
        if self.enabled and c.async_mode != "disabled":
            # A background save runs collectives (gathering the save plan, writing metadata)
            # while training runs FSDP's. Two threads issuing collectives on one gloo group
            # interleave their messages and abort the job, so saves get their own group.
            self._pg = dist.new_group(backend="gloo")
        if self.enabled and self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ saving

    def _save_dict(self) -> dict[str, Any]:
        state = {
            **self.states,
            "train_state": self.train_state,
            "rng": {f"rank_{self.rank}": pickle.dumps(rng_state())},
        }
        if self.dataloader is not None:
            loader_state = pickle.dumps(self.dataloader.state_dict())
            state["dataloader"] = {f"dp_rank_{self.dp_rank}": loader_state}
        return state

    def _due(self, step: int) -> bool:
        if self.cfg.interval_type == "steps":
            return step % self.cfg.interval == 0
        # Seconds: rank 0's clock decides, so every rank saves at the same step.
        due = torch.tensor(
            [time.monotonic() - self._last_save_time >= self.cfg.interval], dtype=torch.int32
        )
        dist.broadcast(due, src=0)
        return bool(due.item())

    def maybe_save(self, step: int, force: bool = False) -> None:
        """Save at the configured interval, and always at the last step."""
        if not self.enabled:
            return
        last = step == self.total_steps
        if not (force or last or self._due(step)):
            self.poll()
            return
        self.wait()  # at most one save in flight
        step_dir = storage.step_path(self.folder, step)
        if self.rank == 0 and step_dir.exists():  # an older attempt's leftovers
            shutil.rmtree(step_dir)
        dist.barrier()
        begin = time.perf_counter()
        if last and self.cfg.model_weights_only:
            self._save_export(step, step_dir)
        elif self.cfg.async_mode == "disabled" or last:
            dcp.save(self._save_dict(), checkpoint_id=str(step_dir))
            self._finish(step, storage.FULL)
        else:
            pinned = self.cfg.async_mode == "async_with_pinned_mem"
            kwargs: dict[str, Any] = {}
            if pinned:
                from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

                cuda = torch.cuda.is_available()
                kwargs["async_checkpointer_type"] = AsyncCheckpointerType.PROCESS
                kwargs["async_stager"] = DefaultStager(StagingOptions(cuda, True, False, cuda))
            future = dcp.async_save(
                self._save_dict(), checkpoint_id=str(step_dir), process_group=self._pg, **kwargs
            )
            self._pending = (step, getattr(future, "upload_completion", future))
        self._last_save_time = time.monotonic()
        logger.info(
            f"Checkpoint step-{step}: {'saved' if self._pending is None else 'save started'} "
            f"in {time.perf_counter() - begin:.2f}s (training blocked that long)"
        )

    def _save_export(self, step: int, step_dir: Path) -> None:
        dtype = getattr(torch, self.cfg.export_dtype)
        weights = {k: v.to(dtype) for k, v in get_model_state_dict(self.model).items()}
        dcp.save({"model": weights}, checkpoint_id=str(step_dir))
        self._finish(step, storage.MODEL_ONLY)
        logger.info(f"Exported model weights ({self.cfg.export_dtype}) to {step_dir}")

    def _finish(self, step: int, kind: str) -> None:
        """Mark a written step complete (rank 0) and apply the retention limit."""
        if self.rank == 0:
            storage.write_marker(storage.step_path(self.folder, step), {"step": step, "kind": kind})
            for path in storage.purge(self.folder, self.cfg.keep_latest_k):
                logger.info(
                    f"Removed old checkpoint {path.name} (keep_latest_k = {self.cfg.keep_latest_k})"
                )

    def poll(self) -> None:
        """Finish an async save that has completed, without blocking."""
        if self._pending is not None and self._pending[1].done():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk and marked complete. On rank
        0 its future completes only after every rank's data and the metadata are written."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        future.result()
        self._finish(step, storage.FULL)
        logger.info(f"Checkpoint step-{step} complete")

    def close(self, failed: bool = False) -> None:
        """Finish the save in flight and release the save group. After a failure the run
        is going down anyway: a save that fails too is reported, not raised, and leaves no
        marker (so it is never loaded)."""
        try:
            self.wait()
        except Exception as e:  # noqa: BLE001 - reported; the run's own error matters more
            if not failed:
                raise
            logger.warning(f"The checkpoint save in flight failed too ({e}); it has no marker")
        finally:
            if self._pg is not None:
                dist.destroy_process_group(self._pg)
                self._pg = None

    # ------------------------------------------------------------------ loading

    def _resume_candidates(self) -> list[storage.StepDir]:
        """Complete full checkpoints, newest first (or just `load_step`)."""
        steps = [s for s in storage.list_steps(self.folder) if s.kind == storage.FULL]
        if self.cfg.load_step >= 0:
            chosen = [s for s in steps if s.step == self.cfg.load_step]
            if not chosen:
                have = ", ".join(str(s.step) for s in steps) or "none"
                raise ConfigError(
                    f"checkpoint.load_step = {self.cfg.load_step}: no complete checkpoint of that "
                    f"step in {self.folder} (complete steps: {have})"
                )
            return chosen
        return steps[::-1]

    def _remove_incomplete(self) -> None:
        if self.rank == 0:
            for path in storage.remove_incomplete(self.folder):
                logger.warning(f"Removing incomplete checkpoint {path} (its save was cut short)")
        dist.barrier()

    def load(self) -> bool:
        """Resume from the newest complete checkpoint, or initialize the model from
        `initial_load_path`; returns True when a run was resumed."""
        if self.enabled:
            self._remove_incomplete()
            for candidate in self._resume_candidates():
                problem = storage.verify(candidate.path)
                if problem is None:
                    self._load_full(candidate.path)
                    return True
                message = f"checkpoint {candidate.path} is corrupted: {problem}"
                if not self.cfg.fallback_on_corruption or self.cfg.load_step >= 0:
                    raise CheckpointError(
                        f"{message}; delete it, or set --checkpoint.fallback_on_corruption "
                        "to resume from the previous complete checkpoint"
                    )
                logger.warning(f"{message}; falling back to the previous checkpoint")
        if self.cfg.initial_load_path:
            self._load_initial(Path(self.cfg.initial_load_path))
        return False

    def _load_full(self, path: Path) -> None:
        """Everything in one `dcp.load`: what the saved run's layout was (its data-parallel
        degree and world size) is read from the metadata's keys first."""
        begin = time.perf_counter()
        exclude = set(self.cfg.exclude_from_loading)
        keys = storage.checkpoint_keys(path)
        saved_dp = sum(k.startswith("dataloader.dp_rank_") for k in keys)
        saved_world = sum(k.startswith("rng.rank_") for k in keys)
        request: dict[str, Any] = {k: v for k, v in self.states.items() if k not in exclude}
        progress = {k: torch.tensor(0) for k in ("step", "tokens_seen")}
        request["train_state"] = progress
        load_data = self.dataloader is not None and "dataloader" not in exclude
        if load_data:
            ranks = [self.dp_rank] if saved_dp == self.train_state.dp_degree else range(saved_dp)
            request["dataloader"] = {f"dp_rank_{r}": b"" for r in ranks}
        same_world = saved_world == self.train_state.world_size
        if same_world:
            request["rng"] = {f"rank_{self.rank}": b""}
        dcp.load(request, checkpoint_id=str(path))
        step, tokens = int(progress["step"]), int(progress["tokens_seen"])
        if "train_state" not in exclude:
            self.train_state.step, self.train_state.tokens_seen = step, tokens
        if load_data:
            states = [pickle.loads(v) for v in request["dataloader"].values()]
            if saved_dp == self.train_state.dp_degree:
                self.dataloader.load_state_dict(states[0])
            else:
                self.dataloader.load_state_dict({"resharded_from": states})
                logger.info(
                    f"Data-parallel degree changed ({saved_dp} -> {self.train_state.dp_degree}): "
                    "data resharded"
                )
        if same_world:
            set_rng_state(pickle.loads(request["rng"][f"rank_{self.rank}"]))
        else:
            logger.info(
                f"World size changed ({saved_world} -> {self.train_state.world_size}): "
                "RNG states start fresh; model and optimizer were resharded"
            )
        logger.info(
            f"Resumed from {path} at step {step} ({tokens:,} tokens seen) in "
            f"{time.perf_counter() - begin:.2f}s"
            + (f"; not loaded: {', '.join(sorted(exclude))}" if exclude else "")
        )

    def newest_weights(self) -> Path:
        """The step directory evaluation reads by default: `load_step`, else the newest
        complete step with model weights (a full save or a model-only export)."""
        steps = [s for s in storage.list_steps(self.folder) if s.complete]
        if self.cfg.load_step >= 0:
            steps = [s for s in steps if s.step == self.cfg.load_step]
            if not steps:
                raise ConfigError(
                    f"checkpoint.load_step = {self.cfg.load_step}: no complete checkpoint of "
                    f"that step in {self.folder}"
                )
        steps = [s for s in steps if s.kind in (storage.FULL, storage.MODEL_ONLY)]
        if not steps:
            raise ConfigError(
                f"no complete checkpoint in {self.folder}; train first, or name one with "
                "--eval.checkpoint PATH"
            )
        return steps[-1].path

    def load_weights(self, path: Path) -> None:
        """Every model weight from a DCP directory (a training step, a model-only export or
        a conversion), and nothing else: the optimizer's state is never read."""
        if not (path / ".metadata").is_file():
            raise ConfigError(f"{path}: not a DCP checkpoint directory (no .metadata)")
        problem = storage.verify(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is corrupted: {problem}")
        saved = storage.checkpoint_keys(path)
        weights = get_model_state_dict(self.model)
        for name, tensor in weights.items():
            meta = saved.get(f"model.{name}")
            if meta is None or tuple(getattr(meta, "size", ())) != tuple(tensor.shape):
                found = "absent" if meta is None else f"shape {tuple(meta.size)}"
                raise CheckpointError(
                    f"{path}: model.{name} is {found}, but this model needs "
                    f"{tuple(tensor.shape)}; check model.flavor and training.vocab_size"
                )
        dcp.load({"model": weights}, checkpoint_id=str(path))
        set_model_state_dict(self.model, weights)
        logger.info(f"Loaded the model weights of {path}")

    def _load_initial(self, path: Path) -> None:
        """Model weights only, checked against the model (`titan.checkpoint.initial`)."""
        load_initial(self.model, str(path), self.cfg.initial_load_allow)
