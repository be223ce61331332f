"""Saving and resuming a training run with Distributed Checkpoint (DCP).

Keys of a full step directory (see `titan.checkpoint.storage` for the layout on disk):

    model.<Meta parameter name>      model weights (plain names: no FSDP/compile/AC prefixes)
    optimizer.*                      AdamW state, sharded like the model
    lr_scheduler.*, train_state.*    LR schedule; step, tokens seen, the layout it was saved with
    dataloader.dp_rank_<r>           each data-parallel rank's loader position (pickled)
    rng.rank_<r>                     each rank's RNG states (pickled)

A save ends when every rank has checksummed the files it wrote and rank 0 has written the
marker with all the checksums; an async save does that in its background thread as soon
as the data is on disk. Loading is in `titan.checkpoint.resume`.
"""

from __future__ import annotations

import errno
import pickle
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from titan.checkpoint import resume, storage
from titan.checkpoint.errors import CheckpointError, CheckpointSaveError
from titan.checkpoint.initial import load_initial
from titan.checkpoint.states import ModelState, OptimizerState, TrainState, rng_state
from titan.config import JobConfig
from titan.distributed import ParallelDims, timeout_for
from titan.logging import logger


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
        dims: ParallelDims,
    ) -> None:
        c = cfg.checkpoint
        self.dims, self._timeouts = dims, (cfg.job.init_timeout_s, cfg.job.collective_timeout_s)
        self.cfg = c
        self.enabled = c.enable_checkpoint
        self.folder = Path(cfg.job.dump_folder) / c.folder
        self.total_steps = cfg.training.steps
        self.model, self.dataloader, self.train_state = model, dataloader, train_state
        self._device = next(model.parameters()).device
        self.states: dict[str, Any] = {
            "model": ModelState(model),
            "optimizer": OptimizerState(model, optimizer),
            "lr_scheduler": lr_scheduler,
        }
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dp_rank = dp_rank
        self._pending: tuple[int, threading.Event] | None = None  # the save in flight
        self._saved_step: int | None = None  # the last step saved or being saved
        self.exclusions_applied: list[str] = []
        """States a resume of this line of saves left out (`exclude_from_loading`),
        recorded in every marker it writes so that they are left out only once."""
        self.branch_from: int | None = None
        """The step this run's line of saves was rewound to with load_step (recorded in
        every marker it writes, so running the same command again does not rewind twice)."""
        self.set_aside: Path | None = None
        """Where this start moved an abandoned branch's steps (rank 0; None if it did
        not): the metrics records of those steps are kept there too."""
        self._async_error: BaseException | None = None
        self._last_save_time = time.monotonic()
        self._pg = None
        if self.enabled and c.async_mode != "disabled":
            # A background save runs collectives (gathering the save plan, writing metadata)
            # while training runs FSDP's. Two threads issuing collectives on one gloo group
            # interleave their messages and abort the job, so saves get their own group.
            self._pg = dist.new_group(backend="gloo")

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
        # Seconds: rank 0's clock decides, so every rank saves at the same step. (On the
        # model's device: the default group of a GPU run is NCCL, which has no CPU tensors.)
        due = torch.tensor(
            [time.monotonic() - self._last_save_time >= self.cfg.interval],
            dtype=torch.int32,
            device=self._device,
        )
        dist.broadcast(due, src=0)
        return bool(due.item())

    def maybe_save(self, step: int) -> None:
        """Save at the configured interval, and always at the last step."""
        if not self.enabled:
            return
        if step == self.total_steps or self._due(step):
            self.save(step)
        else:
            self.poll()

    def save(self, step: int, sync: bool = False) -> None:
        """Save `step` now: the last step's save (a model-only export with
        `model_weights_only`) and `sync` saves block until complete; others follow
        `async_mode`. A step already saved (or in flight) is not written again: `sync` waits
        for it. CheckpointSaveError (one line) when it fails. Its collectives may take
        job.init_timeout_s, then the training loop's job.collective_timeout_s holds."""
        with timeout_for(*self._timeouts, self.dims):
            if step == self._saved_step:
                if sync:
                    self.wait()
                return
            self._save(step, sync)

    def _save(self, step: int, sync: bool) -> None:
        self.wait()  # at most one save in flight
        step_dir = storage.step_path(self.folder, step)
        if self.rank == 0 and step_dir.exists():  # an older attempt's leftovers: keep them
            aside = storage.move_aside(step_dir, "replaced")
            logger.info(f"{step_dir} was already there: moved it to {aside} before saving")
        dist.barrier()
        begin = time.perf_counter()
        last = step == self.total_steps
        try:
            if last and self.cfg.model_weights_only:
                dtype = getattr(torch, self.cfg.export_dtype)
                weights = {k: v.to(dtype) for k, v in get_model_state_dict(self.model).items()}
                dcp.save({"model": weights}, checkpoint_id=str(step_dir))
                self._finish(step, storage.MODEL_ONLY, None)
            elif self.cfg.async_mode == "disabled" or last or sync:
                dcp.save(self._save_dict(), checkpoint_id=str(step_dir))
                self._finish(step, storage.FULL, None)
            else:
                self._start_async(step, step_dir)
            self._saved_step = step
        except CheckpointSaveError:
            raise
        except (Exception, CheckpointException) as e:  # DCP's wraps the writers' errors
            raise self._save_error(step_dir, e) from None
        self._last_save_time = time.monotonic()
        logger.info(
            f"Checkpoint step-{step}: {'saved' if self._pending is None else 'save started'} "
            f"in {time.perf_counter() - begin:.2f}s (training blocked that long)"
        )

    def _start_async(self, step: int, step_dir: Path) -> None:
        kwargs: dict[str, Any] = {}
        if self.cfg.async_mode == "async_with_pinned_mem":
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = torch.cuda.is_available()
            kwargs["async_checkpointer_type"] = AsyncCheckpointerType.PROCESS
            kwargs["async_stager"] = DefaultStager(StagingOptions(cuda, True, False, cuda))
        response = dcp.async_save(
            self._save_dict(), checkpoint_id=str(step_dir), process_group=self._pg, **kwargs
        )
        future = getattr(response, "upload_completion", response)
        done = threading.Event()
        self._pending = (step, done)

        def finished(f: Any) -> None:  # in DCP's background thread, on every rank
            try:
                error = f.exception()
                self._finish(step, storage.FULL, self._pg, error)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self._async_error = e
            finally:
                done.set()

        future.add_done_callback(finished)

    def _finish(self, step: int, kind: str, group: Any, error: BaseException | None = None) -> None:
        """Every rank checksums the files it wrote; rank 0 writes the marker with all of
        them and applies the retention limit. All ranks take part even when one failed,
        so none waits for another; then the failure is raised everywhere."""
        step_dir = storage.step_path(self.folder, step)
        mine: Any = f"{type(error).__name__}: {error}" if error is not None else None
        if mine is None:
            try:
                mine = storage.checksums(step_dir, storage.rank_files(step_dir, self.rank))
            except OSError as e:
                mine = f"{type(e).__name__}: {e}"
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, mine, group=group)
        failures = [g for g in gathered if isinstance(g, str)]
        if failures:
            raise self._save_error(step_dir, RuntimeError(failures[0]))
        marked: list[Any] = [None]  # rank 0's failure to write the marker, for every rank
        if self.rank == 0:
            sums = {name: crc for part in gathered for name, crc in part.items()}
            info = {"step": step, "kind": kind}
            if self.branch_from is not None:
                info["branch_from"] = self.branch_from
            if self.exclusions_applied:
                info["exclusions_applied"] = self.exclusions_applied
            try:
                storage.complete(step_dir, info, sums)
            except OSError as e:
                marked[0] = f"{type(e).__name__}: {e}"
        dist.broadcast_object_list(marked, src=0, group=group)
        if marked[0] is not None:
            raise self._save_error(step_dir, RuntimeError(marked[0]))
        if self.rank == 0:
            for path in storage.purge(self.folder, self.cfg.keep_latest_k):
                logger.info(
                    f"Removed old checkpoint {path.name} (keep_latest_k = {self.cfg.keep_latest_k})"
                )

    def _save_error(self, step_dir: Path, error: BaseException) -> CheckpointSaveError:
        """One line saying what stopped the save; the previous complete step is untouched."""
        text = " ".join(str(error).split())[:300]
        try:
            free = shutil.disk_usage(self.folder).free
            complete = [s for s in storage.list_steps(self.folder) if s.complete]
            need = sum(p.stat().st_size for p in complete[-1].path.iterdir()) if complete else 0
        except OSError:  # the folder is gone, or a purge removed that step meanwhile
            free, need = 0, 0
        no_space = (
            any(
                code in text for code in ("No space left", "ENOSPC", "unexpected pos", "Disk quota")
            )
            or isinstance(error, OSError)
            and error.errno in (errno.ENOSPC, errno.EDQUOT)
        )
        if no_space or (need and free < need):
            what = f"no space left in {self.folder}: {free / 2**30:.2f} GiB free"
            if need:
                what += f", a checkpoint takes about {need / 2**30:.2f} GiB"
        elif "Read-only" in text or "Permission denied" in text:
            what = f"{self.folder} cannot be written ({text[:120]})"
        else:
            what = f"the save failed ({text})"
        return CheckpointSaveError(
            f"checkpoint {step_dir.name} was not saved: {what}; the previous complete "
            "checkpoint stays loadable: free space or fix the folder, then run the same "
            "command to resume"
        )

    def poll(self) -> None:
        """Report an async save that has completed, without blocking."""
        if self._pending is not None and self._pending[1].is_set():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk and marked complete."""
        if self._pending is None:
            return
        step, done = self._pending
        done.wait()
        self._pending = None
        if self._async_error is not None:
            error, self._async_error = self._async_error, None
            raise error
        logger.info(f"Checkpoint step-{step} complete")

    def close(self, failed: bool = False) -> None:
        """Finish the save in flight and release the save group. After a failure the run
        is going down anyway: a save that does not finish within a minute is left without
        its marker (so it is never loaded), and its own failure is only reported."""
        if failed and self._pending is not None and not self._pending[1].wait(60):
            logger.warning(f"Abandoning the save of step-{self._pending[0]} (it has no marker)")
            return  # its thread may still use the save group: leave it to the exiting process
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

    def load(self, branch: bool = True) -> bool:
        """Resume from the newest complete checkpoint (or `load_step`), or initialize the
        model from `initial_load_path`; returns True when a run was resumed. With
        `branch`, resuming an older `load_step` sets the newer steps aside."""
        if self.enabled:
            if self.rank == 0:  # (here, not earlier: evaluation never creates the folder)
                self.folder.mkdir(parents=True, exist_ok=True)
                for path, what in storage.settle_incomplete(self.folder):
                    logger.warning(f"Checkpoint {path.name} had no marker: {what}")
            dist.barrier()
            if resume.resume(self, branch):
                return True
        if self.cfg.initial_load_path:
            load_initial(self.model, self.cfg.initial_load_path, self.cfg.initial_load_allow)
        return False

    def load_weights(self, path: Path) -> None:
        """Every model weight of a DCP directory, never the optimizer's state."""
        resume.load_weights(self, path)


__all__ = ["CheckpointError", "CheckpointSaveError", "Checkpointer"]
