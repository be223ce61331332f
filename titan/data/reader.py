"""Which rows a data-parallel rank reads, in what order, from which position: the units of
a split (rows or shards), the per-epoch order, the rank's share, positions as small state
dicts, and the layers that a restore onto another data-parallel degree leaves behind.
`titan.data.loader`'s docstring describes the scheme; this module has no threads and
makes no tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from titan.config import ConfigError
from titan.data import sources
from titan.data.tokenizer import arrow_row_matrix, tokenize_row
from titan.logging import logger

STATE_VERSION = 2
"""Version of the loader state layout (1 stored the positions of layers as 5-item lists)."""
_MAX_BAD_ROW_WARNINGS = 10


@dataclass(frozen=True)
class Position:
    """Where the next token comes from. Its state dict (`to_state`) is the one shape a
    position has in a loader state, in the layers of a resharded state and on disk."""

    epoch: int
    unit: int
    """Global position of the unit in the epoch's order."""
    row: int = 0
    """Row inside the unit (always 0 for map-style units)."""
    offset: int = 0
    """Tokens of that row already consumed."""
    unit_state: dict | None = None
    """Streaming: the unit's IterableDataset state just before that row (None: its start)."""

    @property
    def inside_unit(self) -> bool:
        return self.row > 0 or self.offset > 0 or self.unit_state is not None

    def to_state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Position:
        """The position in a `to_state()` dict (or in a loader state, which contains one)."""
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls)})


def _upgraded(state: dict[str, Any]) -> dict[str, Any]:
    """A version-1 state (layer positions stored as 5-item lists) in the current layout."""
    if state.get("version") != 1:
        return state
    layers = [
        {"dp_world": la["dp_world"], "positions": [Position(*r).to_state() for r in la["ranks"]]}
        for la in state["layers"]
    ]
    return {**state, "version": STATE_VERSION, "layers": layers}


# ----------------------------------------------------------------------------- units


def _cell(table: pa.Table) -> pa.Array:
    """The `spike_counts` value of a 1-row table as a length-1 array."""
    col = table.column(sources.COLUMN)
    return col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)


class MapUnits:
    """Map-style: one unit per (kept) row of a memory-mapped Arrow dataset."""

    kind = "map"

    def __init__(self, ds: Any, rows: np.ndarray):
        self._ds = ds.select_columns([sources.COLUMN]).with_format("arrow")
        self._rows = rows  # (units,) dataset row index of each unit
        self.num_units = len(rows)

    def row_id(self, unit: int, row: int) -> int:
        return int(self._rows[unit])

    def read(self, unit: int, unit_state: dict | None, row: int) -> Iterator[tuple]:
        """(cell, or None when filtered out; unit state before the row; row index) per row,
        from row `row` (whose state is `unit_state`) on."""
        yield _cell(self._ds[int(self._rows[unit])]), None, 0


class StreamUnits:
    """Streaming: one unit per shard, read as an `IterableDataset` in Arrow format."""

    kind = "stream"

    def __init__(self, ds: Any, num_units: int, keep: set[str], label: str):
        self._ds = ds  # a local Dataset (cut into shards here) or a streamed IterableDataset
        self._keep, self._label = keep, label
        self.num_units = num_units

    def row_id(self, unit: int, row: int) -> tuple[int, int]:
        return unit, row

    def _unit_dataset(self, unit: int) -> Any:
        import datasets

        if isinstance(self._ds, datasets.Dataset):
            piece = self._ds.shard(num_shards=self.num_units, index=unit, contiguous=True)
            return piece.to_iterable_dataset(num_shards=1)
        return self._ds.shard(num_shards=self.num_units, index=unit, contiguous=True)

    def read(self, unit: int, unit_state: dict | None, row: int) -> Iterator[tuple]:
        ds = self._unit_dataset(unit).with_format("arrow")
        if unit_state is not None:
            ds.load_state_dict(unit_state)
        before = unit_state
        for table in ds:  # 1-row pa.Table each
            if sources.COLUMN not in table.column_names:
                raise ConfigError(
                    f"{self._label}: no column {sources.COLUMN!r}; its columns are: "
                    f"{', '.join(table.column_names)}"
                )
            sources.check_column_type(self._label, table.column(sources.COLUMN).type)
            kept = not self._keep or table.column(sources.SOURCE_COLUMN)[0].as_py() in self._keep
            yield (_cell(table) if kept else None), before, row
            before = ds.state_dict()  # the state after this row = before the next one
            row += 1


# ----------------------------------------------------------------------------- reader


