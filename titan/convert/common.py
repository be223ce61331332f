"""What every part of the converters shares: the error type, the memory budgets, sizes and
one-line messages, progress lines, byte-budget grouping, and row-chunked copies through
memory maps that are remapped as they go.

The budgets are read when they are used, so setting `common.MAP_BYTES` (and the others)
takes effect everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch.distributed.checkpoint import CheckpointException

from titan.models.llama import ModelArgs

GROUP_BYTES = 256 << 20  # tensors read from DCP per group on export
MAP_BYTES = 256 << 20  # bytes touched through one memory map before it is remapped
CHUNK_BYTES = 64 << 20  # large tensors are copied through memory maps in row chunks
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # safetensors'
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}

T = TypeVar("T")
Log = Callable[[str], None]


class ConvertError(Exception):
    """A bad input or a refused operation (exit status 2); the message is one line."""


class TransferError(ConvertError):
    """The Hub could not be reached or refused the upload (exit status 1: the input was
    fine)."""


def print_line(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- messages


def describe(args: ModelArgs) -> str:
    return (
        f"dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads ({args.n_kv_heads} kv), "
        f"ffn {args.ffn_hidden_dim}, vocab {args.vocab_size}"
    )


def unwrapped(e: BaseException) -> BaseException:
    """The first error inside DCP's CheckpointException ({rank: (error, tb)}), else `e`."""
    failures = getattr(e, "failures", None)
    if isinstance(e, CheckpointException) and failures:
        inner = next(iter(failures.values()))
        return unwrapped(inner[0] if isinstance(inner, tuple) else inner)
    return e


def interrupted(e: BaseException) -> bool:
    """Whether `e` is a KeyboardInterrupt or was raised because of one: DCP wraps a Ctrl-C
    in its CheckpointException, and other code raises its own error on the way out (even
    `raise ... from None` keeps the interrupt as `__context__`), so the scripts' one
    check of the final error finds it wherever it happened."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        todo += [unwrapped(error), error.__cause__, error.__context__]
    return False


def first_line(e: BaseException) -> str:
    """The first line of an error's message, looking inside DCP's wrapped failures; the
    type name only where the message alone does not say what failed (not for our own
    errors, OS errors or the value errors of our checks)."""
    e = unwrapped(e)
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(e, KeyError):
        return f"missing {text}"
    if isinstance(e, (ConvertError, OSError, ValueError, TypeError)) and text:
        return text
    return f"{type(e).__name__}: {text}".rstrip(": ")


def config_error(path: Path, e: BaseException) -> ConvertError:
    """A config file's unusable value, naming the file once (the checks that raise `e`
    start their messages with its name)."""
    return ConvertError(f"{path}: {first_line(e).removeprefix(f'{path.name}: ')}")


FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class WriteError(OSError):
    """A write into the output folder failed; its message is one whole line."""

    def __str__(self) -> str:
        return self.strerror or ""


def write_error(folder: Path, e: BaseException) -> OSError:
    """A failed write into `folder` (torch's writers raise RuntimeError, e.g. 'unexpected
    pos' when the disk is full) as an OSError whose message names the folder, and the
    space left there when the disk may be full: the error says so, or hides its cause."""
    error = unwrapped(e)
    code = getattr(error, "errno", None)
    free = ""
    if code in FULL_DISK or not isinstance(error, OSError):
        with contextlib.suppress(OSError):
            free = f"; {shutil.disk_usage(folder).free / 2**30:.2f} GiB free there"
    return WriteError(code, f"writing {folder} failed ({first_line(e)}){free}")


def gb(nbytes: int) -> str:
    if nbytes >= 10**9:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e6:.2f} MB"


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: not readable JSON ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return data


@contextlib.contextmanager
def quiet_dcp() -> Iterator[None]:
    """DCP without a process group warns on every call that it assumes a single process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*assuming the intent.*")
        yield


# ----------------------------------------------------------------------------- progress


class Progress:
    """Throttled progress lines: at most one every `every` seconds, plus the last one."""

    def __init__(self, total: int, total_bytes: int, log: Log, every: float = 2.0) -> None:
        self.total, self.total_bytes, self.log, self.every = total, total_bytes, log, every
        self.count = self.bytes = 0
        self.start = self.last = time.monotonic()

    def update(self, name: str, nbytes: int) -> None:
        self.count += 1
        self.bytes += nbytes
        now = time.monotonic()
        if now - self.last >= self.every or self.count == self.total:
            self.last = now
            self.log(
                f"  [{self.count}/{self.total}] {gb(self.bytes)} of {gb(self.total_bytes)}, "
                f"{now - self.start:.1f} s  {name}"
            )


def summary(
    tool: str,
    names: list[str],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, torch.dtype],
    start: float,
    output_dir: Path,
    log: Log,
) -> dict[str, Any]:
    """Log the closing line of a conversion and return its numbers."""
    n_params = sum(math.prod(shapes[n]) for n in names)
    n_bytes = sum(nbytes(shapes[n], dtypes[n]) for n in names)
    kinds = sorted({str(d).removeprefix("torch.") for d in dtypes.values()})
    seconds = time.monotonic() - start
    log(
        f"{tool}: {len(names)} tensors, {n_params:,} parameters, {gb(n_bytes)}, "
        f"{'+'.join(kinds)}, {seconds:.1f} s -> {output_dir}"
    )
    return {"tensors": len(names), "parameters": n_params, "bytes": n_bytes, "seconds": seconds}


# ----------------------------------------------------------------------------- bounded memory


def byte_groups(items: Iterable[T], size: Callable[[T], int], budget: int) -> Iterator[list[T]]:
    """Consecutive items in groups of at most `budget` bytes; a larger item comes alone."""
    group: list[T] = []
    total = 0
    for item in items:
        if group and total + size(item) > budget:
            yield group
            group, total = [], 0
        group.append(item)
        total += size(item)
    if group:
        yield group


def row_chunks(tensor: torch.Tensor) -> Iterator[slice]:
    """Slices of dim 0 of at most about CHUNK_BYTES each."""
    rows = tensor.shape[0] if tensor.dim() else 1
    step = max(1, CHUNK_BYTES // max(1, tensor.nbytes // max(rows, 1)))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


class RemappedMap(Generic[T]):
    """A memory-mapped file (what `open_map` returns) that is mapped again after every
    MAP_BYTES copied through it: dropping a map releases its resident pages, so they stay
    bounded whatever the size of the file."""

    def __init__(self, open_map: Callable[[], T]) -> None:
        self._open_map = open_map
        self._map: T | None = None
        self._touched = 0

    def get(self) -> T:
        if self._map is None or self._touched >= MAP_BYTES:
            self._map = None  # unmap (and release the resident pages) before mapping again
            self._map = self._open_map()
            self._touched = 0
        return self._map

    def chunks(self, tensor: torch.Tensor) -> Iterator[tuple[T, slice]]:
        """(map, rows) for each row chunk of `tensor`; each chunk counts toward the remap."""
        for rows in row_chunks(tensor):
            yield self.get(), rows
            self._touched += tensor[rows].nbytes

    def close(self) -> None:
        self._map = None
