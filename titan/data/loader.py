"""The training data loader: rows of a Neural Pile split, sharded over data-parallel ranks,
tokenized (docs/design.md §1), packed into `(inputs, labels)` batches by a background thread, and
resumable from a small state in constant time.

    loader = build_dataloader(cfg, dp_rank, dp_world)
    inputs, labels = next(iter(loader))      # LongTensor (batch_size, seq_len) each
    state = loader.state_dict()              # what the trainer has consumed so far

**Units and order.** The split is cut into *units*: single rows (map-style) or shards
(streaming: `data.stream_shards` contiguous pieces of a local dataset, or the row groups /
files of a streamed Hub or parquet source). Every epoch has a global order of the units,
a seeded permutation (`training.seed`, epoch) when `data.shuffle` is set; rows inside a
shard keep their stored order (a shuffle buffer could not resume exactly). Rank `r` of
`W` reads the units at global positions `r, r + W, r + 2W, ...`, so the ranks read
disjoint rows and together every row once per epoch. Tensor/context-parallel peers of a
rank pass the same `dp_rank` and get identical batches.

**Packing.** The rank's valid rows are tokenized and concatenated into one stream (epochs
follow each other without a gap) that is cut into windows of `seq_len + 1` tokens:
`inputs = w[:-1]`, `labels = w[1:]`, `batch_size` windows per batch.

**State.** A batch's state is the position of the next token: epoch, unit position, row
inside the unit, token offset inside the row, and for streamed units the
`IterableDataset.state_dict()` taken just before that row. Resuming seeks there: no
consumed row is read again except the one the position points into (plus, when
streaming, what `datasets` skips inside that one shard), whatever the position. Since
positions count tokens, a resume may even change `batch_size` or `seq_len`.

**Another data-parallel degree.** `load_state_dict({"resharded_from": [old states]})`
records every old rank's position as a "layer": a unit at global position `g` in epoch
`e` counts as consumed when old rank `g mod W_old` had passed it; a unit an old rank was
inside is continued at its row and token offset. New ranks then read the units they own
in the new layout and skip consumed ones, so no row is repeated or skipped. Layers are
dropped from the state once every epoch they describe is over.

**Bad rows** (`spike_counts` not a non-empty 2-D matrix of integers in 0..255) are skipped
with a counted warning. **Fewer units than ranks**: rank `r` reads the units of rank
`r mod n_units` (so some rows are read by several ranks) and a warning says so; nothing
hangs. A rank that finds no usable row in a whole epoch raises `ConfigError`.
"""

from __future__ import annotations

import copy
import queue
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from titan.config import ConfigError, JobConfig
from titan.data import sources
from titan.data.reader import MapUnits, Position, RowReader, StreamUnits
from titan.logging import logger

_END = "end"


