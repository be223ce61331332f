"""Shared fixtures: the repository root, a runner for `train.py` in a subprocess, and a
tiny synthetic dataset built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_train(
    args: list[str],
    nproc: int = 1,
    cwd: Path = ROOT,
    timeout: int = 600,
    extra_env: dict | None = None,
    torchrun_args: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """Run train.py (under torchrun when nproc > 1) and capture its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    if nproc > 1 or torchrun_args:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            *(torchrun_args or []),
            str(ROOT / "train.py"),
        ]
    else:
        cmd = [sys.executable, str(ROOT / "train.py")]
    return subprocess.run(
        cmd + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic Neural Pile dataset (train and test splits), made once."""
    from titan.data.synthetic import generate

    out = tmp_path_factory.mktemp("data") / "synthetic"
    generate(out, rows=24, seed=0)
    return out
