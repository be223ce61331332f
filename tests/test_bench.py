"""The speed benchmark's CPU smoke mode runs and writes its results file: environment,
the attention table and titan's steps beside transformers' for every AC policy."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, TRAIN_ENV


def test_step_benchmark_tiny_mode(tmp_path):
    out = tmp_path / "results.md"
    result = subprocess.run(
        [sys.executable, "bench/step.py", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=TRAIN_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert result.stdout.strip().endswith(text.strip().splitlines()[-1])  # table printed last
    for needle in (
        "- torch: ",
        "- command: ",
        "bench/step.py --tiny",
        "float32 matmul 256^3",
        "## Attention",
        "## Training step",
        "| transformers | gradient ckpt",
    ):
        assert needle in text, needle  # fmt: skip
    for policy in ("none", "attn", "full", "auto"):
        assert f"| titan        | {policy}" in text, policy
    assert "out of memory" not in text
