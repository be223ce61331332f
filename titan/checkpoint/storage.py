"""Checkpoint storage: the step directories of a run's checkpoint folder, their completion
markers, integrity checks and retention. Plain files only: no process group here, so each
function can be used (and tested) from any single process.

Layout: `<checkpoint folder>/step-N/` is a DCP directory. It counts only once it holds
the `MARKER` file, written last (atomically, by one rank) after every rank's data and the
`.metadata` file are on disk: a save cut short by kill -9, a full disk or a dead rank has
no marker and is never loaded. The marker is JSON naming the step, the kind of save and a
CRC-32 of every file (each computed by the rank that wrote the file), so a flipped bit or
a truncated file anywhere is found before anything is loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemReader

from titan.files import folder_problem, written_atomically
from titan.logging import logger

MARKER = ".complete"
"""File that makes a step directory count; written last."""

# Kinds of complete directory, as recorded in the marker.
FULL = "full"
"""Everything a resume needs: model, optimizer, schedule, data position, RNG."""
MODEL_ONLY = "model"
"""Model weights only (the final export in `export_dtype`)."""
CONVERTED = "converted"
"""Model weights converted from a Llama checkpoint by llama_to_dcp.py."""
KINDS = (FULL, MODEL_ONLY, CONVERTED)

STEP_DIR = re.compile(r"^step-(0|[1-9][0-9]*)$", re.ASCII)
"""`step-N`, N written as `step_path` writes it (so no two names are one step)."""


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


def listed_steps(folder: Path) -> list[StepDir]:
    """`list_steps`, or [] for a folder that can be entered but not listed."""
    try:
        return list_steps(folder)
    except OSError:
        return []


def step_hint(path: Path) -> str:
    """The end of a message about `path`, given where one step directory is expected but
    not one: the step to pass instead (the newest complete one, else the newest: its
    message then says what it lacks) when `path` is a folder of steps, a run's output
    folder (its steps in `checkpoint/`) or a missing step beside others; "" when there is
    none to suggest (or the folders cannot be read)."""
    places = [
        (path, "it holds step directories: pass one"),
        (path / "checkpoint", "it is a run's output folder: pass one of its steps"),
    ]
    if not path.exists():
        places += [(path.parent, "pass a step that exists"),
                   (path.parent / "checkpoint", "pass a step that exists")]  # fmt: skip
    for folder, says in places:
        if steps := listed_steps(folder):
            return f"; {says}, e.g. {([s for s in steps if s.complete] or steps)[-1].path}"
    return ""


def step_problem(
    path: Path,
    allow_incomplete: bool = False,
    *,
    not_a_step: str = "not a DCP checkpoint directory (no .metadata)",
    or_else: str = "",
    foreign: str = "",
) -> str | None:
    """Why `path` cannot be read as one checkpoint step, judged from its small files alone
    (the folder, `.metadata`, the marker, the checksum of `.metadata`), as a phrase to
    follow "<path>: " that names a step to pass instead where there is one; None when it
    can. `allow_incomplete`: a step without a marker passes if its `.metadata` reads.
    A command words a folder that is no step as `not_a_step` (what else it accepts), adds
    `or_else` to the advice for an incomplete step (an option that reads one), and words
    Meta or Hugging Face weights as `foreign` (default: how to convert them)."""
    if problem := folder_problem(path):
        return problem + step_hint(path)
    if not (path / ".metadata").is_file():
        if (path / MARKER).is_file() or any(path.glob("*.distcp")):
            return "damaged: its .metadata file is missing; use another step"
        if what := foreign_weights(path):
            if foreign:
                return f"{what} {foreign}"
            return (
                f"{what}, not a DCP directory: convert it with python llama_to_dcp.py "
                f"--input_dir {path} --output_dir <new folder> and pass that folder"
            )
        return not_a_step + step_hint(path)
    if (path / MARKER).is_file():
        problem = metadata_problem(path)
    elif allow_incomplete:
        problem = data_files(path)[1]  # no checksum to compare: at least readable
    else:
        done = [s.path for s in listed_steps(path.parent) if s.complete]
        return (
            f"incomplete (no {MARKER} marker: its save was cut short, or is still being "
            "written); use a complete step" + (f", e.g. {done[-1]}" if done else "") + or_else
        )
    return f"damaged: {problem}; use another step" if problem else None


def foreign_weights(path: Path) -> str | None:
    """What a folder of weights in another layout is ("a Hugging Face export", "Llama
    weights in Meta's layout"), for a message saying to convert it; None otherwise."""
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "a Hugging Face export"
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return "Llama weights in Meta's layout"
    return None


def read_marker(step_dir: Path) -> dict[str, Any]:
    """The marker's JSON ({} when it is missing or unreadable)."""
    try:
        return json.loads((step_dir / MARKER).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def write_marker(step_dir: Path, info: dict[str, Any]) -> None:
    """Mark `step_dir` complete with `info` (at least "kind"). Written to a temporary name
    and renamed, so a reader sees either no marker or the whole of it."""
    with written_atomically(step_dir / MARKER, durable=True) as tmp:
        tmp.write_text(json.dumps(info))


def recorded_checksums(step_dir: Path) -> dict[str, str]:
    """File name -> CRC-32 as the marker records them ({} when it records none)."""
    checksums = read_marker(step_dir).get("checksums")
    return checksums if isinstance(checksums, dict) else {}


def marker_problem(step_dir: Path) -> str | None:
    """What is wrong with a complete directory's marker in a few words, or None: titan's
    own saves always record the kind and every file's checksum."""
    marker = read_marker(step_dir)
    kind = marker.get("kind", FULL)
    if kind not in KINDS:
        return f"its {MARKER} marker is damaged (unknown kind {str(kind)[:20]!r})"
    checksums = marker.get("checksums")
    if kind in (FULL, MODEL_ONLY) and not (isinstance(checksums, dict) and checksums):
        return f"its {MARKER} marker is damaged or unreadable (no checksums)"
    if checksums is not None and not isinstance(checksums, dict):
        return f"its {MARKER} marker is damaged (checksums unreadable)"
    return None


def metadata_problem(step_dir: Path) -> str | None:
    """The problem of a complete directory's small files (its marker and `.metadata`, no
    data file read) in a few words, or None: what must hold before `.metadata` is trusted
    to say which model the directory holds, ahead of the data files' checksums."""
    problem = marker_problem(step_dir) or data_files(step_dir)[1]
    if problem is None and ".metadata" in recorded_checksums(step_dir):
        problem = verify_checksums(step_dir, [".metadata"])
    return problem


def file_checksum(path: Path) -> str:
    """CRC-32 of a file's bytes, as 8 hex digits."""
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def rank_files(step_dir: Path, rank: int) -> list[str]:
    """The data files DCP's file-system writer names after `rank` (`__<rank>_<n>.distcp`)."""
    return sorted(p.name for p in step_dir.glob(f"__{rank}_*.distcp"))


def checksums(step_dir: Path, names: list[str]) -> dict[str, str]:
    return {name: file_checksum(step_dir / name) for name in names}


def complete(step_dir: Path, info: dict[str, Any], sums: dict[str, str]) -> None:
    """Write the marker of a finished save: `info` plus the checksums of its files (the
    `.metadata` file's is added here)."""
    sums = {**sums, ".metadata": file_checksum(step_dir / ".metadata")}
    write_marker(step_dir, {**info, "checksums": dict(sorted(sums.items()))})


def verify_checksums(step_dir: Path, names: list[str]) -> str | None:
    """Compare `names` (a share of the marker's files) with the marker's checksums; the
    first problem in a few words, or None."""
    recorded = recorded_checksums(step_dir)
    for name in names:
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if file_checksum(path) != recorded.get(name):
            return f"{name} does not match its checksum (damaged on disk)"
    return None


def checkpoint_keys(path: Path) -> dict[str, Any]:
    """Flattened key -> metadata entry (tensor size, or bytes) of a DCP directory."""
    return dict(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def shape_mismatch(shapes: dict[str, tuple[int, ...]], path: Path) -> str | None:
    """The first model tensor of `shapes` (name -> shape) that the directory lacks or holds
    with another shape, from its small files alone, so that another model's step is named
    before its data files (tens of GB for 8B) are checksummed; None also while the marker
    or `.metadata` is damaged (`metadata_problem`, for the integrity check to report)."""
    if metadata_problem(path):
        return None
    saved = checkpoint_keys(path)
    for name, shape in shapes.items():
        meta = saved.get(f"model.{name}")
        if meta is None or tuple(getattr(meta, "size", ())) != shape:
            found = "is absent" if meta is None else f"has shape {tuple(meta.size)}"
            return f"model.{name} {found}, this model needs {shape}"
    return None


def verify(step_dir: Path, prefix: str = "") -> str | None:
    """Check that every file `.metadata` refers to for the keys starting with `prefix`
    (all by default) exists and is long enough; return the problem in a few words, or
    None when the directory looks intact."""
    needed, problem = data_files(step_dir, prefix)
    return problem or size_problem(step_dir, needed)


def size_problem(step_dir: Path, needed: dict[str, int]) -> str | None:
    """The first of `data_files`' files that is missing or shorter than `.metadata` says."""
    for rel, end in sorted(needed.items()):
        path = step_dir / rel
        if not path.is_file():
            return f"shard {rel} is missing"
        if path.stat().st_size < end:
            size = path.stat().st_size
            return f"shard {rel} is truncated ({size:,} bytes; needs at least {end:,})"
    return None


def data_files(step_dir: Path, prefix: str = "") -> tuple[dict[str, int], str | None]:
    """(data file -> the bytes `.metadata` says it holds at least, for the keys starting
    with `prefix`; the problem reading `.metadata`, or None)."""
    if not (step_dir / ".metadata").is_file():
        return {}, "the .metadata file is missing"
    try:
        metadata = FileSystemReader(str(step_dir)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is the same problem
        return {}, f"the .metadata file is unreadable ({type(e).__name__})"
    needed: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn.startswith(prefix):
            end = info.offset + info.length
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    return needed, None


def settle_incomplete(folder: Path) -> list[tuple[Path, str]]:
    """Step directories without a marker are never deleted: one whose `.metadata` and data
    files are all there (DCP writes `.metadata` last, so its data finished; only the marker
    was lost, e.g. to a kill right after an async save) is verified and completed; any
    other is moved aside into `<folder>/incomplete/`. Returns (path, what was done)."""
    done = []
    line: dict[str, Any] = {}  # the line of saves the step belongs to: the step before it's
    for s in list_steps(folder):
        if s.complete:
            marker = read_marker(s.path)
            line = {k: marker[k] for k in ("branch_from", "exclusions_applied") if k in marker}
            continue
        if verify(s.path) is None:
            names = sorted(p.name for p in s.path.glob("*.distcp"))
            keys = checkpoint_keys(s.path)
            kind = FULL if any(k.startswith("optimizer.") for k in keys) else MODEL_ONLY
            info = {"step": s.step, "kind": kind, "completed_later": True, **line}
            complete(s.path, info, checksums(s.path, names))
            done.append((s.path, "completed: its data and .metadata were whole"))
            continue
        aside = move_aside(s.path, "incomplete")
        done.append((s.path, f"moved aside to {aside}: its save was cut short"))
    return done


def _unused(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... when it exists (two moves in one second)."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def move_aside(step_dir: Path, bucket: str) -> Path:
    """Move a step directory to `<folder>/<bucket>/<name>-<time>` (kept, never a step
    again); returns the new path."""
    bucket_dir = step_dir.parent / bucket
    bucket_dir.mkdir(exist_ok=True)
    aside = _unused(bucket_dir / f"{step_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(step_dir, aside)
    return aside


def set_aside_newer(folder: Path, step: int) -> tuple[Path, list[str]] | None:
    """Move the step directories newer than `step` into `<folder>/branches/<name>/`, so a
    later plain resume continues from `step` (the branch the user chose). Returns the new
    folder and the moved names, or None when nothing is newer."""
    newer = [s for s in list_steps(folder) if s.step > step]
    if not newer:
        return None
    name = f"after-step-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    target = _unused(folder / "branches" / name)
    target.mkdir(parents=True)
    for s in newer:
        os.replace(s.path, target / s.path.name)
    return target, [s.path.name for s in newer]


def branch_head(folder: Path, step: int) -> StepDir | None:
    """The newest full step of the branch a rewind to `step` started, when that rewind has
    already happened (its saves record `branch_from`), else None: the same command run
    again (a restart, a requeue) continues the branch instead of rewinding twice."""
    newer = [s for s in list_steps(folder) if s.step > step and s.kind == FULL]
    if newer and read_marker(newer[-1].path).get("branch_from") == step:
        return newer[-1]
    return None


def purge(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete step directories (keep <= 0: keep all);
    the newest complete full checkpoint is never deleted. Returns what was removed; what
    could not be removed is logged (and stays a step)."""
    complete = [s for s in list_steps(folder) if s.complete]
    if keep <= 0 or len(complete) <= keep:
        return []
    newest_full = max((s.step for s in complete if s.kind == FULL), default=None)
    removed = []
    for s in complete[:-keep]:
        if s.step == newest_full:
            continue
        try:
            if s.path.is_symlink():
                s.path.unlink()  # the link only: what it points to is not ours to delete
            else:
                (s.path / MARKER).unlink()  # first: a deletion cut short is never complete
                shutil.rmtree(s.path)
            removed.append(s.path)
        except OSError as e:
            logger.warning(f"Could not remove old checkpoint {s.path} ({e}); remove it by hand")
    return removed
