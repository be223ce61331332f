"""The output folder of a conversion: what may be replaced, how an interrupted run is
recognized, and the markers that tell a finished output from a partial one.

- A DCP directory written by `llama_to_dcp` counts only once it holds the `.complete`
  marker, written last (as for training checkpoints): DCP files without it are a partial
  conversion.
- An export (Meta or Hugging Face layout) must stay loadable as it is and is uploaded as
  it is, so it ends with no marker: `.partial` is written before anything else and removed
  last, and a folder that still holds it is a partial export.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from titan.checkpoint import MARKER, storage
from titan.convert.common import FULL_DISK, ConvertError, first_line, write_error
from titan.files import (
    cannot_write_in,
    inside_checkpoint,
    listing,
    nearest_existing,
    step_beside_saved_steps,
)

PARTIAL = ".partial"
# Files these tools write (DCP's `.metadata.tmp` too, if it was cut short); --overwrite
# removes only these.
_OUTPUT_FILES = re.compile(
    r"^(\.metadata|\.metadata\.tmp|\.complete|\.partial|.*\.distcp|params\.json|config\.json|"
    r"README\.md|model.*\.safetensors|model\.safetensors\.index\.json|consolidated\.\d+\.pth)$"
)


@contextlib.contextmanager
def partial_until_done(folder: Path) -> Iterator[None]:
    """`folder/.partial` exists while the body writes the export, and stays if it fails or
    is interrupted, so that the next run can say what the folder holds."""
    try:
        (folder / PARTIAL).write_text("")
    except OSError as e:
        if e.errno in FULL_DISK:
            raise write_error(folder, e) from None
        raise ConvertError(
            f"--output_dir {folder} cannot be written ({first_line(e)}); choose another folder"
        ) from None
    yield
    (folder / PARTIAL).unlink()


def _holds_dcp_files(folder: Path) -> bool:
    return (folder / ".metadata").is_file() or any(folder.glob("*.distcp"))


def _partial(folder: Path) -> str | None:
    """What an interrupted earlier run left in `folder`, in words; None if nothing."""
    if (folder / PARTIAL).is_file():
        return f"a partial export (its {PARTIAL} marker is left: an earlier run was interrupted)"
    if _holds_dcp_files(folder) and not (folder / MARKER).is_file():
        return f"a partial conversion (no {MARKER} marker: an earlier run was interrupted)"
    return None


def left_partial(folder: Path) -> str:
    """What an interrupted run says about its output `folder`: "" when it holds no
    partial output, else how to replace it (by hand for a folder named like a training
    step, which --overwrite never replaces)."""
    if not folder.is_dir() or _partial(folder) is None:
        return ""
    how = (
        "remove it by hand, then rerun"
        if _training_step(folder)
        else "rerun with --overwrite to replace it"
    )
    return f"; --output_dir {folder} is left partial ({how})"


def _training_step(folder: Path) -> str | None:
    """What makes `folder` a training run's checkpoint, in words; None if it is not one.
    A step directory whose save did not finish (DCP files, no marker) counts too."""
    if (folder / MARKER).is_file():
        kind = storage.read_marker(folder).get("kind")
        return None if kind == storage.CONVERTED else f"a {kind or 'training'} checkpoint"
    if storage.STEP_DIR.match(folder.name) and _holds_dcp_files(folder):
        return "a training checkpoint step"
    return None


def _replaceable(path: Path) -> bool:
    """A plain file (not a link: it is never followed) with a name these tools write."""
    return not path.is_symlink() and path.is_file() and bool(_OUTPUT_FILES.match(path.name))


def _meta_subfolder(folder: Path) -> Path | None:
    """`folder/original` (Meta's files of a --format both export) when it is a real
    directory, not a link; None otherwise."""
    original = folder / "original"
    return original if original.is_dir() and not original.is_symlink() else None


def _check_writable(folder: Path) -> None:
    """Refuse an output folder that cannot be written (or created), before any work."""
    existing = nearest_existing(folder)
    if why := cannot_write_in(existing):
        what = (
            "cannot be written"
            if existing == folder.absolute()
            else f"cannot be created in {existing}"
        )
        raise ConvertError(f"--output_dir {folder} {what} ({why}); choose another folder")


def check_output(folder: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse (ConvertError) an output folder that is an input, inside one or above one,
    inside any checkpoint, that is not a directory, that cannot be written, or that is not
    empty, unless `overwrite`, which replaces only files these tools write (never through
    a symbolic link), and never a training checkpoint. Leaves nothing behind (a probe
    file shows that the folder can be written)."""
    resolved, inputs = folder.resolve(), [inp.resolve() for inp in inputs]
    for inp in inputs:
        if inp.is_relative_to(resolved):
            raise ConvertError(f"--output_dir {folder} would overwrite the input {inp}")
    for inp in inputs:
        if resolved.is_relative_to(inp):
            raise ConvertError(
                f"--output_dir {folder} is inside the input {inp}; choose a folder outside it"
            )
    if inside := inside_checkpoint(folder):
        raise ConvertError(f"--output_dir {folder} {inside}: choose a folder outside it")
    if folder.exists() and not folder.is_dir():
        raise ConvertError(f"--output_dir {folder} exists and is not a directory")
    _check_writable(folder)
    # before the partial-output advice: --overwrite would be refused for a training step
    if folder.is_dir() and (step := _training_step(folder)):
        raise ConvertError(
            f"--output_dir {folder} is {step}, which --overwrite never replaces; "
            "choose another directory"
        )
    if step_beside_saved_steps(folder.resolve()):
        raise ConvertError(
            f"--output_dir {folder} is named like a step beside the saved steps of "
            f"{folder.resolve().parent}, where a run would move it aside or delete it; "
            "choose another directory"
        )
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not overwrite:
        if partial := _partial(folder):
            raise ConvertError(
                f"--output_dir {folder} holds {partial}; pass --overwrite to replace it"
            )
        raise ConvertError(
            f"--output_dir {folder} exists and is not empty; pass --overwrite to replace "
            "its contents"
        )
    original = _meta_subfolder(folder)
    entries = [*folder.iterdir(), *(original.iterdir() if original else [])]
    links = [p for p in entries if p.is_symlink()]
    if links:
        names = [str(p.relative_to(folder)) for p in links]
        raise ConvertError(
            f"--output_dir {folder} holds symbolic links ({listing(sorted(names))}), which "
            "--overwrite neither follows nor removes; remove them or choose another directory"
        )
    others = [str(p.relative_to(folder)) for p in entries if not (_replaceable(p) or p == original)]
    if others:
        raise ConvertError(
            f"--output_dir {folder} holds files these tools did not write "
            f"({listing(sorted(others))}); remove them or choose another directory"
        )


def make_output(folder: Path, overwrite: bool) -> None:
    """Create `folder`; with `overwrite`, first remove what an earlier conversion wrote
    there (after check_output, which refuses a folder holding anything else). Links are
    never followed: only plain files are removed."""
    if overwrite and folder.is_dir() and not _training_step(folder):
        original = _meta_subfolder(folder)
        for p in [*folder.iterdir(), *(original.iterdir() if original else [])]:
            if _replaceable(p):
                p.unlink()
        if original is not None:
            with contextlib.suppress(OSError):  # only if empty
                original.rmdir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"--output_dir {folder} cannot be created ({first_line(e)})") from None


def prepare_output(folder: Path, overwrite: bool, inputs: list[Path]) -> None:
    """check_output, then make_output."""
    check_output(folder, overwrite, inputs)
    make_output(folder, overwrite)
