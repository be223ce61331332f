"""Run a function on N ranks of a real gloo process group (spawned processes)."""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from titan.distributed import exit_process


def free_port() -> int:
    """A TCP port nothing listens on now (for a test's process group or services)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(*args)
        Path(out, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()
    exit_process(0)  # as the commands end: interpreter teardown can abort under gloo


def run_ranks(fn: Callable, world: int, *args: Any) -> list[Any]:
    """`fn(*args)` on each of `world` ranks; returns the per-rank results in rank order."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _worker,
            args=(world, free_port(), out, fn, args),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        return [pickle.loads(Path(out, f"{r}.pkl").read_bytes()) for r in range(world)]
