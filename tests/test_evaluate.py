"""Evaluation (`evaluate.py`) and validation during training.

- A checkpoint evaluated on 1 and on 2 ranks gives the same numbers (fp32, 1e-6); they
  equal a hand computation of the cross-entropy over the test split's windows with the
  same weights in a plain model; per-source numbers add up (token-weighted) to the total;
  the checkpoint directory is byte-identical afterwards.
- A run with validation every 5 steps, killed with kill -9 and resumed, takes the same
  training steps as an uninterrupted one, and logs val_loss.
- Bad inputs: no checkpoint yet, another model's checkpoint, validating on the training
  split: one line, exit 2.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ROOT,
    TRAIN_ENV,
    debug_args,
    launch_train,
    logged_step,
    read_metrics,
    run_train,
    train_command,
    train_losses,
    wait_for,
)

SEQ = 64


def _args(dump: Path, data: Path, *extra: str) -> list[str]:
    return debug_args(dump, data, *extra, seq_len=SEQ)


def _evaluate(args: list[str], nproc: int, launcher: str = "torch.distributed.run") -> dict:
    import subprocess

    command = train_command(nproc, launcher=launcher)
    command[-1] = str(ROOT / "evaluate.py")  # the same launch, the other script
    result = subprocess.run(
        command + args,
        cwd=ROOT,
        env=TRAIN_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return {"rc": result.returncode, "out": result.stdout, "err": result.stderr}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_dir) -> Path:
    dump = tmp_path_factory.mktemp("trained")
    result = run_train(_args(dump, synthetic_dir, "--training.steps=6"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return dump


@pytest.fixture(scope="module")
def short_split(tmp_path_factory) -> Path:
    """A synthetic dataset whose test split is a few thousand tokens (the shared one's,
    ~80,000, take minutes to evaluate on one rank, on two and by hand)."""
    from titan.data.synthetic import generate

    out = tmp_path_factory.mktemp("short") / "synthetic"
    return generate(out, rows=4, seed=1, test_rows=4, neurons=(8, 16), bins=(64, 256))


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _by_hand(step_dir: Path, data: Path) -> dict:
    """The test split's loss computed here: rows in order, tokenized, one stream, windows
    of SEQ + 1 tokens overlapping by one, a plain (unsharded) model with the weights."""
    import datasets
    import torch.distributed.checkpoint as dcp

    from titan.data.tokenizer import SEPARATOR, tokenize_row
    from titan.models.llama import Transformer, build_model_args

    split = datasets.load_from_disk(str(data))["test"]
    tokens, sources = [], []
    for row in split:
        t = tokenize_row(row["spike_counts"])
        tokens.append(torch.from_numpy(t.astype("int64")))
        sources += [row["source_dataset"]] * len(t)
    stream = torch.cat(tokens)
    model = Transformer(build_model_args("debugmodel", 256, SEQ))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dcp.load({"model": state}, checkpoint_id=str(step_dir), no_dist=True)
    model.load_state_dict(state)
    model.init_rope()
    losses = torch.zeros(len(stream), dtype=torch.float64)  # the loss of predicting token i
    with torch.no_grad():
        for start in range(0, len(stream) - 1, SEQ):
            window = stream[start : start + SEQ + 1]
            logits = model(window[None, :-1])[0]
            ce = F.cross_entropy(logits, window[1:], reduction="none")
            losses[start + 1 : start + len(window)] = ce.double()
    labels = stream[1:]
    per_token = losses[1:]
    counts = labels != SEPARATOR
    by_source: dict[str, list[float]] = {}
    for loss, source in zip(per_token.tolist(), sources[1:], strict=True):
        by_source.setdefault(source, []).append(loss)
    return {
        "loss": per_token.mean().item(),
        "tokens": len(labels),
        "loss_counts": per_token[counts].mean().item(),
        "by_source": {k: sum(v) / len(v) for k, v in by_source.items()},
    }


def test_evaluation_on_one_and_two_ranks_matches_a_hand_computation(trained, short_split):
    step_dir = trained / "checkpoint" / "step-6"
    before = _digest(step_dir)
    results = {}
    for nproc in (1, 2):
        out = trained / f"eval-{nproc}.json"
        run = _evaluate(_args(trained, short_split, f"--eval.output={out}"), nproc)
        assert run["rc"] == 0, run["err"][-3000:]
        results[nproc] = json.loads(out.read_text())
        assert "spike counts only" in run["out"] and "bits/token" in run["out"]
        assert "blocks: forward only (evaluation)" in run["out"]  # planned as what it does
    one, two = results[1], results[2]
    assert one["checkpoint"] == str(step_dir) and one["tokens"] == two["tokens"]
    for key in ("loss", "loss_counts", "bits_per_token"):
        assert math.isclose(one[key], two[key], rel_tol=1e-6), key
    hand = _by_hand(step_dir, short_split)
    assert len(hand["by_source"]) == 2 and one["windows"] > 40  # both sources, many batches
    assert one["tokens"] == hand["tokens"]
    assert math.isclose(one["loss"], hand["loss"], rel_tol=1e-5)
    assert math.isclose(one["loss_counts"], hand["loss_counts"], rel_tol=1e-5)
    assert math.isclose(one["bits_per_token"], one["loss"] / math.log(2), rel_tol=1e-12)
    assert one["by_source"].keys() == hand["by_source"].keys()
    for name, r in one["by_source"].items():
        assert math.isclose(r["loss"], hand["by_source"][name], rel_tol=1e-5), name
    weighted = sum(r["loss"] * r["tokens"] for r in one["by_source"].values())
    assert math.isclose(weighted / one["tokens"], one["loss"], rel_tol=1e-9)
    assert sum(r["tokens"] for r in one["by_source"].values()) == one["tokens"]
    counts = sum(r["loss_counts"] * r["count_tokens"] for r in one["by_source"].values())
    assert math.isclose(counts / one["count_tokens"], one["loss_counts"], rel_tol=1e-9)
    assert sum(r["count_tokens"] for r in one["by_source"].values()) == one["count_tokens"]
    assert _digest(step_dir) == before  # nothing in the checkpoint changed

    # The default output lies beside the step directory, not in it.
    run = _evaluate(_args(trained, short_split, "--eval.max_tokens=200"), 1)
    assert run["rc"] == 0, run["err"][-2000:]
    beside = json.loads((trained / "checkpoint" / "step-6.eval-test.json").read_text())
    assert beside["windows"] == 3 and beside["tokens"] == 3 * SEQ <= 200  # whole windows
    assert _digest(step_dir) == before


def test_evaluation_bad_inputs(trained, synthetic_dir, tmp_path):
    run = _evaluate(_args(tmp_path, synthetic_dir), 1)
    assert run["rc"] == 2 and run["err"].count("\n") == 1, run["err"]
    assert "no complete checkpoint in" in run["err"] and "--eval.checkpoint" in run["err"]
    assert not (tmp_path / "checkpoint").exists()  # evaluation creates no folder
    out = tmp_path / "dry" / "results.json"
    run = _evaluate(_args(trained, synthetic_dir, "--job.dry_run", f"--eval.output={out}"), 1)
    assert run["rc"] == 0, run["err"]
    assert f"dry run: would evaluate {trained / 'checkpoint' / 'step-6'}" in run["out"]
    assert not out.parent.exists() and "Loaded the model weights" not in run["out"]
    step_dir = trained / "checkpoint" / "step-6"
    wrong = _args(tmp_path, synthetic_dir, f"--eval.checkpoint={step_dir}",
                  "--training.vocab_size=512")  # fmt: skip
    for extra in ([], ["--job.dry_run"]):  # the dry run reads the step's .metadata too
        run = _evaluate([*wrong, *extra], 1)
        assert run["rc"] == 2 and run["err"].count("\n") == 1, run["err"]
        assert "model.tok_embeddings.weight has shape (256, 256)" in run["err"]
        assert "check model.flavor" in run["err"]
    (tmp_path / "dir.json").mkdir()
    folder = _args(tmp_path, synthetic_dir, f"--eval.checkpoint={step_dir}",
                   f"--eval.output={tmp_path / 'dir.json'}")  # fmt: skip
    run = _evaluate(folder, 1)
    assert run["rc"] == 2 and run["err"].count("\n") == 1, run["err"]
    assert f"eval.output {tmp_path / 'dir.json'}: is a folder" in run["err"]
    assert "Loaded the model weights" not in run["out"]  # refused before any work
    # Only an evaluation's results are ever replaced: not a checkpoint's files, not notes.
    notes = tmp_path / "notes.json"
    notes.write_text('{"todo": 1}\n')
    for target, words in [(step_dir / ".metadata", "must be a path ending in .json"),
                          (notes, "is not an evaluation's results file")]:  # fmt: skip
        before_bytes = target.read_bytes()
        run = _evaluate(_args(tmp_path, synthetic_dir, f"--eval.checkpoint={step_dir}",
                              f"--eval.output={target}"), 1)  # fmt: skip
        assert run["rc"] == 2 and run["err"].count("\n") == 1 and words in run["err"], run["err"]
        assert target.read_bytes() == before_bytes
    inside = step_dir / "results.json"  # nothing is written into a checkpoint
    run = _evaluate(_args(tmp_path, synthetic_dir, f"--eval.checkpoint={step_dir}",
                          f"--eval.output={inside}"), 1)  # fmt: skip
    assert run["rc"] == 2 and f"is inside the checkpoint {step_dir}" in run["err"], run["err"]
    assert not inside.exists()
    # A dry run checks the checkpoint it names.
    missing = _args(tmp_path, synthetic_dir, "--job.dry_run", f"--eval.checkpoint={tmp_path}/no")
    run = _evaluate(missing, 1)
    assert run["rc"] == 2 and f"eval.checkpoint {tmp_path}/no: no such directory" in run["err"]
    # Neither the dry run nor the launcher's check asks for what only training reads or
    # needs (the initial weights, a global batch that divides among the ranks).
    for launcher, extra in [("torch.distributed.run", "--job.dry_run"),
                            ("titan.launch", "--eval.max_tokens=200")]:  # fmt: skip
        only_training = _args(tmp_path, synthetic_dir, extra, f"--eval.checkpoint={step_dir}",
                              f"--eval.output={tmp_path / 'ok.json'}",
                              f"--checkpoint.initial_load_path={tmp_path}/absent",
                              "--training.global_batch_size=6")  # fmt: skip
        run = _evaluate(only_training, 1, launcher)
        assert run["rc"] == 0, run["err"][-2000:]
    assert json.loads((tmp_path / "ok.json").read_text())["tokens"] == 3 * SEQ
    # Refused before the model is built: data with no row to read, an incomplete step.
    none_kept = _args(tmp_path, synthetic_dir, f"--eval.checkpoint={step_dir}",
                      "--data.source_datasets=nosuch")  # fmt: skip
    run = _evaluate(none_kept, 1)
    assert run["rc"] == 2 and "no usable row to evaluate on" in run["err"], run["err"]
    assert "Applied activation checkpointing" not in run["out"]
    incomplete = tmp_path / "copy" / "step-6"
    shutil.copytree(step_dir, incomplete)
    (incomplete / ".complete").unlink()
    for extra in ("--job.dry_run", "--eval.max_tokens=200"):
        run = _evaluate(_args(tmp_path, synthetic_dir, extra, f"--eval.checkpoint={incomplete}"), 1)
        assert run["rc"] == 2 and run["err"].count("\n") == 1, run["err"]
        assert f"eval.checkpoint {incomplete}: incomplete (no .complete marker" in run["err"]
        assert "use a complete step" in run["err"]
    # Another model is named before the data files are checksummed (tens of GB for 8B).
    damaged = tmp_path / "damaged" / "step-6"
    shutil.copytree(step_dir, damaged)
    shard = max(damaged.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x04
    shard.write_bytes(bytes(data))
    for vocab, words in [("512", "check model.flavor"), ("256", "does not match its checksum")]:
        run = _evaluate(_args(tmp_path, synthetic_dir, f"--eval.checkpoint={damaged}",
                              f"--training.vocab_size={vocab}"), 1)  # fmt: skip
        assert run["rc"] == 2 and words in run["err"], run["err"]
    result = run_train(_args(tmp_path, synthetic_dir, "--validation.enable",
                             "--validation.split=train"), timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "validation.split = 'train' is the split training reads" in result.stderr


def test_dry_run_checks_the_data_and_plans_the_memory(
    trained, synthetic_dir, tmp_path, capfd, monkeypatch
):
    """The dry run opens a local split as a start would and prints the forward-only memory
    plan, for this machine or the GPUs named; what a start would refuse, it refuses."""
    from titan.evaluate import main

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    step_dir = trained / "checkpoint" / "step-6"
    dry = _args(trained, synthetic_dir, "--job.dry_run", f"--eval.output={tmp_path / 'r.json'}")
    capfd.readouterr()
    assert main([*dry, "--eval.max_tokens=200", "--job.plan_for=h100-80gb,1gib"]) == 0
    out = capfd.readouterr().out
    assert f"would evaluate {step_dir}\n" in out and ", 3 of its " in out
    assert "windows of 64 tokens" in out
    for gpu in ("h100-80gb", "1gib"):
        assert f"memory plan for {gpu}, world 1: " in out
    assert out.count("blocks: forward only (evaluation)") == 2
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(dry) == 0 and "memory plan for this CPU, world 4: " in capfd.readouterr().out
    monkeypatch.delenv("WORLD_SIZE")
    single = synthetic_dir / "test"  # one split, saved alone
    for extra, words in [
        (["--eval.batch_size=100000000"], "with eval.batch_size 100000000 needs about"),
        (["--training.dataset=custom", f"--training.dataset_path={single}", "--eval.split=train"],
         "no split 'train'"),
        ([f"--eval.checkpoint={step_dir}", "--checkpoint.load_step=6"],
         "eval.checkpoint and checkpoint.load_step = 6 both name the checkpoint"),
    ]:  # fmt: skip
        assert main([*dry, *extra]) == 2, extra
        err = capfd.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and words in err, (extra, err)
    assert not (tmp_path / "r.json").exists()


def test_a_split_whose_every_row_is_left_out_is_refused(trained, synthetic_dir, tmp_path):
    """Rows that are read and left out (counts outside 0..255) give no label: one line and
    no results file, not a table of NaN that replaces an earlier result."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "wide.parquet"
    pq.write_table(pa.table({"spike_counts": [[[-1, 300, 2] * 30, [1, 2, 3] * 30]]}), bad)
    out = tmp_path / "r.json"
    args = _args(tmp_path, synthetic_dir, "--training.dataset=custom",
                 f"--training.dataset_path={bad}", "--eval.split=train",
                 f"--eval.checkpoint={trained / 'checkpoint' / 'step-6'}",
                 f"--eval.output={out}")  # fmt: skip
    run = _evaluate(args, 1)
    assert run["rc"] == 2 and run["err"].count("\n") == 1, run["err"]
    assert "no label to evaluate: every row read was left out" in run["err"]
    assert "row 0 left out of the losses" in run["out"] and not out.exists()


