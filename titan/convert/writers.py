"""Writing an export tensor by tensor, without holding the model in memory: Hugging Face
safetensors shards (headers known up front, data appended in order) and Meta's
`consolidated.00.pth` (laid out first, then filled through a memory map)."""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
from pathlib import Path
from typing import Any

import torch

from titan.convert.common import (
    ST_NAMES,
    RemappedMap,
    byte_groups,
    nbytes,
    write_error,
)

Entry = tuple[str, tuple[int, ...], torch.dtype]  # (name, shape, dtype)


def _entry_bytes(entry: Entry) -> int:
    return nbytes(entry[1], entry[2])


class SafetensorsShardWriter:
    """Writes HF safetensors shards tensor by tensor: each shard's header is computed up
    front from the known names, shapes and dtypes, then the data are appended in order."""

    def __init__(self, folder: Path, entries: list[Entry], max_bytes: int) -> None:
        shards = list(byte_groups(entries, _entry_bytes, max_bytes))
        n = len(shards)
        names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.files = [folder / name for name in names]
        self.shards = shards
        self.weight_map = {e[0]: names[i] for i, shard in enumerate(shards) for e in shard}
        self.total_size = sum(_entry_bytes(e) for e in entries)
        self._order = iter([(i, e) for i, shard in enumerate(shards) for e in shard])
        self._file: Any = None
        self._remaining = 0

    def _open(self, index: int) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self.shards[index]:
            end = offset + nbytes(shape, dtype)
            header[name] = {
                "dtype": ST_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, end],
            }
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.files[index], "wb")  # noqa: SIM115 - closed in write()
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._remaining = len(self.shards[index])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index, (expected, shape, dtype) = next(self._order)
        assert (name, tuple(tensor.shape), tensor.dtype) == (expected, shape, dtype), name
        try:
            if self._file is None:
                self._open(index)
            self._file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
            self._remaining -= 1
            if self._remaining == 0:
                self._file.close()
                self._file = None
        except OSError as e:  # a full disk, mostly
            if self._file is not None:
                with contextlib.suppress(OSError):  # its buffer cannot be written either
                    self._file.close()
                self._file = None
            raise write_error(self.files[index].parent, e) from None

    def write_index(self) -> None:
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            path = self.files[0].parent / "model.safetensors.index.json"
            path.write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _reserve(path: Path) -> None:
    """Allocate the disk blocks of a file laid out with holes, so that a full disk is an
    OSError here and not a SIGBUS while its memory map is filled; a file system that
    cannot allocate ahead is left as it is."""
    with path.open("rb+") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, path.stat().st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise write_error(path.parent, e) from None


class MetaCheckpointWriter:
    """Writes Meta's `consolidated.00.pth` without holding the model in memory: the file
    is laid out with `torch.serialization.skip_data` (storages left unwritten), then
    filled in row chunks through a shared memory map of it that is remapped as it goes."""

    def __init__(self, path: Path, entries: list[Entry]) -> None:
        self.path = path
        # torch.empty reserves address space only; skip_data never touches the bytes.
        skeleton = {name: torch.empty(shape, dtype=dtype) for name, shape, dtype in entries}
        try:
            with torch.serialization.skip_data():
                torch.save(skeleton, path)
        except RuntimeError as e:  # torch's zip writer: 'unexpected pos' on a full disk
            raise write_error(path.parent, e) from None
        _reserve(path)
        self._map = RemappedMap(self._open_map)

    def _open_map(self) -> dict[str, torch.Tensor]:
        # MAP_SHARED: what is copied into the map goes to the file.
        with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
            return torch.load(self.path, mmap=True, weights_only=True)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        for target, rows in self._map.chunks(tensor):
            target[name][rows].copy_(tensor[rows])

    def close(self) -> None:
        self._map.close()
