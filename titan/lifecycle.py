"""What keeps a long run safe on a shared cluster: stopping cleanly on a signal, one owner
per run folder, and noticing a stuck step.

- `StopSignals`: SIGTERM / SIGUSR1 (configurable) only set a flag; after the step in
  progress, every rank agrees in one all-reduce, the run writes a complete checkpoint
  and ends with exit status 75. A second signal during that save is logged and ignored.
- `RunLock`: `<dump_folder>/.lock` names the run that owns the folder (host, pid, Slurm job,
  start time). A second run on a live folder stops with one line naming the owner; the
  lock of a dead owner, or of the same Slurm job after a torchrun restart or a requeue, is
  taken over (and logged). Rank 0 refreshes it while the run lives, so another host can
  tell a live lock from a stale one by its age.
- `StepWatch`: a thread that logs a warning when a step takes far longer than the running
  median (a rank may be stuck or slow); collectives themselves time out after
  `job.collective_timeout_s`, which ends the run with exit status 5.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from titan.config import ConfigError, JobConfig
from titan.distributed import slurm_job
from titan.logging import logger

# ----------------------------------------------------------------------------- signals


class StopSignals:
    """Installs handlers for `names` (e.g. ["SIGTERM", "SIGUSR1"]) for the duration of a
    `with` block; `stop_agreed()` is True on every rank once any rank got one."""

    def __init__(self, names: list[str]) -> None:
        self.signals = [getattr(signal, n) for n in names]
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            logger.warning(f"{name} received: finishing this step, then saving and stopping")
        else:
            logger.warning(f"{name} received again: still finishing the save (ignored)")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    def stop_agreed(self, device: torch.device) -> bool:
        """One all-reduce (MAX) of "a signal arrived here": the same answer on every rank."""
        flag = torch.tensor([self.received is not None], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def stop_lead_seconds(cfg: JobConfig, nodes: int, gpus_per_node: int = 4) -> int:
    """How long before a time limit the warning signal should come (Slurm's
    --signal=B:USR1@N): the step in progress, the save of one full checkpoint, a margin.
    A step is estimated at 30% of an H100's dense bf16 peak; a node writes 1 GB/s."""
    from titan.models.llama import build_model_args, flops_per_token, num_params_from_args

    t = cfg.training
    args = build_model_args(cfg.model.flavor, t.vocab_size, t.seq_len)
    step_s = flops_per_token(args, t.seq_len) * t.batch_size * t.seq_len / (0.3 * 989e12)
    save_s = num_params_from_args(args) * 12 / nodes / 1e9  # fp32 weights + two moments
    return int(math.ceil((step_s + save_s + 120) / 60) * 60)


# ----------------------------------------------------------------------------- lock


class RunLock:
    """The dump folder's owner file (rank 0 only)."""

    STALE_AFTER_S = 300.0
    """A lock not refreshed for this long, held on another host, belongs to a dead run."""
    REFRESH_S = 30.0

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": slurm_job(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _owner(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}  # unreadable: treated as stale below

    def _stale_because(self, owner: dict[str, Any]) -> str | None:
        """Why `owner` no longer holds the folder, or None when it may still be running."""
        if not owner:
            return "the lock file is unreadable"
        if owner.get("slurm_job") and owner.get("slurm_job") == self.me["slurm_job"]:
            return f"it is this Slurm job ({owner['slurm_job']}), restarted or requeued"
        if owner.get("host") == self.me["host"]:
            try:
                os.kill(int(owner["pid"]), 0)
            except ProcessLookupError:
                return f"process {owner['pid']} is gone"
            except (PermissionError, KeyError, ValueError):
                pass
            return None
        age = time.time() - self.path.stat().st_mtime
        if age > self.STALE_AFTER_S:
            return f"it has not been refreshed for {age / 60:.0f} minutes"
        return None

    def acquire(self) -> None:
        """Take the folder, or raise ConfigError naming the live owner."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # released meanwhile: try again
                why = self._stale_because(owner)
                if why is None:
                    job = f", Slurm job {owner['slurm_job']}" if owner.get("slurm_job") else ""
                    raise ConfigError(
                        f"job.dump_folder = {str(self.path.parent)!r} is in use by a live run "
                        f"(host {owner.get('host')}, pid {owner.get('pid')}{job}, since "
                        f"{owner.get('started')}); wait for it to end, or use another "
                        f"job.dump_folder (if no run is alive, delete {self.path})"
                    ) from None
                logger.warning(f"Taking over the run folder's lock {self.path}: {why}")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            break
        self._thread = threading.Thread(target=self._refresh, name="titan-lock", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(self.REFRESH_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        owner = self._owner()
        if owner and owner.get("pid") == self.me["pid"] and owner.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- liveness


class StepWatch:
    """Logs when the current step has taken far longer than the median step (on every
    rank, so a stuck rank's peers say so too)."""

    def __init__(self, factor: float = 5.0, minimum_s: float = 60.0) -> None:
        self.factor, self.minimum_s = factor, minimum_s
        self.durations: list[float] = []
        self._step, self._began = 0, time.monotonic()
        self._warned = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="titan-watch", daemon=True)

    def start(self, step: int) -> None:
        self._step, self._began, self._warned = step, time.monotonic(), False
        if not self._thread.is_alive():
            self._thread.start()

    def done(self) -> None:
        self.durations.append(time.monotonic() - self._began)
        del self.durations[:-50]

    def close(self) -> None:
        self._stop.set()

    def _limit(self) -> float | None:
        if len(self.durations) < 3:
            return None
        return max(self.minimum_s, self.factor * statistics.median(self.durations))

    def _watch(self) -> None:
        while not self._stop.wait(5.0):
            limit = self._limit()
            elapsed = time.monotonic() - self._began
            if limit is not None and elapsed > limit and not self._warned:
                self._warned = True
                median = statistics.median(self.durations)
                logger.warning(
                    f"step {self._step} has been running for {elapsed:.0f} s, the median step "
                    f"takes {median:.1f} s: a rank may be stuck (it fails after "
                    "job.collective_timeout_s)"
                )