def test_a_wrong_checkpoint_names_the_step_to_pass(trained, synthetic_dir, tmp_path):
    """A run's output folder, its checkpoint folder, a step that is not there: each
    refused naming a step that would do (the newest complete one)."""
    from titan.checkpoint import list_steps
    from titan.config import ConfigError, load_config
    from titan.evaluate import planned

    folder = trained / "checkpoint"
    newest = folder / "step-6"
    cases = {
        trained: f"not a DCP checkpoint directory (no .metadata); it is a run's output folder: "
        f"pass one of its steps, e.g. {newest}",
        folder: f"(no .metadata); it holds step directories: pass one, e.g. {newest}",
        folder / "step-7": f"no such directory; pass a step that exists, e.g. {newest}",
    }
    for path, words in cases.items():
        cfg = load_config(_args(tmp_path, synthetic_dir, f"--eval.checkpoint={path}"))
        with pytest.raises(ConfigError) as e:
            planned(cfg)
        assert str(e.value).endswith(words), str(e.value)
    with pytest.raises(ConfigError) as e:
        planned(load_config(_args(trained, synthetic_dir, "--checkpoint.load_step=5")))
    steps = ", ".join(str(s.step) for s in list_steps(folder) if s.complete)
    assert str(e.value).endswith(f"(complete steps: {steps}); choose one of them, or -1 for "
                                 "the newest"), str(e.value)  # fmt: skip


