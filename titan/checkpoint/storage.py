"""Checkpoint storage: the step directories of a run's checkpoint folder, their completion
markers, integrity checks and retention. Plain files only: no process group here, so each
function can be used (and tested) from any single process.

Layout: `<checkpoint folder>/step-N/` is a DCP directory. It counts only once it holds
the `MARKER` file, written last (atomically, by one rank) after every rank's data and the
`.metadata` file are on disk: a save cut short by kill -9, a full disk or a dead rank has
no marker and is never loaded. The marker is JSON naming the step and the kind of save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemReader

MARKER = ".complete"
"""File that makes a step directory count; written last."""

# Kinds of complete directory, as recorded in the marker.
FULL = "full"
"""Everything a resume needs: model, optimizer, schedule, data position, RNG."""
MODEL_ONLY = "model"
"""Model weights only (the final export in `export_dtype`)."""
CONVERTED = "converted"
"""Model weights converted from a Llama checkpoint by llama_to_dcp.py."""

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class StepDir:
    """One `step-N` directory of a checkpoint folder."""

    step: int
    path: Path
    complete: bool

    @property
    def kind(self) -> str | None:
        """The marker's kind (None while incomplete); markers without one are full saves."""
        return read_marker(self.path).get("kind", FULL) if self.complete else None


def step_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step}"


def list_steps(folder: Path) -> list[StepDir]:
    """Every step directory of `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append(StepDir(int(match.group(1)), path, (path / MARKER).is_file()))
    return sorted(found, key=lambda s: s.step)


def read_marker(step_dir: Path) -> dict[str, Any]:
    """The marker's JSON ({} when it is missing or unreadable)."""
    try:
        return json.loads((step_dir / MARKER).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def write_marker(step_dir: Path, info: dict[str, Any]) -> None:
    """Mark `step_dir` complete with `info` (at least "kind"). Written to a temporary name
    and renamed, so a reader sees either no marker or the whole of it."""
    tmp = step_dir / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, step_dir / MARKER)


def checkpoint_keys(path: Path) -> dict[str, Any]:
    """Flattened key -> metadata entry (tensor size, or bytes) of a DCP directory."""
    return dict(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def verify(step_dir: Path) -> str | None:
    """Check that every file `.metadata` refers to exists and is long enough; return the
    problem in a few words, or None when the directory looks intact."""
    if not (step_dir / ".metadata").is_file():
        return "the .metadata file is missing"
    try:
        metadata = FileSystemReader(str(step_dir)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is the same problem
        return f"the .metadata file is unreadable ({type(e).__name__})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(
            needed.get(info.relative_path, 0), info.offset + info.length
        )
    for rel, end in sorted(needed.items()):
        path = step_dir / rel
        if not path.is_file():
            return f"shard {rel} is missing"
        if path.stat().st_size < end:
            return f"shard {rel} is truncated ({path.stat().st_size} of {end} bytes)"
    return None


def remove_incomplete(folder: Path) -> list[Path]:
    """Delete the step directories without a marker (saves that were cut short)."""
    removed = [s.path for s in list_steps(folder) if not s.complete]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def purge(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete step directories (keep <= 0: keep all);
    the newest complete full checkpoint is never deleted. Returns what was removed."""
    complete = [s for s in list_steps(folder) if s.complete]
    if keep <= 0 or len(complete) <= keep:
        return []
    newest_full = max((s.step for s in complete if s.kind == FULL), default=None)
    removed = [s.path for s in complete[:-keep] if s.step != newest_full]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
