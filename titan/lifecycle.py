"""What keeps a long run safe on a shared cluster: stopping cleanly on a signal, one owner
per run folder, and noticing a stuck step.

- `StopSignals`: SIGTERM / SIGUSR1 (configurable) only set a flag, from set-up on; after
  the step in progress, every rank agrees in one all-reduce, the run writes a complete
  checkpoint and ends with exit status 75 (a signal during set-up: 75 once set-up is done,
  nothing new to save; with checkpointing off: 6, nothing saved). Later signals are logged
  and ignored until the process exits.
- `RunLock`: `<dump_folder>/.lock` names the run that owns the folder (host, pid, Slurm job,
  start time). A second run on a live folder stops with one line naming the owner; the
  lock of a dead owner (its process gone, its Slurm job no longer running), or of the same
  Slurm job after a torchrun restart or a requeue, is taken over (and logged). Rank 0
  refreshes it while the run lives, so another host can tell a live lock from a stale one
  by its age.
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
import subprocess
import threading
import time
import uuid
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
    `with` block; `stop_agreed()` is True on every rank once any rank got one. `saving`:
    whether the run saves a checkpoint when it stops (what the log line promises)."""

    def __init__(self, names: list[str], saving: bool = True) -> None:
        self.signals = [getattr(signal, n) for n in names]
        self.saving = saving
        self.setting_up = True
        """Until the training loop starts: no step is in progress and nothing new to save."""
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            if self.setting_up:
                ending = "stopping once set-up is done, with nothing new to save"
            elif self.saving:
                ending = "finishing this step, then saving and stopping"
            else:
                ending = "finishing this step, then stopping (checkpointing is off)"
            logger.warning(f"{name} received: {ending}")
        else:
            logger.warning(f"{name} received again: the run is already stopping (ignored)")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        # Once one came, the run is ending: later ones are ignored until the process exits
        # (the agent's second shutdown signal must not cut the teardown or the last line).
        for s, previous in self._previous.items():
            signal.signal(s, signal.SIG_IGN if self.received else previous)
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


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot), or None when unknown."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if stat else None  # field 22: starttime


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


# Slurm job states in which the job's processes may still be running.
_SLURM_LIVE = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING",
               "STAGE_OUT", "RESIZING"}  # fmt: skip


def slurm_job_state(job: str) -> str | None:
    """The state `squeue` reports for Slurm job `job` ("" when Slurm no longer knows it),
    or None when Slurm cannot be asked (no squeue here, no answer in time)."""
    try:
        result = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=15
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return "" if "Invalid job id" in result.stderr else None
    states = result.stdout.split()
    return states[0] if states else ""


class RunLock:
    """The dump folder's owner file (rank 0 only).

    It is created whole (written under another name, then hard-linked into place, which
    fails if a lock exists), so no reader ever sees it half-written. An owner is judged
    gone when Slurm says its job no longer runs, or, on the same host and pid namespace,
    when its process is gone (or its pid now names a process that started later), or,
    elsewhere, when the lock has not been refreshed for `STALE_AFTER_S`. A stale lock is
    taken over by renaming it aside and checking that it is still the one judged, so two
    starting runs cannot both take it."""

    STALE_AFTER_S = 300.0
    """A lock not refreshed for this long, held on another host, belongs to a dead run."""
    REFRESH_S = 30.0

    def __init__(self, folder: Path, key: str = "job.dump_folder") -> None:
        self.path, self.key = folder / ".lock", key
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": slurm_job(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "boot_id": _read("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": _pid_namespace(),
            "process_start": _process_start(os.getpid()),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _owner(self, path: Path | None = None) -> dict[str, Any] | None:
        try:
            return json.loads((path or self.path).read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}  # unreadable (written by hand, or damaged)

    def _age_s(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _stale_because(self, owner: dict[str, Any]) -> str | None:
        """Why `owner` no longer holds the folder, or None when it may still be running."""
        age = self._age_s()
        if not owner:
            if age > self.STALE_AFTER_S:
                return f"it is unreadable and has not been refreshed for {age / 60:.0f} minutes"
            return None
        job = owner.get("slurm_job")
        if job and job == self.me["slurm_job"]:
            return f"it is this Slurm job ({job}), restarted or requeued"
        if job and (state := slurm_job_state(str(job))) is not None and state not in _SLURM_LIVE:
            return f"its Slurm job {job} is {state.lower() or 'no longer known to Slurm'}"
        same_machine = owner.get("host") == self.me["host"] and owner.get("boot_id") in (
            None,
            self.me["boot_id"],
        )
        if same_machine and owner.get("pid_namespace") in (None, self.me["pid_namespace"]):
            try:
                pid = int(owner["pid"])
                os.kill(pid, 0)
            except ProcessLookupError:
                return f"process {owner['pid']} is gone"
            except (PermissionError, KeyError, ValueError):
                return None
            started = owner.get("process_start")
            if started is not None and _process_start(pid) not in (None, started):
                return f"process {pid} is gone (its pid now names a newer process)"
            return None
        if owner.get("host") == self.me["host"] and owner.get("boot_id") != self.me["boot_id"]:
            return "its host has rebooted since"
        if age > self.STALE_AFTER_S:
            return f"it has not been refreshed for {age / 60:.0f} minutes"
        return None

    def _take_over(self, judged: dict[str, Any]) -> bool:
        """Remove the stale lock `judged`; False when the file changed meanwhile (another
        run took it first: it is left in place)."""
        aside = self.path.with_name(f".lock.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        if self._owner(aside) == judged:
            aside.unlink(missing_ok=True)
            return True
        try:  # a newer lock: put it back (unless yet another run holds the name now)
            os.link(aside, self.path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False

    def _create(self) -> bool:
        """Create the lock with this run's details; False if one exists."""
        tmp = self.path.with_name(f".lock.new-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(self.me))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> None:
        """Take the folder, or raise ConfigError naming the live owner."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self._create():
            owner = self._owner()
            if owner is None:
                continue  # released meanwhile: try again
            why = self._stale_because(owner)
            if why is None:
                raise ConfigError(self._in_use(owner))
            if self._take_over(owner):
                logger.warning(f"Taking over the run folder's lock {self.path}: {why}")
        self._thread = threading.Thread(target=self._refresh, name="titan-lock", daemon=True)
        self._thread.start()

    def held_by_another(self) -> str | None:
        """What a start would be refused with while a live run holds the folder, else None
        (a look for the dry run: nothing is taken)."""
        owner = self._owner()
        if owner is None or self._stale_because(owner) is not None:
            return None
        return self._in_use(owner)

    def _in_use(self, owner: dict[str, Any]) -> str:
        folder = f"{self.key} = {str(self.path.parent)!r}"
        if not owner:
            return (
                f"{folder} has an unreadable lock file {self.path}, refreshed "
                f"{self._age_s():.0f} s ago; if no run is alive, delete it"
            )
        job = f", Slurm job {owner['slurm_job']}" if owner.get("slurm_job") else ""
        return (
            f"{folder} is in use by a live run (host {owner.get('host')}, pid "
            f"{owner.get('pid')}{job}, since {owner.get('started')}); wait for it to end, or "
            f"use another {self.key} (if no run is alive, delete {self.path})"
        )

    def _refresh(self) -> None:
        warned = False
        while not self._stop.wait(self.REFRESH_S):
            owner = self._owner()
            if owner != self.me:
                if not warned:
                    warned = True
                    logger.error(
                        f"The run folder's lock {self.path} no longer names this run (now: "
                        f"{owner}): another run may be writing into {self.path.parent}"
                    )
                continue
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
