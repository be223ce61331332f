"""Checks before heavy work (issue 15). Each wrong input stops `train.py` at start-up with
exit status 2 and one line `error: ...` on stderr naming the key, the value and the fix: no
traceback, nothing written that looks complete, and the dump folder's `config.toml` (an
earlier run's) left as it was. Covered:

- `training.vocab_size` below 256;
- `training.dataset_path` missing, or not a synthetic dataset while `training.dataset` is
  synthetic (`data.generate_synthetic` generates one there instead);
- `checkpoint.initial_load_path` missing, a folder of step directories, incomplete, of
  another depth, with other RoPE settings in its params.json (`initial_load_allow` lets
  chosen tensors and settings differ), damaged (a flipped bit); `checkpoint.load_step`
  without a checkpoint folder, or with checkpointing off;
- a dump folder that cannot be made or written; a checkpoint folder without room for one save;
- a validation split the dataset lacks;
- the lang-primate recipe's dry run names the checkpoint it lacks and how to make it; the
  dry run opens a dataset saved to disk as a start would;
- on 2 ranks only rank 0 touches the disk, and every rank stops with its message.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, TRAIN_ENV, assert_refused, run_train
from datasets import Dataset, DatasetDict
from datasets.table import InMemoryTable
from dist_utils import free_port, run_ranks

from titan import preflight
from titan.checkpoint import storage
from titan.checkpoint.initial import check_source, plan_initial_load
from titan.config import ConfigError, load_config
from titan.data import prepare_dataset
from titan.models import keymap
from titan.models.llama import build_model_args, param_shapes
from titan.trainer import dry_run_data

DEBUG = build_model_args("debugmodel", 256, 64)
EARLIER_CONFIG = "# the config of an earlier run in this folder\n"


def make_source(folder: Path, args=DEBUG, params: dict | None = None, complete: bool = True):
    """A DCP directory with the model tensors of `args` (and a params.json, a marker)."""
    import torch.distributed.checkpoint as dcp

    g = torch.Generator().manual_seed(0)
    state = {n: 0.02 * torch.randn(s, generator=g) for n, s in param_shapes(args).items()}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": state}, checkpoint_id=str(folder), no_dist=True)
    if params is not None:
        (folder / "params.json").write_text(json.dumps(params))
    if complete:
        names = sorted(p.name for p in folder.glob("*.distcp"))
        storage.complete(folder, {"kind": storage.CONVERTED}, storage.checksums(folder, names))
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """Wrong things to point a run at, made once."""
    root = tmp_path_factory.mktemp("sources")
    table = pa.table({"spike_counts": pa.array([[[1, 2], [3, 4]]], pa.list_(pa.list_(pa.uint8())))})
    (root / "parquet").mkdir()
    pq.write_table(table, root / "parquet" / "rows-0.parquet")
    DatasetDict({"train": Dataset(InMemoryTable(table))}).save_to_disk(str(root / "trainonly"))
    for step, complete in ((3, True), (5, False)):
        (root / "run" / "checkpoint" / f"step-{step}").mkdir(parents=True)
        if complete:
            storage.write_marker(root / "run" / "checkpoint" / f"step-{step}", {"kind": "full"})
    make_source(root / "incomplete", complete=False)
    shard = next(make_source(root / "damaged").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit: the sizes are right, the checksum not
    shard.write_bytes(bytes(data))
    make_source(root / "six", dataclasses.replace(DEBUG, n_layers=6))
    theta = dataclasses.replace(DEBUG, rope_theta=10000.0)
    make_source(root / "theta", params=keymap.meta_params_from_args(theta))
    return root


def _start(dump: Path, data: Path, *overrides: str, recipe: str = "debug_model"):
    """train.py on the debug recipe (1 process), its dump folder holding an earlier config."""
    dump.mkdir(parents=True, exist_ok=True)
    (dump / "config.toml").write_text(EARLIER_CONFIG)
    return run_train(
        [
            f"--job.config_file=train_configs/{recipe}.toml",
            f"--job.dump_folder={dump}",
            f"--training.dataset_path={data}",
            "--training.seq_len=64",
            "--training.batch_size=2",
            "--training.steps=1",
            *overrides,
        ],
        nproc=1,
        timeout=180,
    )


def _nothing_complete(dump: Path) -> None:
    assert (dump / "config.toml").read_text() == EARLIER_CONFIG
    assert not (dump / "metrics.jsonl").exists()
    assert not list(dump.glob("checkpoint/step-*"))


BAD_STARTS = {
    # name: (overrides; {S} = the sources folder, {T} = this test's folder), error parts
    "vocab below 256": (
        ["--training.vocab_size=128"],
        ["training.vocab_size = 128: must be >= 256", "255"],
    ),
    "synthetic dataset_path missing": (
        ["--training.dataset_path={T}/typo"],
        ["training.dataset_path = '{T}/typo': no such folder", "data.generate_synthetic = true"],
    ),
    "parquet folder as synthetic": (
        ["--training.dataset_path={S}/parquet"],
        ["'{S}/parquet' is a folder of parquet files", "training.dataset = 'custom'"],
    ),
    "local dataset_path missing": (
        ["--training.dataset=custom", "--training.dataset_path={T}/typo.parquet"],
        ["training.dataset_path = '{T}/typo.parquet': no such file or directory"],
    ),
    "initial_load_path missing": (
        ["--checkpoint.initial_load_path={T}/llama-dcp"],
        ["checkpoint.initial_load_path = '{T}/llama-dcp': no such directory", "llama_to_dcp.py"],
    ),
    "initial_load_path a folder of steps": (
        ["--checkpoint.initial_load_path={S}/run/checkpoint"],
        ["a folder of step directories: pass one, e.g. {S}/run/checkpoint/step-3"],
    ),
    "initial_load_path incomplete": (
        ["--checkpoint.initial_load_path={S}/incomplete"],
        ["'{S}/incomplete': incomplete (no .complete marker"],
    ),
    "initial_load_path damaged": (
        ["--checkpoint.initial_load_path={S}/damaged"],
        ["checkpoint.initial_load_path = '{S}/damaged' is damaged: __0_0.distcp does not match"],
    ),
    "initial_load_path with 6 layers": (
        ["--checkpoint.initial_load_path={S}/six"],
        [
            "18 tensors do not match this model: layers.4.attention.wq.weight (not in this model)",
            "source vs this model: layers 6 vs 4",
            "checkpoint.initial_load_allow",
        ],
    ),
    "initial_load_path with another rope_theta": (
        ["--checkpoint.initial_load_path={S}/theta"],
        [
            "its params.json has rope_theta = 10000.0 (this model: 500000.0)",
            "add rope_theta to checkpoint.initial_load_allow",
        ],
    ),
    "checkpoint folder inside a checkpoint": (
        ["--checkpoint.folder={S}/six/ck"],
        [
            "checkpoint.folder = '{S}/six/ck'",
            "is inside the checkpoint {S}/six; nothing is written into",
        ],
    ),
    "validation split missing": (
        [
            "--training.dataset=custom",
            "--training.dataset_path={S}/trainonly",
            "--validation.enable",
            "--validation.freq=1",
        ],
        ["validation.split = 'test': {S}/trainonly: no split 'test'; it has: train"],
    ),  # fmt: skip
    "load_step without a checkpoint folder": (
        ["--checkpoint.load_step=7"],
        ["checkpoint.load_step = 7: there is no checkpoint folder"],
    ),
    "load_step with checkpointing off": (
        ["--checkpoint.load_step=7", "--checkpoint.enable_checkpoint=false"],
        ["checkpoint.load_step = 7 but checkpoint.enable_checkpoint is false"],
    ),
}


@pytest.mark.parametrize("name", list(BAD_STARTS))
def test_wrong_input_stops_the_start_with_one_line(tmp_path, synthetic_dir, sources, name):
    overrides, parts = BAD_STARTS[name]
    fill = lambda s: s.replace("{S}", str(sources)).replace("{T}", str(tmp_path))  # noqa: E731
    dump = tmp_path / "run"
    assert_refused(_start(dump, synthetic_dir, *map(fill, overrides)), *map(fill, parts))
    _nothing_complete(dump)
    assert not (tmp_path / "typo").exists()  # a mistyped dataset path is never generated into


def test_initial_load_allow_lets_chosen_tensors_differ(tmp_path, synthetic_dir, sources):
    allow = "tok_embeddings.weight,output.weight,layers.4.*,layers.5.*"
    result = _start(
        tmp_path / "run",
        synthetic_dir,
        f"--checkpoint.initial_load_path={sources / 'six'}",
        f"--checkpoint.initial_load_allow={allow}",
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "Initialized 39 of 39 model tensors" in result.stdout
    assert "ignored 18 source tensors: layers.4.attention.wq.weight (not in this model)" in (
        result.stdout
    )


def test_unwritable_dump_folder(tmp_path, synthetic_dir):
    (tmp_path / "file.txt").write_text("a file, not a folder")  # refuses writes even as root
    dump = tmp_path / "file.txt" / "run"
    result = run_train(
        [
            "--job.config_file=train_configs/debug_model.toml",
            f"--job.dump_folder={dump}",
            f"--training.dataset_path={synthetic_dir}",
        ],
        nproc=1,
        timeout=180,
    )
    assert_refused(result, f"job.dump_folder = '{dump}': cannot make the folder", "is a file")
    assert (tmp_path / "file.txt").read_text() == "a file, not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode 0o500 folder anyway")
def test_read_only_dump_folder(tmp_path, synthetic_dir):
    dump = tmp_path / "run"
    dump.mkdir()
    dump.chmod(0o500)
    try:
        result = _start(dump, synthetic_dir)
    finally:
        dump.chmod(0o700)
    assert_refused(result, "job.dump_folder", "Permission denied")


def test_lang_primate_dry_run_names_the_missing_checkpoint():
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--job.config_file=train_configs/lang_primate_8b_131k.toml",
            "--job.dry_run",
        ],
        cwd=ROOT,
        env={**TRAIN_ENV, "WORLD_SIZE": "64"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert_refused(
        result,
        "checkpoint.initial_load_path = './checkpoints/llama-3.1-8b-dcp': no such directory",
        "python llama_to_dcp.py --input_dir <Llama weights> "
        "--output_dir ./checkpoints/llama-3.1-8b-dcp --flavor 8B",
    )


# ----------------------------------------------------------------------------- in-process


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(
        [
            "--job.config_file=train_configs/debug_model.toml",
            f"--job.dump_folder={tmp_path / 'run'}",
            "--training.seq_len=64",
            *overrides,
        ]
    )


def test_generate_synthetic_creates_the_path(tmp_path):
    path = tmp_path / "new" / "synthetic"
    cfg = _cfg(tmp_path, f"--training.dataset_path={path}", "--data.synthetic_rows=4")
    with pytest.raises(ConfigError, match="no such folder"):
        preflight.check_dry_run(cfg)
    cfg.data.generate_synthetic = True
    preflight.check_dry_run(cfg)
    prepare_dataset(cfg)
    assert (path / "synthetic.json").is_file()
    cfg.data.generate_synthetic = False  # from now on it is read like any synthetic dataset
    preflight.check_dry_run(cfg)
    cfg.training.dataset = "custom"
    cfg.data.generate_synthetic = True
    with pytest.raises(ConfigError, match="generate_synthetic = true needs training.dataset"):
        preflight.check_dry_run(cfg)


def test_dry_run_opens_a_dataset_saved_to_disk(tmp_path, synthetic_dir, sources):
    """What a start would find wrong in a dataset saved to disk (a missing split, a source
    filter that keeps nothing), the dry run finds too; others are left to the real run."""
    validate = ["--validation.enable", "--validation.freq=1"]
    cfg = _cfg(tmp_path, f"--training.dataset_path={synthetic_dir}", *validate)
    assert dry_run_data(cfg, 2).splitlines() == [
        f"data: synthetic dataset {synthetic_dir} [train], 24 rows",
        f"validation: synthetic dataset {synthetic_dir} [test], 80 of its 1,250 windows of "
        "64 tokens every 1 step",
    ]
    typo = _cfg(tmp_path, f"--training.dataset_path={synthetic_dir}", "--data.source_datasets=x")
    with pytest.raises(ConfigError, match="no row has source_dataset in"):
        dry_run_data(typo, 1)
    hub = _cfg(tmp_path, "--training.dataset=primate")
    assert dry_run_data(hub, 1) == (
        "data: eminorhan/neural-pile-primate (not opened: the real run has `datasets` convert it)"
    )
    dump = tmp_path / "run"
    trainonly = ["--training.dataset=custom", f"--training.dataset_path={sources}/trainonly"]
    result = _start(dump, synthetic_dir, *trainonly, *validate, "--job.dry_run")
    assert_refused(result, f"validation.split = 'test': {sources}/trainonly: no split 'test'")
    # what a start warns about, the dry run warns about (1 step, the recipe's warmup of 10)
    assert "training.warmup_steps = 10 covers all 1 training.steps" in result.stdout
    _nothing_complete(dump)


def test_initial_load_allow_names_settings_and_tensors(sources):
    theta = str(sources / "theta")
    default = ["tok_embeddings.weight", "output.weight"]
    with pytest.raises(ConfigError, match="rope_theta = 10000.0"):
        plan_initial_load(theta, DEBUG, default)
    plan = plan_initial_load(theta, DEBUG, [*default, "rope_theta"])
    assert len(plan.load) == 39 and not plan.fresh and not plan.ignored
    assert plan.settings == ["rope_theta = 10000.0 (this model: 500000.0)"]  # logged
    # Patterns: the two extra layers of a deeper source may be left out.
    plan = plan_initial_load(str(sources / "six"), DEBUG, ["layers.[45].*"])
    assert len(plan.ignored) == 18 and len(plan.load) == 39
    wide = dataclasses.replace(DEBUG, multiple_of=256)  # another FFN width: every FFN differs
    with pytest.raises(ConfigError, match="FFN width 704 vs 768"):
        plan_initial_load(str(sources / "six"), wide, ["layers.[45].*"])


def test_check_source_names_what_a_folder_is(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="a Hugging Face export, not a DCP directory: convert"):
        check_source(str(hf), DEBUG)
    (tmp_path / "weights.pth").write_bytes(b"")
    with pytest.raises(ConfigError, match="a file, not a DCP checkpoint directory"):
        check_source(str(tmp_path / "weights.pth"), DEBUG)
    missing_step = str(tmp_path / "other" / "checkpoint" / "step-50")
    with pytest.raises(ConfigError, match="has no steps: train its run that far first"):
        check_source(missing_step, DEBUG)


def test_no_room_for_one_checkpoint(tmp_path, monkeypatch, caplog):
    cfg = _cfg(tmp_path)
    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(10**12, 0, 10**6))
    needed, _ = preflight.checkpoint_bytes(cfg, DEBUG)
    assert needed == 12 * sum(torch.Size(s).numel() for s in param_shapes(DEBUG).values())
    with pytest.raises(ConfigError) as e:
        preflight.check_run(cfg)
    message = str(e.value)
    assert f"the checkpoint folder {tmp_path / 'run' / 'checkpoint'} has 0.00 GiB free" in message
    assert "one checkpoint needs about 0.03 GiB" in message and "job.dump_folder" in message
    with caplog.at_level(logging.WARNING, logger="titan"):
        preflight.check_dry_run(cfg)  # the dry run may not run where the job will: a warning
    assert "a real start refuses this" in caplog.text
    cfg.checkpoint.model_weights_only, cfg.checkpoint.export_dtype = True, "bfloat16"
    cfg.checkpoint.interval = cfg.training.steps  # no full save before the export
    assert preflight.checkpoint_bytes(cfg, DEBUG)[0] == needed // 6


def _probe_on_two_ranks(dump: str) -> tuple[str, int]:
    """On each rank: the start-up checks through run_on_rank0; (its error, probes made)."""
    from titan.run import run_on_rank0

    cfg = load_config(
        ["--job.config_file=train_configs/debug_model.toml", f"--job.dump_folder={dump}"]
    )
    probes = []
    real = preflight._check_writable
    preflight._check_writable = lambda *a, **k: (probes.append(1), real(*a, **k))[1]
    try:
        run_on_rank0(preflight.check_run, cfg)
    except ConfigError as e:
        return str(e), len(probes)
    return "", len(probes)


def test_only_rank0_touches_the_disk(tmp_path):
    (tmp_path / "file.txt").write_text("")
    results = run_ranks(_probe_on_two_ranks, 2, str(tmp_path / "file.txt" / "run"))
    assert results[0][1] == 1 and results[1][1] == 0  # only rank 0 probed
    assert results[0][0] == results[1][0] and "is a file" in results[0][0]


def test_a_world_without_its_launcher(tmp_path):
    """WORLD_SIZE left in the environment of a plain `python train.py` (the dry run's
    example without --job.dry_run) is one line, not a rendezvous error or a 30-minute
    wait; ranks that never all start end with the init timeout named, status 5."""
    import subprocess
    import sys

    from titan.cli import EXIT_STUCK

    def start(**env: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(ROOT / "train.py"), "--job.config_file",
                   "train_configs/debug_model.toml", f"--job.dump_folder={tmp_path / 'run'}",
                   "--job.init_timeout_s=3"]  # fmt: skip
        return subprocess.run(command, cwd=ROOT, env={**TRAIN_ENV, **env}, capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    assert_refused(start(WORLD_SIZE="2"), "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, "
                   "MASTER_PORT not", "python -m titan.launch --nproc_per_node 2")  # fmt: skip
    alone = start(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert alone.returncode == EXIT_STUCK, alone.stderr[-2000:]
    assert alone.stderr.strip().startswith(
        "error: not all 2 ranks joined within job.init_timeout_s = 3 s"
    ), alone.stderr
    assert "\n" not in alone.stderr.strip() and not (tmp_path / "run").exists()
