"""Held-out data for evaluation: a split read in its stored order, tokenized as for
training, concatenated into one stream and cut into windows of `seq_len + 1` tokens that
overlap by one token, so every token after the first is a label exactly once.

    data = HeldOut.open(cfg, split="test")
    for inputs, labels, sources in data.batches(dp_rank, dp_world, batch_size, n_windows):
        ...   # (batch, seq_len) int64 each; labels -100 where padded

The windows are defined over the whole split, and window j goes to data-parallel rank
j mod W, so every number of ranks sees the same windows (and evaluation on 1 and N ranks
gives the same losses). Every rank runs the same number of batches: windows past the end
are padding, labelled -100 (ignored). `sources` gives, per label, the index of its row's
`source_dataset` in `source_names` (-1 for padding), for per-source losses.

Row lengths come from the Arrow list offsets (no row is read for them); a row that is not
a non-empty 2-D matrix (ragged, empty, null) is left out, as training skips it. A row whose
shape is right but whose values are not (null counts, counts above 255) is found only when
it is read: its tokens keep their place in the stream but are never labels (every rank
reads the same rows the same way, so the windows stay rank-invariant); a warning names it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from titan.config import ConfigError, JobConfig
from titan.data import sources
from titan.data.tokenizer import arrow_row_matrix, tokenize_row
from titan.logging import logger

IGNORE = -100
"""Label of padding (PyTorch's cross-entropy ignore_index)."""
NO_SOURCE = sources.NO_SOURCE


def _row_lengths(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens per row, whether the row is a usable matrix) from list offsets alone: a
    usable row has neurons, and every neuron the same non-zero number of time bins."""
    lengths, usable = [], []
    for chunk in column.chunks:
        neurons = pc.list_value_length(chunk).fill_null(0).to_numpy(zero_copy_only=False)
        bins = pc.list_value_length(chunk.flatten()).fill_null(-1).to_numpy(zero_copy_only=False)
        ok = neurons > 0
        first = np.zeros(len(neurons), dtype=np.int64)
        if len(bins) and ok.any():
            # each row's segment of the per-neuron bin counts: the rows with neurons start
            # segments, and the rows without add none, so each segment is exactly one row's
            starts = (np.cumsum(neurons) - neurons)[ok]
            same = np.minimum.reduceat(bins, starts) == np.maximum.reduceat(bins, starts)
            first[ok] = bins[starts]
            ok[ok] = same
            ok &= first > 0
        lengths.append(np.where(ok, first * (neurons + 1), 0))
        usable.append(ok)
    return np.concatenate(lengths).astype(np.int64), np.concatenate(usable)


@dataclass
class HeldOut:
    """A split's token stream as windows (see the module docstring)."""

    ds: object
    """The map-style split (Arrow format)."""
    label: str
    seq_len: int
    rows: np.ndarray
    """Dataset row index of each usable row, in stream order."""
    offsets: np.ndarray
    """Stream position of each usable row's first token; the last entry is the total."""
    row_source: np.ndarray
    """Index into source_names of each usable row."""
    source_names: list[str]
    bad_rows: set[int] = field(default_factory=set)
    """Rows found unreadable when read (already warned about)."""

    @classmethod
    def open(cls, cfg: JobConfig, split: str, key: str | None = None) -> HeldOut:
        """The split `split` of the run's dataset (with its data.source_datasets filter);
        `key` is the setting that chose it, for the message when it is missing."""
        src = sources.resolve_source(cfg)
        keep, extra = cfg.data.source_datasets, (sources.SOURCE_COLUMN,)
        ds = sources.open_split(src, split, False, keep, extra_columns=extra, key=key)
        table = ds.with_format("arrow")
        lengths, usable = _row_lengths(table[sources.COLUMN])
        if sources.SOURCE_COLUMN in ds.column_names:
            column = pc.fill_null(table[sources.SOURCE_COLUMN], NO_SOURCE)
            names_per_row = column.to_numpy(zero_copy_only=False)
        else:
            names_per_row = np.array(["all"] * len(ds), dtype=object)
        if keep:
            usable &= np.isin(names_per_row, keep)
        rows = np.flatnonzero(usable)
        if len(rows) == 0:
            raise ConfigError(f"{src.label} [{split}]: no usable row to evaluate on")
        names = sorted(set(names_per_row[rows].tolist()))
        index = {n: i for i, n in enumerate(names)}
        return cls(
            ds=table,
            label=f"{src.label} [{split}]",
            seq_len=cfg.training.seq_len,
            rows=rows,
            offsets=np.concatenate([[0], np.cumsum(lengths[rows])]),
            row_source=np.array([index[n] for n in names_per_row[rows]], dtype=np.int64),
            source_names=names,
        )

    @property
    def total_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_windows(self) -> int:
        """Windows that cover every label of the stream once."""
        return max(1, math.ceil((self.total_tokens - 1) / self.seq_len))

    def describe(self, n: int) -> str:
        """`n` of the split's windows, as the dry runs say it."""
        return f"{self.label}, {n:,} of its {self.num_windows:,} windows of {self.seq_len} tokens"

    def windows_for(self, steps: int, max_tokens: int, dp_world: int, batch_size: int) -> int:
        """How many windows an evaluation reads: all of them, or fewer when `steps`
        (batches per rank) or `max_tokens` (labels in all, rounded down to whole windows;
        at least one) is set (> 0)."""
        n = self.num_windows
        if steps > 0:
            n = min(n, steps * dp_world * batch_size)
        if max_tokens > 0:
            n = min(n, max(1, max_tokens // self.seq_len))
        return n

    def _tokens(self, start: int, stop: int, cache: dict) -> tuple[np.ndarray, np.ndarray]:
        """Stream tokens [start, stop) and their rows' source indices (-1: an unreadable
        row's placeholder tokens)."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        tokens, source = [], []
        i, pos = first, start
        while pos < stop and i < len(self.rows):
            if i not in cache:
                cache.clear()  # keep one row: a rank's windows walk the stream in order
                row = int(self.rows[i])
                cell = self.ds[row][sources.COLUMN]  # a 1-row Arrow column
                counts, why = arrow_row_matrix(pa.concat_arrays(cell.chunks))
                if counts is None and row not in self.bad_rows:
                    self.bad_rows.add(row)
                    logger.warning(f"{self.label}: row {row} left out of the losses: {why}")
                cache[i] = None if counts is None else tokenize_row(counts)
            row_tokens = cache[i]
            lo, hi = pos - self.offsets[i], min(stop, self.offsets[i + 1]) - self.offsets[i]
            if row_tokens is None:
                tokens.append(np.zeros(hi - lo, dtype=np.int64))
                source.append(np.full(hi - lo, -1))
            else:
                tokens.append(row_tokens[lo:hi])
                source.append(np.full(hi - lo, self.row_source[i]))
            pos, i = self.offsets[i] + hi, i + 1
        return np.concatenate(tokens), np.concatenate(source)

    def batches(
        self, dp_rank: int, dp_world: int, batch_size: int, n_windows: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This rank's batches of (inputs, labels, sources), each (batch, seq_len); every
        rank yields ceil(n_windows / (dp_world * batch_size)) batches."""
        s = self.seq_len
        n_batches = math.ceil(n_windows / (dp_world * batch_size))
        cache: dict = {}
        for b in range(n_batches):
            inputs = np.zeros((batch_size, s), dtype=np.int64)  # (batch, seq_len)
            labels = np.full((batch_size, s), IGNORE, dtype=np.int64)  # (batch, seq_len)
            source = np.full((batch_size, s), -1, dtype=np.int64)  # (batch, seq_len)
            for k in range(batch_size):
                j = (b * batch_size + k) * dp_world + dp_rank  # the global window index
                if j >= n_windows:
                    continue  # padding: this rank still runs the batch
                start = j * s
                tokens, src = self._tokens(start, min(start + s + 1, self.total_tokens), cache)
                n = len(tokens) - 1
                inputs[k, : n + 1] = tokens[:s]
                # (int64 first: -100 in a uint8 array would wrap to 156)
                labels[k, :n] = np.where(src[1:] >= 0, tokens[1:].astype(np.int64), IGNORE)
                source[k, :n] = src[1:]
            yield torch.from_numpy(inputs), torch.from_numpy(labels), torch.from_numpy(source)
