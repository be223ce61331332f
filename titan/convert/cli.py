"""What the two converter scripts (`llama_to_dcp.py`, `dcp_to_llama.py`) share: their
common options, the size option, and running a conversion as a command whose every
failure is one `error:` line and an exit status."""

from __future__ import annotations

import argparse
import ctypes
import re
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

from titan.cli import EXIT_INTERRUPTED, OneLineParser, noting_ctrl_c
from titan.convert.common import (
    DTYPES,
    ConvertError,
    TransferError,
    first_line,
    interrupted,
)
from titan.convert.output import left_partial
from titan.models.llama import FLAVORS


def parser(
    prog: str, description: str, *, input_help: str, flavor_help: str
) -> argparse.ArgumentParser:
    """An argument parser with the options both scripts have: --input_dir, --output_dir,
    --dtype, --flavor and --overwrite."""
    p = OneLineParser(prog=prog, description=description)
    p.add_argument("--input_dir", required=True, help=input_help)
    p.add_argument("--output_dir", required=True, help="folder to create")
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="dtype of the written tensors (default: as stored in --input_dir)",
    )
    p.add_argument("--flavor", choices=list(FLAVORS), default=None, help=flavor_help)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    return p


def size(text: str) -> int:
    """An argparse type: '5GB', '500MB', '1000000' -> bytes (decimal units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 5GB, 500MB or 1000000")
    unit = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[m.group(2).removesuffix("B")]
    if (value := int(Fraction(m.group(1)) * unit)) < 1:  # exact: no float overflow
        raise argparse.ArgumentTypeError(f"{text!r}: a size of at least one byte, e.g. 5GB")
    return value


def _release_freed_memory_promptly() -> None:
    """Have glibc serve every allocation above 1 MB with its own mmap, so a freed tensor
    goes back to the OS at once; its adaptive threshold would otherwise keep freed
    tensors of up to 32 MB in the heap, and the peak would not be bounded by a group."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MB
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def run(convert: Callable[..., Any], **kwargs: Any) -> int:
    """Call `convert(**kwargs)`; return the exit status, after printing a failure as one
    `error: ...` line on stderr (no traceback). A Ctrl-C is exit 130 whatever error it
    surfaced as on its way out."""
    _release_freed_memory_promptly()
    try:
        with noting_ctrl_c() as ctrl_c:
            convert(**kwargs)
    except BaseException as e:  # DCP's CheckpointException is not an Exception
        failure = _failure(e, bool(ctrl_c), Path(kwargs["output_dir"]))
        if failure is None:
            raise
        print(f"error: {failure[1]}", file=sys.stderr, flush=True)
        return failure[0]
    return 0


def _failure(e: BaseException, ctrl_c: bool, output_dir: Path) -> tuple[int, str] | None:
    """(exit status, message) of a conversion that raised `e`, after a Ctrl-C if
    `ctrl_c`; None for an unexpected error (a bug: its traceback is wanted) or an exit."""
    if isinstance(e, (SystemExit, GeneratorExit)):
        return None
    if ctrl_c or interrupted(e):
        return EXIT_INTERRUPTED, f"interrupted{left_partial(output_dir)}"
    if isinstance(e, ConvertError):
        return (1 if isinstance(e, TransferError) else 2), str(e)
    if isinstance(e, OSError):  # disk full, permissions, ...
        return 1, first_line(e)
    return None
