"""Shared fixtures: the repository root, a runner for `train.py` in a subprocess, a tiny
synthetic dataset built once per session, and the tiny Hugging Face Llama config that
our model and converters are checked against."""

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
