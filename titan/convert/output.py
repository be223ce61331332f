"""The output folder of a conversion: what may be replaced, and the marker that says a
DCP conversion finished."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

from titan.checkpoint import MARKER
from titan.convert.common import ConvertError, first_line, listing

# Files these tools write; --overwrite removes only these.
_OUTPUT_FILES = re.compile(
    r"^(\.metadata|\.complete|.*\.distcp|params\.json|config\.json|README\.md|"
    r"model.*\.safetensors|model\.safetensors\.index\.json|consolidated\.\d+\.pth)$"
)


def write_marker(folder: Path, info: dict[str, Any]) -> None:
    """Mark a DCP conversion complete: the last file written into `folder`."""
    (folder / MARKER).write_text(json.dumps(info))


def check_output(folder: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse (ConvertError) an output folder that is an input or inside one, that is not
    a directory, or that is not empty, unless `overwrite`, which replaces only files these
    tools write. Creates and removes nothing."""
    resolved = folder.resolve()
    for inp in inputs:
        inp = inp.resolve()
        if resolved == inp or resolved in inp.parents:
            raise ConvertError(f"--output_dir {folder} would overwrite the input {inp}")
    if folder.exists() and not folder.is_dir():
        raise ConvertError(f"--output_dir {folder} exists and is not a directory")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not overwrite:
        raise ConvertError(
            f"--output_dir {folder} exists and is not empty; pass --overwrite to replace "
            "its contents"
        )
    others = [
        p.name
        for p in folder.iterdir()
        if not (p.is_file() and _OUTPUT_FILES.match(p.name)) and p.name != "original"
    ]
    if others:
        raise ConvertError(
            f"--output_dir {folder} holds files these tools did not write "
            f"({listing(sorted(others))}); remove them or choose another directory"
        )


def make_output(folder: Path, overwrite: bool) -> None:
    """Create `folder`; with `overwrite`, first remove what an earlier conversion wrote
    there (after check_output, which refuses a folder holding anything else)."""
    if overwrite and folder.is_dir():
        for p in [*folder.iterdir(), *(folder / "original").glob("*")]:
            if p.is_file() and _OUTPUT_FILES.match(p.name):
                p.unlink()
        with contextlib.suppress(OSError):  # only if empty
            (folder / "original").rmdir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"--output_dir {folder}: {first_line(e)}") from None


def prepare_output(folder: Path, overwrite: bool, inputs: list[Path]) -> None:
    """check_output, then make_output."""
    check_output(folder, overwrite, inputs)
    make_output(folder, overwrite)
