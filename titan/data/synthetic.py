"""Synthetic spike data in the Neural Pile schema, deterministic from a seed.

    python -m titan.data.synthetic --out data_cache/synthetic --rows 64 --seed 0 \
        [--test-rows N] [--neurons MIN MAX] [--bins MIN MAX] [--max-values N] [--overwrite]

Writes a `DatasetDict` with `train` and `test` splits (`save_to_disk`) whose columns are
those of the Neural Pile: `spike_counts` (Sequence(Sequence(uint8)), one matrix of shape
(n_neurons, n_time_bins) per row) and the strings `subject_id`, `session_id`,
`segment_id`, `source_dataset`.

Each session draws its neuron count and length, then counts from a model a network can
learn: every neuron has its own baseline rate (log-normal), a few smooth latent signals
shared by all neurons of the session modulate the rates through per-neuron loadings, and
refractoriness removes a spike in the bin after a spike with probability `refractory`.
As in the Neural Pile, sessions of more than `max_values` counts are cut in time into
segments (`segment_0`, `segment_1`, ...), one row each. Everything is vectorized numpy.

The output is written to a temporary sibling folder and renamed into place, so a crash
never leaves a half-written dataset under the final name; an existing dataset is kept
(pass `overwrite` to replace it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from titan.data.sources import quiet_datasets

PARAMS_FILE = "synthetic.json"
"""Generation parameters, written into the dataset folder."""
_SPIKES = pa.list_(pa.list_(pa.uint8()))
_SCHEMA = pa.schema(
    [
        ("spike_counts", _SPIKES),
        ("subject_id", pa.string()),
        ("session_id", pa.string()),
        ("segment_id", pa.string()),
        ("source_dataset", pa.string()),
    ]
)
_BATCH_VALUES = 256 * 2**20  # counts per Arrow record batch (keeps int32 offsets safe)


def default_test_rows(rows: int) -> int:
    """Rows of the test split when not given: a tenth of the train rows, at least 4."""
    return max(4, rows // 10)


def _session(rng: np.random.Generator, n: int, t: int, refractory: float) -> np.ndarray:
    """Counts of one session, (n_neurons, n_time_bins) uint8."""
    base_rate = np.exp(rng.normal(np.log(0.15), 0.9, size=n))  # (neurons,) spikes per bin
    n_latents = 3
    width = int(rng.integers(4, 40))  # smoothing window of the latents, in bins
    noise = rng.standard_normal((n_latents, t + width))
    cums = np.cumsum(noise, axis=1)  # (latents, time + width)
    latents = (cums[:, width:] - cums[:, :-width]) / np.sqrt(width)  # (latents, time), var ~1
    loadings = rng.normal(0.0, 0.6, size=(n, n_latents))  # (neurons, latents)
    drive = loadings @ latents  # (neurons, time)
    rate = base_rate[:, None] * np.exp(np.clip(drive, -6.0, 3.0))  # (neurons, time)
    counts = rng.poisson(rate)  # (neurons, time) int64
    if refractory > 0 and t > 1:
        spiked = counts[:, :-1] > 0  # (neurons, time - 1)
        drop = spiked & (rng.random((n, t - 1), dtype=np.float32) < refractory)
        counts[:, 1:][drop] = 0
    return np.minimum(counts, 255).astype(np.uint8)


def _rows(
    rows: int,
    rng: np.random.Generator,
    neurons: tuple[int, int],
    bins: tuple[int, int],
    subjects: int,
    sources: int,
    max_values: int,
    refractory: float,
) -> Iterator[tuple[np.ndarray, str, str, str, str]]:
    """(counts, subject_id, session_id, segment_id, source_dataset) for `rows` rows."""
    made, session = 0, 0
    while made < rows:
        n = int(rng.integers(neurons[0], neurons[1] + 1))
        t = int(rng.integers(bins[0], bins[1] + 1))
        counts = _session(rng, n, t, refractory)
        subject = f"subject-{session % subjects:02d}"
        bins_per_segment = max(1, max_values // n)
        for seg, start in enumerate(range(0, t, bins_per_segment)):
            if made == rows:
                break
            yield (
                counts[:, start : start + bins_per_segment],
                subject,
                f"{subject}-session-{session:04d}",
                f"segment_{seg}",
                f"synthetic_{session % sources}",
            )
            made += 1
        session += 1


def _record_batch(rows: list[tuple[np.ndarray, str, str, str, str]]) -> pa.RecordBatch:
    mats = [r[0] for r in rows]
    n_neurons = np.array([m.shape[0] for m in mats])
    row_bins = np.repeat([m.shape[1] for m in mats], n_neurons)  # (total neurons,)
    outer = np.concatenate([[0], np.cumsum(n_neurons)]).astype(np.int32)
    inner = np.concatenate([[0], np.cumsum(row_bins)]).astype(np.int32)
    values = np.concatenate([m.ravel() for m in mats])  # neuron-major, row after row
    spikes = pa.ListArray.from_arrays(
        pa.array(outer), pa.ListArray.from_arrays(pa.array(inner), pa.array(values))
    )
    columns = [spikes] + [pa.array([r[i] for r in rows], pa.string()) for i in range(1, 5)]
    return pa.RecordBatch.from_arrays(columns, schema=_SCHEMA)


def _split_dataset(name: str, rows: int, rng: np.random.Generator, **kw):
    from datasets import Dataset, DatasetInfo, Features, NamedSplit
    from datasets.table import InMemoryTable

    batches, pending, pending_values = [], [], 0
    for row in _rows(rows, rng, **kw):
        pending.append(row)
        pending_values += row[0].size
        if pending_values >= _BATCH_VALUES:
            batches.append(_record_batch(pending))
            pending, pending_values = [], 0
    if pending:
        batches.append(_record_batch(pending))
    table = pa.Table.from_batches(batches, schema=_SCHEMA)
    features = Features.from_arrow_schema(_SCHEMA)  # Sequence(Sequence(uint8)) + strings
    info = DatasetInfo(description="titan synthetic spike data", features=features)
    return Dataset(InMemoryTable(table), info=info, split=NamedSplit(name))


def generate(
    out: str | os.PathLike,
    rows: int = 64,
    seed: int = 0,
    *,
    test_rows: int | None = None,
    neurons: tuple[int, int] = (8, 64),
    bins: tuple[int, int] = (64, 1024),
    subjects: int = 4,
    sources: int = 2,
    max_values: int = 10_000_000,
    refractory: float = 0.5,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic dataset to `out` (atomically) unless it exists; return `out`."""
    out = Path(out)
    if test_rows is None:
        test_rows = default_test_rows(rows)
    if rows <= 0 or test_rows <= 0:
        raise ValueError(f"rows = {rows}, test_rows = {test_rows}: must be positive")
    if not 1 <= neurons[0] <= neurons[1] or not 1 <= bins[0] <= bins[1]:
        raise ValueError(f"neurons {neurons}, bins {bins}: need 1 <= MIN <= MAX")
    if out.exists() and not overwrite:
        return out
    params = dict(
        rows=rows,
        test_rows=test_rows,
        seed=seed,
        neurons=list(neurons),
        bins=list(bins),
        subjects=subjects,
        sources=sources,
        max_values=max_values,
        refractory=refractory,
    )
    from datasets import DatasetDict

    kw = dict(
        neurons=neurons,
        bins=bins,
        subjects=subjects,
        sources=sources,
        max_values=max_values,
        refractory=refractory,
    )
    splits = DatasetDict(
        {
            name: _split_dataset(name, n, np.random.default_rng([seed, code]), **kw)
            for code, (name, n) in enumerate([("train", rows), ("test", test_rows)])
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with quiet_datasets():
            splits.save_to_disk(str(tmp), max_shard_size="256MB")
        (tmp / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
        _move_into_place(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename `tmp` to `out`; an existing `out` is kept unless `overwrite`."""
    old = None
    if out.exists() and overwrite:
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if not out.exists():  # a real failure, not another writer that finished first
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_params(path: str | os.PathLike) -> dict | None:
    """The generation parameters stored with a synthetic dataset, or None."""
    f = Path(path) / PARAMS_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output folder (DatasetDict, save_to_disk)")
    p.add_argument("--rows", type=int, default=64, help="rows of the train split")
    p.add_argument(
        "--test-rows",
        type=int,
        default=None,
        help="rows of the test split (default: a tenth of --rows, at least 4)",
    )
    for flag, default, what in (
        ("--neurons", (8, 64), "neurons per session"),
        ("--bins", (64, 1024), "20 ms time bins per session"),
    ):
        p.add_argument(
            flag,
            type=int,
            nargs=2,
            default=default,
            metavar=("MIN", "MAX"),
            help=f"{what} (uniform)",
        )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subjects", type=int, default=4, help="distinct subject_id values")
    p.add_argument("--sources", type=int, default=2, help="distinct source_dataset values")
    p.add_argument(
        "--max-values",
        type=int,
        default=10_000_000,
        help="sessions with more counts are cut into segments of at most this many",
    )
    p.add_argument(
        "--refractory",
        type=float,
        default=0.5,
        help="probability that a spike in the bin after a spike is removed",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    a = p.parse_args(argv)
    positive = {"--rows": a.rows, "--subjects": a.subjects, "--sources": a.sources}
    positive |= {
        "--max-values": a.max_values,
        "--test-rows": 1 if a.test_rows is None else a.test_rows,
    }
    for flag, value in positive.items():
        if value < 1:
            p.error(f"{flag} {value}: must be at least 1")
    for flag, (low, high) in (("--neurons", a.neurons), ("--bins", a.bins)):
        if not 1 <= low <= high:
            p.error(f"{flag} {low} {high}: need 1 <= MIN <= MAX")
    if a.seed < 0:
        p.error(f"--seed {a.seed}: must be >= 0")
    if not 0 <= a.refractory <= 1:
        p.error(f"--refractory {a.refractory}: must be in [0, 1]")
    out = Path(a.out)
    if out.exists() and not a.overwrite:
        print(f"{out} exists; keeping it (pass --overwrite to replace it)")
        return 0
    t0 = time.perf_counter()
    generate(
        out,
        a.rows,
        a.seed,
        test_rows=a.test_rows,
        neurons=tuple(a.neurons),
        bins=tuple(a.bins),
        subjects=a.subjects,
        sources=a.sources,
        max_values=a.max_values,
        refractory=a.refractory,
        overwrite=a.overwrite,
    )
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(
        f"wrote {out}: {a.rows} train rows, "
        f"{a.test_rows or default_test_rows(a.rows)} test rows, "
        f"{size / 1e9:.3f} GB in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
