"""Distributed checkpoints (DCP) that survive crashes, and exact resume.

Layout: `<dump_folder>/<checkpoint.folder>/step-N/`, a DCP directory. It counts only once
it holds the `.complete` marker, which rank 0 writes after every rank's data and the
`.metadata` file are on disk, so a save cut short by kill -9, a full disk or a crashed
rank is never loaded (and is removed at the next start). Keys:

    model.<Meta parameter name>      model weights (plain names: no FSDP/compile/AC prefixes)
    optimizer.*                      AdamW state, sharded like the model
    lr_scheduler.*, train_state.*    step, tokens seen, layout the run was saved with
    dataloader.dp_rank_<r>           each data-parallel rank's loader position (pickled)
    rng.rank_<r>                     each rank's RNG states

DCP reshards model and optimizer on load, so a run may resume on another world size.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.checkpoint.stateful import Stateful

from titan.config import ConfigError, JobConfig
from titan.logging import logger

MARKER = ".complete"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint on disk cannot be used; the message is one line."""


# ----------------------------------------------------------------------------- states


class ModelState(Stateful):
    """The model's full-name state dict (DTensor shards under FSDP)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=False))


class OptimizerState(Stateful):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


@dataclass
class TrainState(Stateful):
    """Progress counters, and the layout they were saved under."""

    step: int = 0
    tokens_seen: int = 0
    dp_degree: int = 1
    world_size: int = 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": torch.tensor(self.step),
            "tokens_seen": torch.tensor(self.tokens_seen),
            "dp_degree": torch.tensor(self.dp_degree),
            "world_size": torch.tensor(self.world_size),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, value in state_dict.items():
            setattr(self, key, int(value))


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- on disk


def list_steps(folder: Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for every step directory, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path, (path / MARKER).is_file()))
    return sorted(found)


def read_marker(step_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((step_dir / MARKER).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def verify(step_dir: Path) -> str | None:
    """Check that every file `.metadata` refers to exists and is long enough; return the
    problem in a few words, or None when the directory looks intact."""
    if not (step_dir / ".metadata").is_file():
        return "the .metadata file is missing"
    try:
        metadata = FileSystemReader(str(step_dir)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is the same problem
        return f"the .metadata file is unreadable ({type(e).__name__})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(
            needed.get(info.relative_path, 0), info.offset + info.length
        )
    for rel, end in sorted(needed.items()):
        path = step_dir / rel
        if not path.is_file():
            return f"shard {rel} is missing"
        if path.stat().st_size < end:
            return f"shard {rel} is truncated ({path.stat().st_size} of {end} bytes)"
    return None


def checkpoint_keys(path: Path) -> dict[str, Any]:
    """Flattened key -> metadata entry (tensor size, or bytes) of a DCP directory."""
    return dict(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


# ----------------------------------------------------------------------------- manager


class Checkpointer:
    """Saves and restores the dict of Stateful objects that defines a training run."""

    def __init__(
        self,
        cfg: JobConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        dataloader: Any,
        train_state: TrainState,
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
            "train_state": train_state,
        }
        self.rank = dist.get_rank()
        self.dp_rank = dp_rank
        self._pending: tuple[int, Any] | None = None  # (step, future) of the save in flight
        self._last_save_time = time.monotonic()
        self._pg = None
        if self.enabled and c.async_mode != "disabled":
            # DCP's background collectives must not share a group with FSDP's (DESIGN §7).
            self._pg = dist.new_group(backend="gloo")
        if self.enabled and self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ saving

    def _save_dict(self) -> dict[str, Any]:
        loader_state = pickle.dumps(self.dataloader.state_dict())
        return {
            **self.states,
            "dataloader": {f"dp_rank_{self.dp_rank}": loader_state},
            "rng": {f"rank_{self.rank}": pickle.dumps(_rng_state())},
        }

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
        step_dir = self.folder / f"step-{step}"
        if self.rank == 0 and step_dir.exists():  # an older attempt's leftovers
            shutil.rmtree(step_dir)
        dist.barrier()
        begin = time.perf_counter()
        if last and self.cfg.model_weights_only:
            self._save_export(step, step_dir)
        elif self.cfg.async_mode == "disabled" or last:
            dcp.save(self._save_dict(), checkpoint_id=str(step_dir))
            self._finish(step, "full")
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
        self._finish(step, "model")
        logger.info(f"Exported model weights ({self.cfg.export_dtype}) to {step_dir}")

    def _finish(self, step: int, kind: str) -> None:
        """Mark a written step complete (rank 0) and apply the retention limit."""
        if self.rank == 0:
            step_dir = self.folder / f"step-{step}"
            (step_dir / MARKER).write_text(json.dumps({"step": step, "kind": kind}))
            self._purge()

    def poll(self) -> None:
        """Finish an async save that has completed, without blocking."""
        if self._pending is not None and self._pending[1].done():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk and marked complete."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        future.result()
        self._finish(step, "full")
        logger.info(f"Checkpoint step-{step} complete")

    def _purge(self) -> None:
        """Delete all but the newest `keep_latest_k` complete step directories; the
        newest complete full checkpoint is never deleted."""
        k = self.cfg.keep_latest_k
        complete = [(s, p) for s, p, ok in list_steps(self.folder) if ok]
        if k <= 0 or len(complete) <= k:
            return
        newest_full = max(
            (s for s, p in complete if read_marker(p).get("kind") == "full"), default=None
        )
        for step, path in complete[:-k]:
            if step != newest_full:
                shutil.rmtree(path, ignore_errors=True)
                logger.info(f"Removed old checkpoint {path.name} (keep_latest_k = {k})")

    def close(self) -> None:
        self.wait()
        if self._pg is not None:
            dist.destroy_process_group(self._pg)
            self._pg = None

    # ------------------------------------------------------------------ loading

    def _resume_candidates(self) -> list[tuple[int, Path]]:
        """Complete full checkpoints, newest first (or just `load_step`)."""
        steps = [
            (s, p)
            for s, p, ok in list_steps(self.folder)
            if ok and read_marker(p).get("kind", "full") == "full"
        ]
        if self.cfg.load_step >= 0:
            chosen = [(s, p) for s, p in steps if s == self.cfg.load_step]
            if not chosen:
                have = ", ".join(str(s) for s, _ in steps) or "none"
                raise ConfigError(
                    f"checkpoint.load_step = {self.cfg.load_step}: no complete checkpoint of that "
                    f"step in {self.folder} (complete steps: {have})"
                )
            return chosen
        return sorted(steps, reverse=True)

    def _remove_incomplete(self) -> None:
        if self.rank == 0:
            for _, path, ok in list_steps(self.folder):
                if not ok:
                    logger.warning(
                        f"Removing incomplete checkpoint {path} (its save was cut short)"
                    )
                    shutil.rmtree(path, ignore_errors=True)
        dist.barrier()

    def load(self) -> bool:
        """Resume from the newest complete checkpoint, or initialize the model from
        `initial_load_path`; returns True when a run was resumed."""
        if self.enabled:
            self._remove_incomplete()
            for _, path in self._resume_candidates():
                problem = verify(path)
                if problem is None:
                    self._load_full(path)
                    return True
                message = f"checkpoint {path} is corrupted: {problem}"
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
        begin = time.perf_counter()
        exclude = set(self.cfg.exclude_from_loading)
        saved = TrainState()
        dcp.load({"train_state": saved}, checkpoint_id=str(path))
        states = {k: v for k, v in self.states.items() if k not in exclude and k != "train_state"}
        if states:
            dcp.load(states, checkpoint_id=str(path))
        if "train_state" not in exclude:
            self.train_state.step, self.train_state.tokens_seen = saved.step, saved.tokens_seen
        if "dataloader" not in exclude:
            self._load_dataloader(path, saved.dp_degree)
        if saved.world_size == self.train_state.world_size:
            key = f"rank_{self.rank}"
            rng = {"rng": {key: b""}}
            dcp.load(rng, checkpoint_id=str(path))
            _set_rng_state(pickle.loads(rng["rng"][key]))
        else:
            logger.info(
                f"World size changed ({saved.world_size} -> {self.train_state.world_size}): "
                "RNG states start fresh; model and optimizer were resharded"
            )
        logger.info(
            f"Resumed from {path} at step {saved.step} ({saved.tokens_seen:,} tokens seen) in "
            f"{time.perf_counter() - begin:.2f}s"
            + (f"; not loaded: {', '.join(sorted(exclude))}" if exclude else "")
        )

    def _load_dataloader(self, path: Path, saved_dp: int) -> None:
        current_dp = self.train_state.dp_degree
        if saved_dp == current_dp:
            key = f"dp_rank_{self.dp_rank}"
            request = {"dataloader": {key: b""}}
            dcp.load(request, checkpoint_id=str(path))
            self.dataloader.load_state_dict(pickle.loads(request["dataloader"][key]))
            return
        request = {"dataloader": {f"dp_rank_{r}": b"" for r in range(saved_dp)}}
        dcp.load(request, checkpoint_id=str(path))
        old = [pickle.loads(request["dataloader"][f"dp_rank_{r}"]) for r in range(saved_dp)]
        self.dataloader.load_state_dict({"resharded_from": old})
        logger.info(f"Data-parallel degree changed ({saved_dp} -> {current_dp}): data resharded")

    def _load_initial(self, path: Path) -> None:
        """Model weights only: every tensor whose name and shape match; the rest keep
        their fresh initialization (e.g. embedding/output when the vocabulary differs)."""
        if not path.is_dir():
            raise ConfigError(f"checkpoint.initial_load_path = {str(path)!r}: no such directory")
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint.initial_load_path {path}: {problem}")
        saved = checkpoint_keys(path)
        ours = get_model_state_dict(self.model)
        load, skipped = {}, []
        for name, tensor in ours.items():
            meta = saved.get(f"model.{name}")
            if meta is not None and tuple(getattr(meta, "size", ())) == tuple(tensor.shape):
                load[name] = tensor
            else:
                why = (
                    "absent"
                    if meta is None
                    else f"shape {tuple(meta.size)} != {tuple(tensor.shape)}"
                )
                skipped.append(f"{name} ({why})")
        if not load:
            raise CheckpointError(
                f"checkpoint.initial_load_path {path}: no model tensor matches this model "
                "(expected keys like model.layers.0.attention.wq.weight)"
            )
        dcp.load({"model": load}, checkpoint_id=str(path))
        set_model_state_dict(self.model, load, options=StateDictOptions(strict=False))
        logger.info(
            f"Initialized {len(load)} of {len(ours)} model tensors from {path}; "
            f"kept fresh initialization for {len(skipped)}: {', '.join(skipped) or 'none'}"
        )
