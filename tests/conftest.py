"""Shared helpers: the repository root, running `train.py` in a subprocess (and finding its
workers, reading its metrics), a tiny
synthetic dataset built once per session, and the tiny Hugging Face Llama config that
our model and converters are checked against."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# Environment of every train.py subprocess: one thread per rank (2 cores), unbuffered logs.
TRAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_command(
    nproc: int, *torchrun_args: str, launcher: str = "torch.distributed.run"
) -> list[str]:
    """`python train.py`, or torchrun (or `launcher`, e.g. titan.launch) with `nproc` ranks
    when nproc > 1 or options are given."""
    if nproc == 1 and not torchrun_args and launcher == "torch.distributed.run":
        return [sys.executable, str(ROOT / "train.py")]
    return [
        sys.executable,
        "-m",
        launcher,
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        *torchrun_args,
        str(ROOT / "train.py"),
    ]


def debug_args(dump: Path, data: Path, *extra: str, seq_len: int = 64) -> list[str]:
    """Overrides for a small debug-recipe run: `dump` as its folder, the synthetic data
    at `data`, short sequences, every step logged; `extra` after them wins."""
    return [
        "--job.config_file=train_configs/debug_model.toml",
        f"--job.dump_folder={dump}",
        f"--training.dataset_path={data}",
        f"--training.seq_len={seq_len}",
        "--training.batch_size=2",
        "--metrics.log_freq=1",
        *extra,
    ]


def run_train(
    args: list[str], nproc: int = 1, timeout: int = 600, launcher: str = "torch.distributed.run"
) -> subprocess.CompletedProcess:
    """Run train.py (under torchrun or `launcher` when nproc > 1) and capture its output."""
    return subprocess.run(
        train_command(nproc, launcher=launcher) + args,
        cwd=ROOT,
        env=TRAIN_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_refused(result: subprocess.CompletedProcess, *parts: str) -> str:
    """The one `error:` line of a refused command, after checking exit status 2 and no
    traceback; each of `parts` is in it."""
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert "Traceback" not in out
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for part in parts:
        assert part in err, err
    return err


def read_metrics(dump: Path) -> list[dict]:
    """The records of `<dump>/metrics.jsonl`, in the order they were written."""
    return [
        json.loads(line)
        for line in (dump / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]


def train_losses(dump: Path) -> dict[int, float]:
    """Step -> training loss; a restarted run's records replace the killed run's."""
    return {r["step"]: r["loss"] for r in read_metrics(dump) if "loss" in r}


def logged_step(dump: Path) -> int:
    """The newest step with a training record (0 before the first)."""
    path = dump / "metrics.jsonl"
    return max(train_losses(dump), default=0) if path.exists() and path.stat().st_size else 0


def launch_train(
    args: list[str], nproc: int = 2, max_restarts: int = 0, launcher: str = "torch.distributed.run"
) -> subprocess.Popen:
    """Start train.py under torchrun (or `launcher`) in its own session."""
    return subprocess.Popen(
        train_command(nproc, f"--max_restarts={max_restarts}", launcher=launcher) + args,
        cwd=ROOT,
        env=TRAIN_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll `condition()` until it holds; fail if the run ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"run ended early:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def running(pid: int) -> bool:
    """Whether process `pid` runs still (not ended, not a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def worker_pids(dump: Path) -> list[int]:
    """The train.py workers of the run writing to `dump` (children of its torchrun agent,
    started by torchrun itself or by `python -m titan.launch`)."""

    def cmdline(pid: str) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return ""

    pids = []
    for entry in Path("/proc").iterdir():
        if (
            entry.name.isdigit()
            and "train.py" in (cmd := cmdline(entry.name))
            and str(dump) in cmd
            and "torch.distributed.run" not in cmd
            and "titan.launch" not in cmd
        ):
            try:
                ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                continue
            if any(agent in cmdline(ppid) for agent in ("torch.distributed.run", "titan.launch")):
                pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic Neural Pile dataset (train and test splits), made once."""
    from titan.data.synthetic import generate

    out = tmp_path_factory.mktemp("data") / "synthetic"
    generate(out, rows=24, seed=0)
    return out


def tiny_hf_config(**overrides):
    """A tiny `transformers.LlamaConfig` with GQA and Llama-3.1 RoPE scaling whose original
    context (16) is shorter than the sequences tested; large init so that position and
    head mix-ups show in the logits."""
    import transformers

    values = dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    return transformers.LlamaConfig(**(values | overrides))
