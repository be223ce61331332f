"""The checkpoint storage layer on its own (no process group): step listing, completion
markers with checksums, verification of a DCP directory (sizes, then every checksum),
retention, settling saves without a marker (completed when whole, moved aside otherwise,
never deleted), setting newer steps aside for a branch, and what a command that reads one
step says about a path that is not one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from titan.checkpoint import storage

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _save(
    folder: Path, step: int, kind: str | None = storage.FULL, optimizer: bool = True, **marker
) -> Path:
    """A real one-process DCP step directory (with optimizer state unless a model-only
    one); marked complete unless kind is None, with `marker`'s extra entries."""
    path = storage.step_path(folder, step)
    state = {"model": {"w": torch.arange(1000.0)}}
    if optimizer and kind != storage.MODEL_ONLY:
        state["optimizer"] = {"exp_avg": torch.zeros(1000)}
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    if kind is not None:
        sums = storage.checksums(path, storage.rank_files(path, 0))
        storage.complete(path, {"step": step, "kind": kind, **marker}, sums)
    return path


def test_list_steps_markers_and_kinds(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 2)
    _save(tmp_path, 30, kind=None)
    _save(tmp_path, 40, kind=storage.MODEL_ONLY)
    (tmp_path / "step-x").mkdir()  # not step directories: no two names are one step
    (tmp_path / "step-05").mkdir()
    (tmp_path / "step-\u0667").mkdir()  # an Arabic-Indic 7: a digit to Python, not to us
    (tmp_path / "step-50").write_text("a file, not a directory")
    steps = storage.list_steps(tmp_path)
    assert [(s.step, s.complete, s.kind) for s in steps] == [
        (2, True, storage.FULL),
        (10, True, storage.FULL),
        (30, False, None),
        (40, True, storage.MODEL_ONLY),
    ]
    marker = storage.read_marker(steps[0].path)
    assert marker["step"] == 2 and marker["kind"] == storage.FULL
    assert sorted(marker["checksums"]) == [".metadata", "__0_0.distcp"]
    assert storage.read_marker(steps[2].path) == {}
    assert not list(steps[0].path.glob(".*.tmp*"))  # the marker was renamed into place
    assert storage.list_steps(tmp_path / "missing") == []


def test_verify_names_missing_and_truncated_shards(tmp_path):
    path = _save(tmp_path, 1)
    assert storage.verify(path) is None
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert "truncated" in storage.verify(path) and shard.name in storage.verify(path)
    shard.unlink()
    assert storage.verify(path) == f"shard {shard.name} is missing"
    (path / ".metadata").write_bytes(b"garbage")
    assert storage.verify(path).startswith("the .metadata file is unreadable")
    (path / ".metadata").unlink()
    assert storage.verify(path) == "the .metadata file is missing"


