"""Files written whole or not at all, and JSON text that strict readers accept.

    with written_atomically(out) as tmp:   # a temporary name beside `out`
        tmp.write_text(...)                # or fig.savefig(tmp), np.savez(tmp, ...)
    # `out` now holds all of it; had the block failed, `out` would be as it was

A reader never sees a half-written file: the block writes a temporary file in the same
folder, renamed over `out` only when the block succeeds, and removed otherwise. With
`durable`, the data is synced before the rename and the rename after it, so not even a
power loss can leave `out` naming data that never reached the disk (checkpoint markers).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def written_atomically(out: Path, durable: bool = False) -> Iterator[Path]:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if durable:
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, out)
        if durable:
            _sync_folder(out.parent)
    finally:
        tmp.unlink(missing_ok=True)


def folder_problem(path: Path) -> str | None:
    """ "no such directory" or "not a directory" when `path` is not a folder, else None."""
    if path.is_dir():
        return None
    return "not a directory" if path.exists() else "no such directory"


def nearest_existing(path: Path) -> Path:
    """`path` (made absolute) if it exists, else its nearest ancestor that does (what
    decides whether it can be created)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def cannot_write_in(folder: Path) -> str | None:
    """Why no file can be created in the existing `folder` (the system's words), or None;
    found by creating and deleting a probe file, because permission bits miss a root
    user's read-only pseudo file systems and root-squashed NFS exports."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".titan-write-probe-"):
            pass
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def _holds_dcp(folder: Path) -> bool:
    """Whether `folder` holds DCP's files (`.metadata` and shard files)."""
    return (folder / ".metadata").is_file() and any(folder.glob("*.distcp"))


def step_beside_saved_steps(folder: Path) -> bool:
    """Whether `folder` is named like a step (step-N) and its parent holds a step directory
    with DCP's files: a run would move it aside as a save cut short (no marker), or delete
    it as an old step. False where the parent cannot be listed, or does not exist."""
    from titan.checkpoint.storage import STEP_DIR, listed_steps  # local: storage imports us

    return bool(STEP_DIR.match(folder.name)) and any(
        _holds_dcp(s.path) for s in listed_steps(folder.parent)
    )


def inside_checkpoint(path: Path) -> str | None:
    """Why `path` (`..` collapsed, links followed) must not be written, as a phrase to
    follow "<path> ", when it lies inside a checkpoint: a DCP directory, or a folder named
    like a step (step-N) beside saved steps, which a run would move aside as a save cut
    short; None otherwise. Whatever is written there is moved or deleted with its step."""
    whole = "nothing is written into a checkpoint (its step is moved or deleted whole)"
    for folder in path.resolve().parents:
        if _holds_dcp(folder):
            return f"is inside the checkpoint {folder}; {whole}"
        if step_beside_saved_steps(folder):
            return (
                f"is inside {folder}, a step folder beside the saved steps of "
                f"{folder.parent}; {whole}"
            )
    return None


def output_problem(out: Path, suffix: str) -> str | None:
    """Why `out` cannot be written as a `suffix` file, as a phrase to follow "<out>: ",
    or None; for commands to check before any work."""
    if out.is_dir():
        return f"is a folder; name a {suffix} file"
    if out.suffix != suffix:
        return f"must end in {suffix}"
    if inside := inside_checkpoint(out):
        return f"{inside}: name a file outside it"
    parent = nearest_existing(out.parent)
    if not parent.is_dir():
        return f"cannot be written: {parent} is a file, not a folder"
    if why := cannot_write_in(parent):
        return f"cannot be written: no file can be created in {parent} ({why})"
    return None


def json_text(obj: Any, **kwargs: Any) -> str:
    """`json.dumps(obj)` with NaN and infinities written as null: Python would write bare
    `NaN`, which strict JSON readers (jq, JavaScript, Go) reject."""

    def strict(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: strict(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [strict(v) for v in x]
        return x

    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def _sync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable; a file system that cannot sync folders is
    left to its own guarantees."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def listing(names: list[str], most: int = 3) -> str:
    """'a, b, c and 4 more': the first `most` names and how many were left out."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more
