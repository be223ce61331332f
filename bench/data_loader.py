"""Data loader benchmark (issue 3): tokens/s of titan's loader against a plain per-row
Python-list implementation of the same tokenization, and resume time at 1%, 50% and 99%
of an epoch, at seq_len 131072 on a synthetic dataset of at least 1 GB built here.

    .venv/bin/python bench/data_loader.py [--out data_cache/bench_1gb] [--rows 400]
        [--seq-len 131072] [--batch-size 1] [--baseline-seconds 30]

The dataset (Neural Pile schema, 16-256 neurons x 1000-40000 bins per session, sessions
cut at 10M counts) is generated once and reused by later runs. "ours" runs one full epoch
with each of the map-style and streaming paths (nothing else consumes the batches, so the
figure is the loader's own throughput); the baseline tokenizes rows given as nested
Python lists, time bin by time bin, into a Python list buffer that it slices into
windows (the way earlier code did it) for --baseline-seconds. A resume is timed from
`load_state_dict` to the first batch in hand, on a freshly built loader.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from datasets import load_from_disk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from titan.config import JobConfig  # noqa: E402
from titan.data import build_dataloader  # noqa: E402
from titan.data.synthetic import generate  # noqa: E402


def make_cfg(path: str, seq_len: int, batch_size: int, streaming: bool) -> JobConfig:
    cfg = JobConfig()
    cfg.training.dataset, cfg.training.dataset_path = "bench", path
    cfg.training.seq_len, cfg.training.batch_size = seq_len, batch_size
    cfg.data.streaming = streaming
    return cfg


def run_epoch(cfg: JobConfig) -> tuple[float, int, list[dict]]:
    """(seconds, input tokens, state after every batch) for one epoch of rank 0 of 1."""
    loader = build_dataloader(cfg, 0, 1, infinite=False)
    states, tokens = [], 0
    t0 = time.perf_counter()
    for inputs, _ in loader:
        tokens += inputs.numel()
        states.append(loader.state_dict())
    return time.perf_counter() - t0, tokens, states


def baseline(path: str, seq_len: int, batch_size: int, seconds: float) -> tuple[float, int]:
    """(seconds, input tokens) of the per-row Python-list implementation."""
    ds = load_from_disk(path)["train"]
    window = seq_len + 1
    buffer: list[int] = []
    tokens = 0
    t0 = time.perf_counter()
    for row in ds:  # a dict whose spike_counts is a list of per-neuron lists
        counts = row["spike_counts"]
        for t in range(len(counts[0])):
            buffer.append(255)
            for neuron in counts:
                buffer.append(min(neuron[t], 254))
        while len(buffer) >= batch_size * window:
            chunk, buffer = buffer[: batch_size * window], buffer[batch_size * window :]
            x = torch.LongTensor(chunk).view(batch_size, window)
            batch = (x[:, :-1].contiguous(), x[:, 1:].contiguous())  # (inputs, labels)
            tokens += batch[0].numel()
            if time.perf_counter() - t0 > seconds:
                return time.perf_counter() - t0, tokens
    return time.perf_counter() - t0, tokens


def time_resume(cfg: JobConfig, state: dict) -> tuple[float, float, int]:
    """(build seconds, resume-to-first-batch seconds, rows read) from a state."""
    t0 = time.perf_counter()
    loader = build_dataloader(cfg, 0, 1)
    t1 = time.perf_counter()
    loader.load_state_dict(state)
    next(loader)
    t2 = time.perf_counter()
    loader.close()
    return t1 - t0, t2 - t1, loader.rows_read


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data_cache/bench_1gb", help="dataset folder (reused)")
    p.add_argument("--rows", type=int, default=400, help="train rows (about 3 MB each)")
    p.add_argument("--seq-len", type=int, default=131072)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--baseline-seconds", type=float, default=30.0)
    a = p.parse_args()

    out = Path(a.out)
    t0 = time.perf_counter()
    existed = out.exists()
    generate(out, rows=a.rows, seed=0, test_rows=4, neurons=(16, 256), bins=(1000, 40000))
    size = sum(f.stat().st_size for f in (out / "train").glob("*.arrow"))
    train = load_from_disk(str(out))["train"]
    how = "reused" if existed else f"built in {time.perf_counter() - t0:.0f} s"
    print(f"dataset {out}: {len(train)} train rows, {size / 1e9:.2f} GB of Arrow ({how})")
    if size < 1e9:
        print("warning: the dataset is smaller than 1 GB; raise --rows")
    print(f"seq_len {a.seq_len}, batch_size {a.batch_size}, 1 data-parallel rank, "
          f"{torch.get_num_threads()} torch threads")  # fmt: skip

    results = {}
    for mode in ("map", "stream"):
        cfg = make_cfg(str(out), a.seq_len, a.batch_size, mode == "stream")
        secs, tokens, states = run_epoch(cfg)
        results[mode] = (secs, tokens, states)
        print(f"ours ({mode:6s}): {tokens / secs / 1e6:8.1f} M tokens/s "
              f"({tokens / 1e9:.2f} B tokens, one epoch in {secs:.1f} s)")  # fmt: skip

    b_secs, b_tokens = baseline(str(out), a.seq_len, a.batch_size, a.baseline_seconds)
    b_rate = b_tokens / b_secs
    print(f"baseline (Python lists): {b_rate / 1e6:8.2f} M tokens/s "
          f"({b_tokens / 1e6:.1f} M tokens in {b_secs:.1f} s)")  # fmt: skip
    for mode in ("map", "stream"):
        secs, tokens, _ = results[mode]
        ratio = tokens / secs / b_rate
        verdict = "PASS" if ratio >= 20 else "FAIL"
        print(f"speed-up ({mode}): {ratio:.0f}x (acceptance: >= 20x) {verdict}")

    print("resume (fresh loader; build = open the dataset, resume = load_state_dict to first "
          "batch in hand):")  # fmt: skip
    for mode in ("map", "stream"):
        cfg = make_cfg(str(out), a.seq_len, a.batch_size, mode == "stream")
        secs, tokens, states = results[mode]
        for pct in (1, 50, 99):
            i = max(0, round(len(states) * pct / 100) - 1)
            build, resume, rows = time_resume(cfg, states[i])
            done = (i + 1) * a.seq_len * a.batch_size
            print(f"  {mode:6s} at {pct:2d}% ({(i + 1):5d} batches): build {build:5.2f} s, "
                  f"resume {resume:5.3f} s, rows read {rows:2d}; replaying instead would "
                  f"re-tokenize {done / 1e9:.2f} B tokens (~{done / b_rate:,.0f} s at the "
                  f"baseline's speed, {done / (tokens / secs):.1f} s at ours)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