class SpikeDataLoader:
    """Iterable of `(inputs, labels)` LongTensor batches (batch_size, seq_len), infinite
    unless built with `infinite=False`; see the module docstring for order and state."""

    def __init__(self, reader: RowReader, *, batch_size: int, seq_len: int, prefetch: int):
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._exhausted = False
        self.reader = reader
        self.batch_size, self.seq_len, self.prefetch = batch_size, seq_len, prefetch
        self.dp_rank, self.dp_world = reader.dp_rank, reader.dp_world
        self._start = reader.start()
        self._consumed = reader.state(self._start)

    @property
    def bad_rows(self) -> int:
        """Rows skipped because their spike_counts is not a valid matrix (running count)."""
        return self.reader.bad_rows

    @property
    def rows_read(self) -> int:
        """Rows tokenized by this loader, prefetch and resumes included."""
        return self.reader.rows_read

    # -------------------------------------------------------------- iteration

    def __iter__(self) -> SpikeDataLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._exhausted:
            raise StopIteration
        if self._thread is None:
            self._start_worker()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item[0] == _END:
            for msg in item[1]:
                logger.info(msg)
            self.close()
            self._exhausted = True
            raise StopIteration
        inputs, labels, state, messages = item
        self._consumed = state
        for msg in messages:
            logger.info(msg)
        return inputs, labels

    def close(self) -> None:
        """Stop the background thread; iterating again goes on after the last batch handed
        out (prefetched ones are read again), and the loader can still be restored."""
        if self._thread is not None:
            self._stop_event.set()
            self._thread.join()
            self._thread = None
            self._start = Position.from_state(self._consumed)

    def __del__(self) -> None:
        # the thread holds the reader, not the loader, so an unused loader is collected
        # and its thread told to stop
        self._stop_event.set()

    # -------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out (prefetched batches do not count)."""
        return copy.deepcopy(self._consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` of this rank, or, with `{"resharded_from": [state
        of old rank 0, 1, ...]}`, from the states of a run with another data-parallel degree."""
        self.close()
        self._exhausted = False
        if "resharded_from" in state:
            olds = list(state["resharded_from"])
            if len(olds) != self.dp_world:
                self._start = self.reader.reshard(olds)
                self._consumed = self.reader.state(self._start)
                return
            self.reader.check_states(olds)
            state = olds[self.dp_rank]
        self._start = self.reader.restore(state)
        self._consumed = copy.deepcopy(state)

    def trace_rows(self, epochs: int = 1) -> list[tuple[int, Any, int]]:
        """(epoch, row id, first token offset) of the rows this loader reads from its current
        state through the end of `epochs` epochs; row ids are dataset row indices
        (map-style) or (shard, row in shard) (streaming). For tests and debugging: it reads
        and tokenizes those rows but does not move the loader (call it while not iterating)."""
        start = Position.from_state(self._consumed)
        out = []
        for _, pos in self.reader.rows(start, []):
            if pos.epoch >= start.epoch + epochs:
                break
            unit = int(self.reader.order(pos.epoch)[pos.unit])
            out.append((pos.epoch, self.reader.units.row_id(unit, pos.row), pos.offset))
        return out

    # -------------------------------------------------------------- worker

    def _start_worker(self) -> None:
        self._stop_event = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(
            target=_produce,
            args=(
                self.reader,
                self._start,
                self.batch_size,
                self.seq_len,
                self._queue,
                self._stop_event,
            ),
            name=f"titan-data-rank{self.dp_rank}",
            daemon=True,
        )
        self._thread.start()


def _produce(
    reader: RowReader,
    start: Position,
    batch_size: int,
    seq_len: int,
    q: queue.Queue,
    stop: threading.Event,
) -> None:
    """Fill `q` with (inputs, labels, state after the batch, log lines) until stopped."""
    size = batch_size * (seq_len + 1)
    pin = torch.cuda.is_available()
    messages: list[str] = []
    try:
        buf, filled = np.empty(size, dtype=np.uint8), 0
        for tokens, pos in reader.rows(start, messages):
            offset = pos.offset
            while offset < len(tokens):
                take = min(len(tokens) - offset, size - filled)
                buf[filled : filled + take] = tokens[offset : offset + take]
                filled, offset = filled + take, offset + take
                if filled == size:
                    windows = buf.reshape(batch_size, seq_len + 1)  # (batch, seq_len + 1)
                    state = reader.state(replace(pos, offset=offset))
                    if not _put(q, stop, (*_tensors(windows, pin), state, messages[:])):
                        return
                    buf, filled = np.empty(size, dtype=np.uint8), 0
                    messages.clear()  # the list `reader.rows` appends to
        _put(q, stop, (_END, messages))
    except BaseException as e:  # hand it to the consumer, which re-raises it
        _put(q, stop, e)


def _tensors(windows: np.ndarray, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, seq_len + 1) uint8 windows to contiguous int64 inputs and labels, in pinned
    memory when `pin` (a GPU will copy them)."""
    batch, seq_len = windows.shape[0], windows.shape[1] - 1
    inputs = np.empty((batch, seq_len), dtype=np.int64)  # (batch, seq_len)
    labels = np.empty((batch, seq_len), dtype=np.int64)  # (batch, seq_len)
    inputs[:] = windows[:, :-1]
    labels[:] = windows[:, 1:]
    x, y = torch.from_numpy(inputs), torch.from_numpy(labels)
    if pin:
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


def _put(q: queue.Queue, stop: threading.Event, item: Any) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


# ----------------------------------------------------------------------------- builders


def build_dataloader(
    cfg: JobConfig,
    dp_rank: int,
    dp_world: int,
    *,
    infinite: bool = True,
) -> SpikeDataLoader:
    """The loader of data-parallel rank `dp_rank` of `dp_world` (plain integers) for
    `cfg`'s dataset and `data.split`; finite (one epoch) if not `infinite`."""
    t, d = cfg.training, cfg.data
    src, split = sources.resolve_source(cfg), d.split
    ds = sources.open_split(src, split, d.streaming, d.source_datasets, key="data.split")
    label = f"{src.label} [{split}]"
    keep = set(d.source_datasets)
    has = ["no rows"]  # the sources there are, for messages (not counted when streaming)
    if d.streaming:
        import datasets

        n = min(len(ds), d.stream_shards) if isinstance(ds, datasets.Dataset) else ds.num_shards
        units: MapUnits | StreamUnits = StreamUnits(ds, n, keep, label)
    else:
        rows = np.arange(len(ds))
        if keep:
            column = ds.with_format("arrow")[sources.SOURCE_COLUMN]
            rows = np.flatnonzero(pc.is_in(column, pa.array(sorted(keep))).to_numpy(False))
            has = sources.source_values(ds)
            if rows.size and (missing := sorted(keep - set(has))):  # (none kept: said below)
                raise ConfigError(
                    f"{label}: data.source_datasets names {', '.join(missing)}, which no row "
                    f"has (a typo?); it has: {', '.join(has)}"
                )
        units = MapUnits(ds, rows)
    if units.num_units == 0:
        raise ConfigError(
            f"{label}: nothing to read"
            + (f": no row has source_dataset in {sorted(keep)}; it has: {', '.join(has)}"
               if keep else "")
        )  # fmt: skip
    fingerprint = (
        f"{units.kind} split={split} units={units.num_units} seed={t.seed} shuffle={d.shuffle} "
        f"source_datasets={','.join(sorted(keep)) or 'all'}"
    )
    reader = RowReader(
        units,
        label=label,
        source=src.location if src.kind == "hub" else str(Path(src.location).resolve()),
        fingerprint=fingerprint,
        seed=t.seed,
        shuffle=d.shuffle,
        dp_rank=dp_rank,
        dp_world=dp_world,
        infinite=infinite,
    )
    return SpikeDataLoader(reader, batch_size=t.batch_size, seq_len=t.seq_len, prefetch=d.prefetch)


def prepare_dataset(cfg: JobConfig) -> None:
    """Make the dataset ready before any rank builds a loader (call it on rank 0, then a
    barrier): generate the synthetic dataset if it is missing (into `data_cache/synthetic-...`,
    or into `training.dataset_path` only with `data.generate_synthetic`), and check that the
    source exists and has the split and the `spike_counts` column (`ConfigError` otherwise)."""
    from titan.data import synthetic

    src = sources.resolve_source(cfg)  # refuses a dataset path of the wrong kind
    if cfg.training.dataset == "synthetic":
        path = sources.synthetic_path(cfg)
        rows, seed = cfg.data.synthetic_rows, cfg.training.seed
        if not path.exists():
            logger.info(
                f"data: generating the synthetic dataset ({rows} train rows, seed {seed}) in {path}"
            )
            synthetic.generate(path, rows=rows, seed=seed)
        else:
            params = synthetic.read_params(path)
            if params is not None and (params["rows"], params["seed"]) != (rows, seed):
                logger.warning(
                    f"data: using the existing synthetic dataset {path} ({params['rows']} rows, "
                    f"seed {params['seed']}), not the configured {rows} rows, seed {seed}; "
                    "delete the folder to regenerate it"
                )
    d = cfg.data
    sources.open_split(src, d.split, d.streaming, d.source_datasets, key="data.split")
