"""Checkpoints that survive crashes (issue 4), with real torchrun jobs on 2 CPU ranks:

- kill -9 of the whole job at arbitrary points (mid-step, during an async save), then
  the same command again: the per-step losses after each restart are bit-identical to an
  uninterrupted run's (so the data stream resumed exactly too), and so are the final weights;
- torchrun --max_restarts: one rank killed once, the job restarts from the newest
  checkpoint and finishes with the uninterrupted run's losses;
- an interrupted save is never loaded (it is moved aside; one whose data is whole is
  completed); keep_latest_k holds; a truncated shard stops the run with one line, and
  fallback_on_corruption resumes from the previous step;
- save on 2 ranks, load on 1 and on 4: identical logits; resuming under a different
  world size reshards model, optimizer and data; exclude_from_loading skips a state;
- initial_load_path from a 128256-token checkpoint into a 256-token model loads every
  block and reports the two skipped tensors.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_refused,
    debug_args,
    launch_train,
    logged_step,
    read_metrics,
    run_train,
    train_losses,
    wait_for,
    worker_pids,
)
from dist_utils import run_ranks

from titan.checkpoint import checkpoint_keys, list_steps, storage

STEPS = 12


def _args(dump: Path, data: Path, *extra: str) -> list[str]:
    return debug_args(
        dump,
        data,
        f"--training.steps={STEPS}",
        "--checkpoint.interval=4",
        "--checkpoint.keep_latest_k=0",
        *extra,
    )


def _model_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = step_dir.parent / f"{step_dir.name}.pt"
    dcp_to_torch_save(str(step_dir), str(out))
    state = torch.load(out, weights_only=False)
    out.unlink()
    return state["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_dir) -> Path:
    """One uninterrupted run to compare the interrupted ones with."""
    dump = tmp_path_factory.mktemp("reference")
    result = run_train(_args(dump, synthetic_dir), nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return dump


def _saving(dump: Path) -> bool:
    """A step directory exists but is not complete yet: a save is being written."""
    return any(not s.complete for s in list_steps(dump / "checkpoint") if s.step != 4)


@pytest.mark.slow
def test_kill9_anywhere_then_restart_is_bit_identical(tmp_path, synthetic_dir, reference):
    args = _args(tmp_path, synthetic_dir, "--checkpoint.async_mode=async")
    kill_when = [
        lambda: logged_step(tmp_path) >= 6,  # mid-run, between saves
        lambda: _saving(tmp_path) or logged_step(tmp_path) >= 9,
    ]  # during a save
    for condition in kill_when:
        proc = launch_train(args)
        wait_for(condition, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    result = run_train(args, nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Resumed from" in result.stdout
    assert train_losses(tmp_path) == train_losses(reference)  # exact float equality, every step
    ours = _model_tensors(tmp_path / "checkpoint" / f"step-{STEPS}")
    theirs = _model_tensors(reference / "checkpoint" / f"step-{STEPS}")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank(tmp_path, synthetic_dir, reference):
    proc = launch_train(_args(tmp_path, synthetic_dir), max_restarts=1)
    wait_for(
        lambda: (
            (tmp_path / "checkpoint" / "step-4" / ".complete").exists()
            and logged_step(tmp_path) >= 6
        ),
        proc,
    )
    os.kill(max(worker_pids(tmp_path)), signal.SIGKILL)  # one rank dies, as on a node failure
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "torchrun restart 1" in out and "Resumed from" in out
    assert train_losses(tmp_path) == train_losses(reference)


def test_failing_run_closes_with_an_async_save_in_flight(tmp_path, synthetic_dir):
    """A run that diverges right after starting an async save still closes cleanly: the
    save ends complete with its marker (or without one, never half-marked) and every
    rank exits with the run's error instead of hanging."""
    from titan.checkpoint import verify

    args = _args(tmp_path, synthetic_dir, "--checkpoint.async_mode=async")
    args += ["--checkpoint.interval=1", "--optimizer.lr=1e12", "--training.warmup_steps=0",
             "--training.max_norm=0", "--training.max_consecutive_bad_steps=1"]  # fmt: skip
    result = run_train(args, nproc=2, timeout=300)
    assert result.returncode != 0
    assert "consecutive steps with a non-finite loss" in result.stderr
    assert "Checkpoint step-1: save started" in result.stdout
    steps = list_steps(tmp_path / "checkpoint")
    assert steps
    for s in steps:
        assert not s.complete or verify(s.path) is None, s


