"""Damaged files and changed settings, as a user would meet them (one process, or 2 ranks
under `python -m titan.launch`):

- a flipped bit in a saved weight, and one in the saved data loader position, are found at
  load (checksums), named in one line, and the fallback resumes from the previous step;
- resuming after changing the model is one line (not DCP's traceback), exit 2, and the
  run's config.toml is untouched by the failed start;
- a resume with another global batch or seq_len says so in one warning line;
- the lr logged for a step is the one that step used;
- under the launcher, a recipe mistake is one line and exit 2, before any worker starts.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import assert_refused, debug_args, read_metrics, run_train
from torch.distributed.checkpoint import FileSystemReader

from titan.optim import lr_factor


def _args(dump: Path, data: Path, *extra: str) -> list[str]:
    return debug_args(dump, data, "--checkpoint.interval=2", "--checkpoint.keep_latest_k=0", *extra)


@pytest.fixture
def trained(tmp_path, synthetic_dir) -> Path:
    result = run_train(_args(tmp_path, synthetic_dir, "--training.steps=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path


def _flip_bit(step_dir: Path, key: str) -> None:
    """Flip one bit in the middle of the bytes `key` occupies in its shard file."""
    metadata = FileSystemReader(str(step_dir)).read_metadata()
    info = next(s for i, s in metadata.storage_data.items() if i.fqn == key)
    shard = step_dir / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset + info.length // 2] ^= 0x04
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("key", ["model.layers.1.feed_forward.w2.weight", "dataloader.dp_rank_0"])
def test_a_flipped_bit_is_found_at_load(key, trained, synthetic_dir):
    step_dir = trained / "checkpoint" / "step-4"
    _flip_bit(step_dir, key)
    result = run_train(_args(trained, synthetic_dir, "--training.steps=6"))
    assert result.returncode == 2
    err = result.stderr.strip()
    assert err.startswith(f"error: checkpoint {step_dir} is corrupted: __0_0.distcp does not "
                          "match its checksum"), err  # fmt: skip
    assert "\n" not in err and "Traceback" not in result.stdout
    result = run_train(
        _args(trained, synthetic_dir, "--training.steps=6", "--checkpoint.fallback_on_corruption")
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Resumed from {trained / 'checkpoint' / 'step-2'} at step 2" in result.stdout


def test_another_model_is_one_line_and_keeps_the_config(trained, synthetic_dir):
    """Found from the step's small files, before any model is built: by a start, a dry
    run (which exited 0 here) and the launcher; nor does a start that trains nothing
    rewrite the config."""
    config = (trained / "config.toml").read_bytes()
    other = _args(trained, synthetic_dir, "--training.steps=6", "--training.vocab_size=512")
    for extra in ([], ["--job.dry_run"], ["--checkpoint.load_step=2", "--job.dry_run"]):
        result = run_train([*other, *extra])
        assert result.returncode == 2, (extra, result.stdout[-2000:])
        err = result.stderr.strip()
        step = "step-2" if "--checkpoint.load_step=2" in extra else "step-4"
        assert f"checkpoint {trained / 'checkpoint' / step} was saved by another model: " in err
        assert "model.tok_embeddings.weight has shape (256, 256)" in err
        assert "\n" not in err and "Traceback" not in result.stdout + result.stderr
        assert "layers, dim" not in result.stdout  # refused before the plan (model) is built
        assert (trained / "config.toml").read_bytes() == config
    # The launcher's check before any worker starts: the same line, not a traceback.
    result = run_train(other, nproc=2, launcher="titan.launch", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.startswith(f"error: checkpoint {trained / 'checkpoint' / 'step-4'} was ")
    assert "\n" not in result.stderr.strip() and result.stdout == ""
    assert (trained / "config.toml").read_bytes() == config
    # A new run with checkpointing off would replace the run's config and metrics: refused.
    metrics = (trained / "metrics.jsonl").read_bytes()
    for extra in ([], ["--job.dry_run"]):
        off = _args(trained, synthetic_dir, "--checkpoint.no_enable_checkpoint", *extra)
        assert_refused(run_train(off), "holds a run's checkpoints (newest step-4)")
    assert (trained / "metrics.jsonl").read_bytes() == metrics
    assert (trained / "config.toml").read_bytes() == config
    # A start with nothing to train leaves the config of the steps there (export reads it).
    result = run_train(_args(trained, synthetic_dir, "--training.steps=2", "--training.seq_len=32"))
    assert result.returncode == 0 and "Already trained 4 of 2 steps" in result.stdout
    assert (trained / "config.toml").read_bytes() == config


def test_layout_changes_are_logged_and_lr_is_the_steps(trained, synthetic_dir):
    result = run_train(
        _args(
            trained,
            synthetic_dir,
            "--training.steps=6",
            "--training.batch_size=4",
            "--training.seq_len=32",
        ),  # fmt: skip
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "WARNING Resuming with another layout: global batch 2 -> 4 sequences, seq_len 64 -> 32"
        in result.stdout
    )
    records = [r for r in read_metrics(trained) if "lr" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:  # the debug recipe: lr 2e-3, 10 warmup steps, cosine to 0.1x
        expected = 2e-3 * lr_factor(r["step"] - 1, 10, 6, "cosine", 0.1)
        assert math.isclose(r["lr"], expected, rel_tol=1e-9), r
    peak = 2e-3 * lr_factor(5, 10, 6, "cosine", 0.1)
    assert (
        f"training.warmup_steps = 10 covers all 6 training.steps: the learning rate peaks at "
        f"{peak:.3g}, never at optimizer.lr = 0.002" in result.stdout
    )


def test_a_resume_takes_the_commands_optimizer_settings(trained, synthetic_dir):
    """A rerun after a divergence lowers optimizer.lr: the moments are restored, the rate
    and the other settings are the command's, on the schedule at the saved step."""
    result = run_train(
        _args(
            trained,
            synthetic_dir,
            "--training.steps=6",
            "--optimizer.lr=1e-4",
            "--optimizer.weight_decay=0.2",
        )  # fmt: skip
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "Optimizer settings from this command, not the checkpoint: weight_decay 0.1 -> 0.2, "
        "lr (peak) 0.002 -> 0.0001" in result.stdout
    )
    records = {r["step"]: r for r in read_metrics(trained) if "lr" in r}
    for step in (5, 6):
        expected = 1e-4 * lr_factor(step - 1, 10, 6, "cosine", 0.1)
        assert math.isclose(records[step]["lr"], expected, rel_tol=1e-9), records[step]


def test_recipe_mistake_under_the_launcher_is_one_line(tmp_path, synthetic_dir):
    result = run_train(
        _args(tmp_path, synthetic_dir, "--training.steps=2", "--training.vocab_size=128"),
        nproc=2,
        launcher="titan.launch",
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: training.vocab_size = 128: must be >= 256 (spike data has tokens up to 255, "
        "the separator)"
    )
    assert result.stdout == "" and not (tmp_path / "config.toml").exists()
