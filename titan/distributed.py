"""Process-group set-up and the parallel layout.

The only module that reads torchrun's environment variables (RANK, WORLD_SIZE,
LOCAL_RANK). `ParallelDims` is the one object that carries the degrees and the device
mesh; it is passed explicitly to whatever needs it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from titan.config import ConfigError, JobConfig

_PARENT = os.getppid()  # the launching process (torchrun's agent), as this process started
_LAUNCHER_VARS = ("RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets beside WORLD_SIZE


class RanksDidNotJoin(RuntimeError):
    """The process group's rendezvous gave up: not every rank started."""


@dataclass
class ParallelDims:
    """Data-parallel layout: `dp_replicate` HSDP replicas x `dp_shard` FSDP shards."""

    dp_replicate: int
    dp_shard: int
    world_size: int
    device_type: str
    mesh: DeviceMesh | None = field(default=None, repr=False)

    @classmethod
    def from_config(
        cls, cfg: JobConfig, world_size: int, device_type: str, *, training: bool = True
    ) -> ParallelDims:
        """The data-parallel layout of `world_size` ranks; for `training`, also checked
        against the batch arithmetic (an evaluation reads its own batches)."""
        t = cfg.training
        replicate, shard = t.data_parallel_replicate_degree, t.data_parallel_shard_degree
        if shard == -1:
            if world_size % replicate:
                raise ConfigError(
                    f"training.data_parallel_replicate_degree = {replicate} does not divide the "
                    f"world size {world_size}; choose a divisor of {world_size}"
                )
            shard = world_size // replicate
        if replicate * shard != world_size:
            raise ConfigError(
                f"data_parallel_replicate_degree x data_parallel_shard_degree = {replicate} x "
                f"{shard} = {replicate * shard}, but the world size is {world_size}; make the "
                "product equal the number of ranks (or set data_parallel_shard_degree = -1)"
            )
        dims = cls(replicate, shard, world_size, device_type)
        if training:
            dims.check_batch(cfg)
        return dims

    @property
    def dp_degree(self) -> int:
        return self.dp_replicate * self.dp_shard

    def global_batch(self, cfg: JobConfig) -> int:
        """Sequences per optimizer step, over all data-parallel ranks."""
        t = cfg.training
        return t.global_batch_size if t.global_batch_size > 0 else t.batch_size * self.dp_degree

    def accumulation_steps(self, cfg: JobConfig) -> int:
        """Micro-batches each rank runs per optimizer step."""
        return self.global_batch(cfg) // (cfg.training.batch_size * self.dp_degree)

    def check_batch(self, cfg: JobConfig) -> None:
        t = cfg.training
        per_pass = t.batch_size * self.dp_degree
        if t.global_batch_size > 0 and t.global_batch_size % per_pass:
            raise ConfigError(
                f"training.global_batch_size = {t.global_batch_size} is not a multiple of "
                f"batch_size x DP degree = {t.batch_size} x {self.dp_degree} = {per_pass}; "
                f"use a multiple of {per_pass}"
            )

    def build_mesh(self) -> DeviceMesh:
        if self.dp_replicate > 1:
            self.mesh = init_device_mesh(
                self.device_type,
                (self.dp_replicate, self.dp_shard),
                mesh_dim_names=("dp_replicate", "dp_shard"),
            )
        else:
            self.mesh = init_device_mesh(
                self.device_type, (self.dp_shard,), mesh_dim_names=("dp_shard",)
            )
        return self.mesh

    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (each reads different data)."""
        assert self.mesh is not None
        if self.dp_replicate > 1:
            return (
                self.mesh["dp_replicate"].get_local_rank() * self.dp_shard
                + self.mesh["dp_shard"].get_local_rank()
            )
        return self.mesh["dp_shard"].get_local_rank()


def env_rank() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) without it
    (or for a value that is not a number: `launched_world_size` reports a bad WORLD_SIZE)."""

    def number(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default

    return number("RANK", 0), number("LOCAL_RANK", 0), number("WORLD_SIZE", 1)


def launched_world_size() -> int | None:
    """WORLD_SIZE when a launcher (torchrun, or the user for a dry run) set it, else None."""
    if "WORLD_SIZE" not in os.environ:
        return None
    text = os.environ["WORLD_SIZE"]
    if not (text.strip().isascii() and text.strip().isdigit() and int(text) > 0):
        raise ConfigError(f"WORLD_SIZE = {text!r}: must be a positive integer (the ranks)")
    return int(text)


def dry_run_world_size(cfg: JobConfig) -> int:
    """The world size a dry run plans for: WORLD_SIZE, else the recipe's explicit degrees,
    else a single process."""
    world = launched_world_size()
    t = cfg.training
    if world is not None:
        return world
    if t.data_parallel_shard_degree > 0:
        return t.data_parallel_replicate_degree * t.data_parallel_shard_degree
    if t.data_parallel_replicate_degree > 1:
        raise ConfigError(
            f"training.data_parallel_replicate_degree = {t.data_parallel_replicate_degree} "
            "needs the world size: run the dry run as WORLD_SIZE=N python ..."
        )
    return 1


def local_world_size() -> int:
    """Ranks on this node (LOCAL_WORLD_SIZE from torchrun; 1 without it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def check_only() -> bool:
    """TITAN_CHECK_ONLY=1: `titan.launch` checks the recipe and starts nothing."""
    return os.environ.get("TITAN_CHECK_ONLY") == "1"


def status_file() -> str | None:
    """Where a launcher asked for the run's exit status (TITAN_STATUS_FILE), if it did."""
    return os.environ.get("TITAN_STATUS_FILE")


def slurm_job() -> str | None:
    """The Slurm job id (array jobs: <array job>_<task>), or None outside Slurm."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def init_distributed(timeout_s: int = 1800) -> tuple[torch.device, int, int]:
    """Pick the device (CUDA + NCCL when available, else CPU + gloo) and join the process
    group; works without torchrun as a world of one. Returns (device, rank, world_size)."""
    rank, local_rank, world_size = env_rank()
    if world_size > 1 and (missing := [v for v in _LAUNCHER_VARS if v not in os.environ]):
        raise ConfigError(
            f"WORLD_SIZE={world_size} is set but {', '.join(missing)} not: this process was "
            f"not started by a launcher; run python -m titan.launch --nproc_per_node "
            f"{world_size} ..., or unset WORLD_SIZE (only a dry run reads it alone)"
        )
    exit_with_agent()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        store = _attempt_store(world_size, timedelta(seconds=timeout_s))
        if store is None and world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
            # A plain `python train.py`, a world of one: an in-memory store. torch's TCP
            # store runs a server thread that, now and then, aborts the interpreter's exit
            # ("terminate called without an active exception", exit 134 after a clean run).
            store = dist.HashStore()
        try:
            dist.init_process_group(
                backend=backend,
                store=store,
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
                device_id=device if backend == "nccl" else None,
            )
        except dist.DistStoreError as e:  # "Timed out after N seconds waiting for clients"
            raise RanksDidNotJoin(
                f"not all {world_size} ranks joined within job.init_timeout_s = {timeout_s} s "
                f"({' '.join(str(e).split())[:120]}); check that every node's launcher "
                "started (and the MASTER_ADDR/MASTER_PORT they share)"
            ) from None
    return device, rank, world_size


def set_collective_timeout(seconds: int, dims: ParallelDims | None = None) -> None:
    """How long the default group's and the mesh's collectives may take from now on."""
    timeout = timedelta(seconds=seconds)
    groups = {dist.group.WORLD}
    if dims is not None and dims.mesh is not None:
        groups |= set(dims.mesh.get_all_groups())
    for group in groups:
        dist.distributed_c10d._set_pg_timeout(timeout, group)


@contextlib.contextmanager
def timeout_for(seconds: int, restore: int, dims: ParallelDims | None = None) -> Iterator[None]:
    """Collectives inside the block may take `seconds` (e.g. a save's); then `restore`."""
    set_collective_timeout(seconds, dims)
    try:
        yield
    finally:
        set_collective_timeout(restore, dims)


def exit_with_agent() -> None:
    """Under torchrun, die with the agent. torchrun starts each worker in a session of its
    own, so killing the agent (kill -9, an OOM kill) would leave its workers training on
    unsupervised, still writing checkpoints. Linux's parent-death signal ends them with it."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != _PARENT:  # the agent died before the call above
        os._exit(1)


def exit_process(code: int) -> NoReturn:
    """End the process with `code`: exit handlers run and output is flushed, but the
    interpreter is not torn down. A gloo worker thread may still be dropping its last
    reference to a finished collective's tensors, which needs the GIL; if the interpreter
    has begun finalizing by then, the thread is cancelled inside C++ and the process
    aborts ("terminate called without an active exception", SIGABRT) after a successful
    run, now and then (a race; seen on a 2-core machine with two ranks). The mesh (cached by
    DTensor) keeps the groups alive past `destroy_process_group`, so their threads cannot
    be joined first. The run has closed its files and locks by now and waited for its
    save; threads still alive are idle pools, or a save abandoned after a failure (left
    without its marker, so never loaded): none is waited for."""
    atexit._run_exitfuncs()  # logging's flush, torch's own clean-ups
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _attempt_store(world_size: int, timeout: timedelta) -> dist.Store | None:
    """Under torchrun, workers share the agent's rendezvous store, which outlives a restart:
    a restarted attempt could read the previous attempt's gloo/NCCL addresses from it and
    fail with "Connection refused" (pytorch#135712). Keep each attempt's keys apart.
    Returns None (torch's own env:// rendezvous) when not under the agent's store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=world_size,
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"titan/attempt_{restart_count()}", store)