@pytest.mark.slow
def test_validation_survives_kill9_and_resume(tmp_path, synthetic_dir):
    args = [
        "--training.steps=40",
        "--checkpoint.interval=8",
        "--checkpoint.keep_latest_k=0",
        "--validation.enable",
        "--validation.freq=5",
        "--validation.steps=2",
    ]
    reference = tmp_path / "reference"
    result = run_train(_args(reference, synthetic_dir, *args), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = tmp_path / "resumed"
    proc = launch_train(_args(resumed, synthetic_dir, *args))
    wait_for(lambda: logged_step(resumed) >= 12, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    result = run_train(_args(resumed, synthetic_dir, *args), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stdout and "validation at step 40" in result.stdout
    assert train_losses(resumed) == train_losses(reference)
    val = {r["step"]: r["val_loss"] for r in read_metrics(reference) if "val_loss" in r}
    assert sorted(val) == list(range(5, 41, 5)) and all(math.isfinite(v) for v in val.values())
    val_resumed = {r["step"]: r["val_loss"] for r in read_metrics(resumed) if "val_loss" in r}
    assert val_resumed == val  # the same held-out windows, the same weights


def test_row_lengths_and_null_sources(tmp_path):
    import pyarrow as pa

    from titan.data.held_out import NO_SOURCE, _row_lengths

    kind = pa.list_(pa.list_(pa.uint8()))
    good, ragged = [[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5]]
    column = pa.chunked_array(
        [pa.array([good, ragged, None, []], kind), pa.array([[], ragged], kind),
         pa.array([good, [[1], None]], kind)]
    )  # fmt: skip
    lengths, usable = _row_lengths(column)
    assert usable.tolist() == [True, False, False, False, False, False, True, False]
    assert lengths.tolist() == [9, 0, 0, 0, 0, 0, 9, 0]

    import datasets

    from titan.config import load_config
    from titan.data.held_out import HeldOut

    rows = {"spike_counts": [good, good], "source_dataset": ["lab-a", None]}
    data = tmp_path / "nulls"
    split = datasets.Dataset.from_dict(rows)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(data))
    held = HeldOut.open(load_config(_args(tmp_path, data, "--training.dataset=custom")), "test")
    assert held.source_names == [NO_SOURCE, "lab-a"]


def test_a_row_with_bad_counts_is_left_out_of_the_losses(synthetic_dir, tmp_path, caplog):
    """A row shaped right but holding a count above 255 is found only when read: it is
    warned about and never a label, and the windows stay the same on any number of ranks."""
    import datasets

    from titan.config import load_config
    from titan.data.held_out import IGNORE, HeldOut

    splits = datasets.load_from_disk(str(synthetic_dir))
    test = splits["test"].to_list()
    test[1]["spike_counts"][0][0] = 300
    data = tmp_path / "bad"
    datasets.DatasetDict({"train": splits["train"], "test": datasets.Dataset.from_list(test)}
                         ).save_to_disk(str(data))  # fmt: skip
    cfg = load_config(_args(tmp_path, data, "--training.dataset=custom"))
    held = HeldOut.open(cfg, "test")
    n = held.num_windows
    with caplog.at_level("WARNING", logger="titan"):
        one = list(held.batches(0, 1, 2, n))
    assert any("row 1 left out of the losses: counts outside 0..255" in r.message
               for r in caplog.records)  # fmt: skip
    bad = slice(held.offsets[1], held.offsets[2])  # row 1's span of the stream
    labels = torch.cat([lab for _, lab, _ in one]).flatten()
    sources = torch.cat([src for _, _, src in one]).flatten()
    stream = torch.arange(len(labels)) + 1  # stream position of each label (windows in order)
    in_bad = (stream >= bad.start) & (stream < bad.stop)
    assert (labels[in_bad] == IGNORE).all() and (sources[in_bad] == -1).all()
    assert (labels[~in_bad & (sources >= 0)] != IGNORE).all()
    two = [list(held.batches(r, 2, 1, n)) for r in (0, 1)]
    windows = [two[j % 2][j // 2][1] for j in range(n)]  # window j is on rank j mod 2
    assert torch.equal(torch.cat(windows).flatten(), labels[: n * SEQ])