class RowReader:
    """The rows of data-parallel rank `dp_rank` of `dp_world`, tokenized, from a position."""

    def __init__(
        self,
        units: MapUnits | StreamUnits,
        *,
        label: str,
        source: str,
        fingerprint: str,
        seed: int,
        shuffle: bool,
        dp_rank: int,
        dp_world: int,
        infinite: bool,
    ):
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank = {dp_rank}, dp_world = {dp_world}: need 0 <= rank < world")
        self.units, self.label, self.fingerprint = units, label, fingerprint
        self.source = source
        """Where the rows come from (a Hub id or a resolved path), saved with the position."""
        self.seed, self.shuffle, self.infinite = seed, shuffle, infinite
        self.dp_rank, self.dp_world = dp_rank, dp_world
        n = units.num_units
        # fewer units than ranks: rank r reads what rank r mod n would read
        self.world = min(dp_world, n)
        self.rank = dp_rank % self.world
        if n < dp_world:
            logger.warning(
                f"data: {label} has {n} {units.kind} units for {dp_world} data-parallel ranks; "
                f"rank {dp_rank} reads the rows of rank {self.rank}, so rows repeat across ranks"
            )
        self.layers: list[dict] = []
        self.bad_rows = 0
        self.rows_read = 0
        self.trained_before = False
        """Restored from a saved position: the data served this run before."""
        self._order_cache: tuple[int, np.ndarray] | None = None

    def start(self) -> Position:
        return Position(0, self.rank)

    # -------------------------------------------------------------- state

    def state(self, pos: Position) -> dict[str, Any]:
        """The state dict of a position (plain ints, strings, lists and dicts)."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "source": self.source,
            "dp_rank": self.dp_rank,
            "dp_world": self.dp_world,
            **pos.to_state(),
            "layers": [
                layer
                for layer in self.layers
                if max(p["epoch"] for p in layer["positions"]) >= pos.epoch
            ],
        }

    def restore(self, state: dict[str, Any]) -> Position:
        """The position of one of this rank's own states (same data-parallel degree)."""
        state = _upgraded(state)
        self.check_states([state])
        if (state["dp_world"], state["dp_rank"]) != (self.dp_world, self.dp_rank):
            raise ValueError(
                f"data loader state of rank {state['dp_rank']} of {state['dp_world']} given to "
                f"rank {self.dp_rank} of {self.dp_world}; for another data-parallel degree pass "
                "{'resharded_from': [states of all old ranks]}"
            )
        self.layers = list(state["layers"])
        self.trained_before = True
        return Position.from_state(state)

    def reshard(self, olds: list[dict[str, Any]]) -> Position:
        """The start position after the old ranks' states (another data-parallel degree)."""
        olds = [_upgraded(s) for s in olds]
        self.check_states(olds)
        old_world = olds[0]["dp_world"]
        eff = min(old_world, self.units.num_units)  # the old ranks that had their own units
        positions = [Position.from_state(s).to_state() for s in olds[:eff]]
        layers: list[dict] = []
        for s in sorted(olds, key=lambda s: -len(s["layers"])):
            layers += [layer for layer in s["layers"] if layer not in layers]
        self.layers = layers + [{"dp_world": eff, "positions": positions}]
        self.trained_before = True
        epoch = min(p["epoch"] for p in positions)
        owned = range(self.rank, self.units.num_units, self.world)
        looked = [self.lookup(epoch, g) for g in owned]
        done = sum(d for d, _ in looked)
        partial = sum(p is not None for _, p in looked)
        logger.info(
            f"data: resharded the loader state of {old_world} data-parallel ranks onto "
            f"{self.dp_world}: rank {self.dp_rank} continues epoch {epoch}, skipping {done} of "
            f"its {len(owned)} units that old ranks had read and continuing {partial} partly "
            "read ones at their row and token offset; no row is repeated or skipped"
        )
        return Position(epoch, self.rank)

    def check_states(self, states: list[dict[str, Any]]) -> None:
        for s in states:
            if s.get("version") != STATE_VERSION or "fingerprint" not in s:
                raise ConfigError(
                    f"data loader state {sorted(s)} is not a titan data loader state "
                    f"(version {STATE_VERSION})"
                )
            if s["fingerprint"] != self.fingerprint:
                raise ConfigError(
                    f"the data loader state was saved for [{s['fingerprint']}] but this run reads "
                    f"[{self.fingerprint}]; set checkpoint.exclude_from_loading = ['dataloader'] "
                    "to restart the data from the beginning"
                )
        # Data of the same fingerprint elsewhere (a moved folder, or other data with as many
        # units): the position carries over, but say so (states before this key: silent).
        others = sorted(
            {s["source"] for s in states if s.get("source", self.source) != self.source}
        )
        if others and self.dp_rank == 0:
            logger.warning(
                f"data: the saved loader position was reading {', '.join(others)}; this run "
                f"reads {self.source}, whose fingerprint [{self.fingerprint}] matches: "
                "continuing at that position; set checkpoint.exclude_from_loading = "
                "['dataloader'] to start the data from the beginning instead"
            )
        worlds = {s["dp_world"] for s in states}
        if len(states) > 1 and (
            worlds != {len(states)} or [s["dp_rank"] for s in states] != list(range(len(states)))
        ):
            raise ValueError(
                f"resharded_from needs the states of ranks 0..{len(states) - 1} of one run, got "
                f"ranks {[s['dp_rank'] for s in states]} of worlds {sorted(worlds)}"
            )

    def lookup(self, epoch: int, g: int) -> tuple[bool, tuple | None]:
        """Whether earlier layouts consumed unit position `g` of `epoch`, and, when one was
        inside it, (row, offset, unit_state) to continue from (the newest layer wins)."""
        partial = None
        for layer in self.layers:
            p = Position.from_state(layer["positions"][g % layer["dp_world"]])
            if epoch < p.epoch or (epoch == p.epoch and g < p.unit):
                return True, None
            if epoch == p.epoch and g == p.unit and p.inside_unit:
                partial = (p.row, p.offset, p.unit_state)
        return False, partial

    # -------------------------------------------------------------- rows

    def order(self, epoch: int) -> np.ndarray:
        """Unit index at each global position of the epoch."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = self.units.num_units
            order = (
                np.random.default_rng([self.seed, epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def rows(self, start: Position, messages: list[str]) -> Iterator[tuple[np.ndarray, Position]]:
        """Tokens of this rank's valid rows from `start` on, each with the position of its
        first token to use (its offset counts the tokens already consumed). Epoch-end lines
        are appended to `messages`."""
        epoch = start.epoch
        fresh = start == self.start() and not self.trained_before
        while True:
            resuming = epoch == start.epoch and not fresh  # its epoch began in an earlier run
            first = start.unit if resuming else self.rank
            order = self.order(epoch)
            rows = tokens = bad = filtered = consumed = 0
            for g in range(first, self.units.num_units, self.world):
                if resuming and g == start.unit and start.inside_unit:
                    row, offset, unit_state = start.row, start.offset, start.unit_state
                else:
                    done, partial = self.lookup(epoch, g)
                    if done:
                        consumed += 1
                        continue
                    row, offset, unit_state = partial or (0, 0, None)
                unit = int(order[g])
                for cell, before, r in self.units.read(unit, unit_state, row):
                    if cell is None:
                        filtered += 1
                        continue
                    counts, why = arrow_row_matrix(cell)
                    if counts is None:
                        bad += 1
                        self._warn_bad_row(unit, r, why)
                        continue
                    out = tokenize_row(counts)
                    self.rows_read += 1
                    rows += 1
                    tokens += len(out)
                    yield out, Position(epoch, g, r, offset if r == row else 0, before)
            messages.append(
                f"data: rank {self.dp_rank} finished epoch {epoch} of {self.label}: {rows} rows, "
                f"{tokens:,} tokens, {bad} bad rows skipped"
                + (f", {filtered} rows filtered out by data.source_datasets" if filtered else "")
            )
            # A whole epoch without a row (none of them read under an earlier layout) ends
            # the run when no later epoch can do better: without shuffling this rank gets
            # the same units every epoch; with it, only when the data never served a row
            # here (once it did, usable rows exist, and one epoch can hand this rank only
            # bad or filtered ones).
            hopeless = not self.shuffle or (self.rows_read == 0 and not self.trained_before)
            if rows == 0 and not resuming and consumed == 0 and hopeless:
                raise ConfigError(
                    f"{self.label}: data-parallel rank {self.dp_rank} of {self.dp_world} found no "
                    f"usable row in a whole epoch ({bad} bad, {filtered} filtered out by "
                    "data.source_datasets)"
                )
            if not self.infinite:
                return
            epoch += 1

    def _warn_bad_row(self, unit: int, row: int, why: str) -> None:
        self.bad_rows += 1
        if self.bad_rows <= _MAX_BAD_ROW_WARNINGS:
            last = self.bad_rows == _MAX_BAD_ROW_WARNINGS
            more = " (further ones are only counted)" if last else ""
            logger.warning(
                f"data: skipping row {self.units.row_id(unit, row)} of {self.label}: {why}; "
                f"{self.bad_rows} bad rows so far{more}"
            )