@pytest.mark.slow
def test_incomplete_corrupt_retention_and_reshard(tmp_path, synthetic_dir, reference):
    ckpt = tmp_path / "checkpoint"
    result = run_train(_args(tmp_path, synthetic_dir, "--training.steps=8"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-4", "step-8"]

    # A step whose data is whole but whose marker is missing (a kill right after an async
    # save) is verified and completed, never deleted.
    (ckpt / "step-8" / ".complete").unlink()
    result = run_train(_args(tmp_path, synthetic_dir, "--training.steps=8"), nproc=2)
    assert "Checkpoint step-8 had no marker: completed" in result.stdout
    assert f"Resumed from {ckpt / 'step-8'} at step 8" in result.stdout
    # A save cut short (no .metadata, no marker) is never loaded, and is moved aside.
    (ckpt / "step-8" / ".complete").unlink()
    (ckpt / "step-8" / ".metadata").unlink()
    result = run_train(_args(tmp_path, synthetic_dir, "--training.steps=8"), nproc=2)
    assert "Checkpoint step-8 had no marker: moved aside" in result.stdout
    assert f"Resumed from {ckpt / 'step-4'} at step 4" in result.stdout
    shutil.rmtree(ckpt / "incomplete")

    # A truncated shard: one clear line, then fallback on request.
    shard = next((ckpt / "step-8").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    # (one process: under torchrun, the agent adds its own report of the failed child)
    result = run_train(_args(tmp_path, synthetic_dir), nproc=1)
    assert result.returncode != 0
    err = result.stderr.strip()
    assert err.startswith(f"error: checkpoint {ckpt / 'step-8'} is corrupted: shard "), err
    assert "truncated" in err and "\n" not in err and "Traceback" not in result.stdout
    # The damaged step is moved out of the way: the retention limit never counts it, so the
    # saves after step 4 (6, 8, ...) are kept rather than it.
    result = run_train(
        _args(
            tmp_path,
            synthetic_dir,
            "--checkpoint.fallback_on_corruption",
            "--checkpoint.interval=2",
            "--checkpoint.keep_latest_k=1",
        ),
        nproc=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from {ckpt / 'step-4'} at step 4" in result.stdout
    assert "Removed old checkpoint step-6" in result.stdout
    assert train_losses(tmp_path) == train_losses(reference)
    assert [s.path.name for s in list_steps(ckpt)] == ["step-12"]  # keep_latest_k=1
    assert [p.name[:7] for p in (ckpt / "damaged").iterdir()] == ["step-8-"]
    assert not (ckpt / "replaced").exists()

    # One rank resumes what two ranks saved: model, optimizer and data are resharded.
    result = run_train(_args(tmp_path, synthetic_dir, "--training.steps=14"), nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2 -> 1 (model, optimizer and data resharded" in result.stdout
    assert max(train_losses(tmp_path)) == 14

    # exclude_from_loading: the data position starts afresh, the rest is restored; the same
    # option again (a requeue of the same command) leaves nothing out: once per line of saves.
    first, again = (
        run_train(_args(tmp_path, synthetic_dir, f"--training.steps={steps}",
                        "--checkpoint.exclude_from_loading=dataloader"), nproc=1)
        for steps in (15, 16)
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    assert "at step 14" in first.stdout and "not loaded: dataloader" in first.stdout
    result = again
    assert result.returncode == 0, result.stderr[-3000:]
    assert "this run's line of saves began; step-15 is loaded whole" in result.stdout
    assert "at step 15" in result.stdout and "not loaded" not in result.stdout


def _initial_load(source: str) -> tuple[str, dict[str, bool]]:
    """On each rank: build the debug model, load `source` through initial_load_path."""
    import logging

    from titan.config import load_config
    from titan.run import build_run

    cfg = load_config(
        [
            "--job.config_file=train_configs/debug_model.toml",
            f"--checkpoint.initial_load_path={source}",
            "--training.seq_len=64",
            "--job.dump_folder=/nonexistent",
            "--checkpoint.no_enable_checkpoint",
        ]
    )
    run = build_run(cfg, train=False)
    model = run.model
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("titan").addHandler(handler)
    logging.getLogger("titan").setLevel(logging.INFO)
    with run:
        run.checkpointer.load()
    saved = torch.load(Path(source) / "reference.pt")
    same = {name: torch.equal(p.full_tensor(), saved[name]) for name, p in model.named_parameters()}
    return "\n".join(records), same


def test_initial_load_skips_mismatched_vocabulary(tmp_path):
    import torch.distributed.checkpoint as dcp

    from titan.checkpoint import storage
    from titan.models.llama import Transformer, build_model_args

    source = Transformer(build_model_args("debugmodel", 128256, 64))
    source.init_weights(seed=3)
    state = {k: v.detach() for k, v in source.state_dict().items()}
    dcp.save({"model": state}, checkpoint_id=str(tmp_path), no_dist=True)
    storage.write_marker(tmp_path, {"kind": storage.CONVERTED})  # only complete ones load
    torch.save(state, tmp_path / "reference.pt")
    log, same = run_ranks(_initial_load, 2, str(tmp_path))[0]
    assert "kept fresh initialization for 2: tok_embeddings.weight (shape" in log
    assert "output.weight (shape (128256, 256) != (256, 256))" in log
    assert not same.pop("tok_embeddings.weight") and not same.pop("output.weight")
    assert all(same.values()), [k for k, v in same.items() if not v]


def _logits_through_checkpoint(folder: str, save: bool) -> torch.Tensor:
    """Build the debug model (seed differs between saver and loaders), save it or load
    the newest checkpoint, and return its logits on a fixed batch."""
    from titan.config import load_config
    from titan.run import build_run

    cfg = load_config(
        [
            "--job.config_file=train_configs/debug_model.toml",
            f"--job.dump_folder={folder}",
            "--training.seq_len=64",
            f"--training.seed={1 if save else 2}",
            "--checkpoint.enable_checkpoint",
        ]
    )
    with build_run(cfg, train=False) as run:
        if save:
            run.checkpointer.save(1)
            run.checkpointer.save(1, sync=True)  # (a stop signal at a save step) not again
        else:
            assert run.checkpointer.load()
    model = run.model
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(tokens)


def test_save_on_two_ranks_load_on_one_and_four(tmp_path):
    saved = run_ranks(_logits_through_checkpoint, 2, str(tmp_path), True)[0]
    assert [s.step for s in list_steps(tmp_path / "checkpoint")] == [1]
    assert not (tmp_path / "checkpoint" / "replaced").exists()
    on_one = run_ranks(_logits_through_checkpoint, 1, str(tmp_path), False)[0]
    on_four = run_ranks(_logits_through_checkpoint, 4, str(tmp_path), False)
    assert torch.equal(on_one, saved)
    assert all(torch.equal(logits, saved) for logits in on_four)


def test_a_folder_with_only_a_model_only_export_is_not_trained_over(tmp_path, synthetic_dir):
    """A run that kept only its final model-only export has nothing to resume: a longer
    run there would start afresh over its metrics and export; loading the export as a
    step names initial_load_path instead."""
    args = debug_args(tmp_path, synthetic_dir, "--training.steps=2",
                      "--checkpoint.model_weights_only", "--checkpoint.interval=10")  # fmt: skip
    assert run_train(args).returncode == 0
    metrics, config = ((tmp_path / f).read_bytes() for f in ("metrics.jsonl", "config.toml"))
    export = tmp_path / "checkpoint" / "step-2"
    again = run_train(args)  # finished: the way on is a new run from the export
    assert again.returncode == 0, again.stderr[-2000:]
    way_on = (f"to train on, start a new run with checkpoint.initial_load_path = {export} and "
              "another job.dump_folder, as an export cannot be resumed")  # fmt: skip
    assert way_on in again.stdout
    for extra in ([], ["--job.dry_run"]):  # refused before the model is built (no plan)
        longer = run_train([*args, "--training.steps=4", *extra])
        assert_refused(longer, f"holds the model-only export {export} but no full checkpoint "
                       "to resume from", "checkpoint.initial_load_path")  # fmt: skip
        assert "layers, dim" not in longer.stdout
    assert_refused(run_train([*args, "--training.steps=4", "--checkpoint.load_step=2"]),
                   f"checkpoint.load_step = 2: {export} is a model-only export")  # fmt: skip
    result = run_train([*args, "--training.vocab_size=512"])  # the finished run, another model
    assert result.returncode != 0 and f"checkpoint {export} was saved by another model" in (
        result.stderr
    )
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics
    assert (tmp_path / "config.toml").read_bytes() == config


def test_a_longer_run_after_a_final_export_says_what_it_trains_again(tmp_path, synthetic_dir):
    """A finished run's last step is a model-only export, which cannot be resumed: a rerun
    says how a longer run goes on, and the longer run resumes the full step before it,
    names the steps it trains again, and keeps the export it replaces."""
    args = debug_args(tmp_path, synthetic_dir, "--checkpoint.model_weights_only",
                      "--checkpoint.interval=2")  # fmt: skip
    assert run_train([*args, "--training.steps=4"]).returncode == 0
    again = run_train([*args, "--training.steps=4"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert ("Already trained 4 of 4 steps: nothing to do (to train on, a larger --training.steps "
            "resumes the last full checkpoint, step-2, and trains steps 3-4 again") in (
        again.stdout
    )  # fmt: skip
    longer = run_train([*args, "--training.steps=6"])
    assert longer.returncode == 0, longer.stderr[-2000:]
    export = tmp_path / "checkpoint" / "step-4"
    assert (f"{export} is a model-only export, which cannot be resumed: resumed step-2 instead, "
            "so steps 3-4 are trained again; moved the export to "
            f"{tmp_path / 'checkpoint' / 'replaced' / 'step-4-'}") in longer.stdout  # fmt: skip
    (kept,) = (tmp_path / "checkpoint" / "replaced").iterdir()
    assert all(k.startswith("model.") for k in checkpoint_keys(kept))
    kinds = [(s.step, s.kind) for s in list_steps(tmp_path / "checkpoint")]
    assert kinds == [(4, storage.FULL), (6, storage.MODEL_ONLY)]  # keep_latest_k = 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_the_data_can_change_twice(tmp_path, synthetic_dir):
    """exclude_from_loading = ['dataloader'] is applied once per line of saves (a requeue
    of the same command resumes the data position whole), and again when the data changed
    since (the saved position is for other data)."""
    base = debug_args(tmp_path, synthetic_dir, "--checkpoint.interval=2")
    exclude = "--checkpoint.exclude_from_loading=dataloader"
    assert run_train([*base, "--training.steps=2"]).returncode == 0
    for steps, source, again in [(4, 0, False), (6, 1, True), (8, 1, False)]:
        result = run_train([*base, f"--training.steps={steps}", exclude,
                            f"--data.source_datasets=synthetic_{source}"])  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        assert ("applies again; the data starts from the beginning" in result.stdout) == again
    assert "Resumed from" in result.stdout and "step 6" in result.stdout