def test_purge_keeps_the_newest_and_the_newest_full(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    _save(tmp_path, 4, kind=storage.MODEL_ONLY)
    _save(tmp_path, 5, kind=None)  # incomplete: not counted, not removed
    assert storage.purge(tmp_path, keep=0) == []
    removed = storage.purge(tmp_path, keep=1)
    # step-4 is the newest; step-3 stays as the newest full checkpoint (a resume needs one)
    assert sorted(p.name for p in removed) == ["step-1", "step-2"]
    assert [s.step for s in storage.list_steps(tmp_path)] == [3, 4, 5]


def test_checksums_find_a_flipped_bit(tmp_path):
    path = _save(tmp_path, 1)
    names = sorted(storage.read_marker(path)["checksums"])
    assert storage.verify_checksums(path, names) is None
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, same length: the size check cannot see it
    shard.write_bytes(bytes(data))
    assert storage.verify(path) is None
    assert storage.verify_checksums(path, names) == (
        "__0_0.distcp does not match its checksum (damaged on disk)"
    )


def test_saves_without_a_marker_are_completed_or_moved_aside(tmp_path):
    whole = _save(tmp_path, 5, kind=None)  # the data and .metadata made it, the marker not
    export = _save(tmp_path, 7, kind=None, optimizer=False)  # a model-only export, likewise
    cut = _save(tmp_path, 6, kind=None)
    (cut / ".metadata").unlink()  # cut short before DCP's last file
    done = dict(storage.settle_incomplete(tmp_path))
    assert done[whole].startswith("completed") and done[cut].startswith("moved aside")
    assert done[export].startswith("completed")
    assert [(s.step, s.kind) for s in storage.list_steps(tmp_path)] == [
        (5, storage.FULL),
        (7, storage.MODEL_ONLY),  # its kind read from its keys: never resumed from
    ]
    assert storage.read_marker(whole)["completed_later"] is True
    assert storage.verify_checksums(whole, sorted(storage.read_marker(whole)["checksums"])) is None
    (aside,) = (tmp_path / "incomplete").iterdir()
    assert aside.name.startswith("step-6-") and (aside / "__0_0.distcp").is_file()


def test_a_step_completed_later_stays_on_its_branch(tmp_path):
    """A rewind to step 50 saved step-60 (its marker says so); step-70's marker was lost to a
    kill. Completed later, step-70 is on the same branch: a rerun of the rewind continues
    from it instead of rewinding again."""
    _save(tmp_path, 50)
    _save(tmp_path, 60, branch_from=50)
    _save(tmp_path, 70, kind=None)
    storage.settle_incomplete(tmp_path)
    assert storage.read_marker(tmp_path / "step-70")["branch_from"] == 50
    assert storage.branch_head(tmp_path, 50).step == 70


def test_newer_steps_are_set_aside_for_a_branch(tmp_path):
    for step in (2, 4, 6):
        _save(tmp_path, step)
    assert storage.set_aside_newer(tmp_path, 6) is None
    folder, names = storage.set_aside_newer(tmp_path, 2)
    assert names == ["step-4", "step-6"] and folder.parent.name == "branches"
    assert [s.step for s in storage.list_steps(tmp_path)] == [2]
    assert sorted(p.name for p in folder.iterdir()) == ["step-4", "step-6"]


def test_a_damaged_marker_is_a_problem(tmp_path):
    path = _save(tmp_path, 1)
    assert storage.marker_problem(path) is None
    marker = (path / storage.MARKER).read_text()
    (path / storage.MARKER).write_text(marker.replace('"checksums"', '"chdcksums"'))  # one bit
    assert (
        storage.marker_problem(path)
        == f"its {storage.MARKER} marker is damaged or unreadable (no checksums)"
    )
    (path / storage.MARKER).write_text(marker.replace('"full"', '"fuld"'))
    assert storage.marker_problem(path).startswith(
        f"its {storage.MARKER} marker is damaged (unknown kind"
    )
    (path / storage.MARKER).write_text(marker[:-5])  # not JSON any more
    assert storage.marker_problem(path) is not None
    converted = _save(tmp_path, 2, kind=None)
    for older in ({}, {"checksums": None}):  # older conversions: no sums, or null
        storage.write_marker(converted, {"kind": storage.CONVERTED, **older})
        assert storage.marker_problem(converted) is None
        assert storage.metadata_problem(converted) is None  # .metadata still readable


def test_metadata_problem_reads_no_data_file(tmp_path):
    """The marker and `.metadata` alone: a damaged shard is not its business, a damaged
    or unreadable `.metadata` is."""
    path = _save(tmp_path, 1)
    shard = path / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1] + b"?")
    assert storage.metadata_problem(path) is None
    metadata = path / ".metadata"
    data = bytearray(metadata.read_bytes())
    data[-2] ^= 0x01
    metadata.write_bytes(bytes(data))
    problem = storage.metadata_problem(path)
    assert problem in (".metadata does not match its checksum (damaged on disk)",
                       "the .metadata file is unreadable (UnpicklingError)"), problem  # fmt: skip
    metadata.write_bytes(b"garbage")
    assert storage.metadata_problem(path).startswith("the .metadata file is unreadable")


def test_step_problem_names_what_a_step_lacks_and_what_to_pass(tmp_path):
    """What the commands that read one step (evaluation, generation, export) say about it,
    from its small files alone: each kind of wrong path, with the step to pass instead."""
    good = _save(tmp_path, 1)
    incomplete = _save(tmp_path, 2, kind=None)
    assert storage.step_problem(good) is None
    assert storage.step_problem(tmp_path / "step-9") == (
        f"no such directory; pass a step that exists, e.g. {good}"
    )
    assert storage.step_problem(good / ".metadata") == "not a directory"
    assert storage.step_problem(tmp_path) == (
        f"not a DCP checkpoint directory (no .metadata); it holds step directories: pass "
        f"one, e.g. {good}"
    )
    assert storage.step_problem(incomplete) == (
        f"incomplete (no {storage.MARKER} marker: its save was cut short, or is still being "
        f"written); use a complete step, e.g. {good}"
    )
    assert storage.step_problem(incomplete, allow_incomplete=True) is None
    (incomplete / ".metadata").write_bytes(b"garbage")  # readable is all that is asked then
    assert storage.step_problem(incomplete, allow_incomplete=True).startswith(
        "damaged: the .metadata file is unreadable"
    )
    (good / ".metadata").write_bytes(b"garbage")
    assert storage.step_problem(good).startswith("damaged: ")
    assert storage.step_problem(good).endswith("; use another step")
    (good / ".metadata").unlink()  # a step's own files, without its .metadata: damaged
    assert storage.step_problem(good) == "damaged: its .metadata file is missing; use another step"
    export = tmp_path / "export"  # weights in another layout: how to convert them
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"")
    assert storage.step_problem(export) == (
        f"a Hugging Face export, not a DCP directory: convert it with python llama_to_dcp.py "
        f"--input_dir {export} --output_dir <new folder> and pass that folder"
    )


def test_moves_aside_never_collide_and_purge_unlinks_links(tmp_path):
    first = storage.move_aside(_save(tmp_path, 3), "replaced")
    second = storage.move_aside(_save(tmp_path, 3), "replaced")  # within the same second
    assert first != second and first.is_dir() and second.is_dir()
    elsewhere = _save(tmp_path / "elsewhere", 1)
    (tmp_path / "step-1").symlink_to(elsewhere)
    _save(tmp_path, 2)
    assert storage.purge(tmp_path, keep=1) == [tmp_path / "step-1"]
    assert [s.step for s in storage.list_steps(tmp_path)] == [2]
    assert (elsewhere / storage.MARKER).is_file()  # the link went, not what it points to
