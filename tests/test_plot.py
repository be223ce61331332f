"""The loss chart (`python -m titan.plot OUTPUT_DIR`): on the metrics.jsonl of a short debug
training run plus hand-added validation records, a re-logged step (the later record wins)
and a line cut short; without validation records; and its one-line errors."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import read_metrics as read_records
from conftest import run_train
from matplotlib.figure import Figure

from titan.files import cannot_write_in
from titan.plot import build_figure, main, plot_samples, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def _legends(train: dict, val: dict) -> list[list[str]]:
    """The legend entries of each panel of the chart (loss, learning rate, tokens/s)."""
    fig = build_figure(train, val, "run")
    return [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]


def _one_error_line(capsys, *words: str) -> None:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for word in words:
        assert word in lines[0], lines[0]


def test_chart_of_a_real_run_with_validation(tmp_path, synthetic_dir, capsys):
    result = run_train(
        [
            "--job.config_file=train_configs/debug_model.toml",
            f"--job.dump_folder={tmp_path}",
            f"--training.dataset_path={synthetic_dir}",
            "--training.steps=12",
            "--training.seq_len=64",
            "--training.warmup_steps=4",
            "--metrics.log_freq=2",
            "--checkpoint.no_enable_checkpoint",
        ]
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    logged = read_records(tmp_path)
    assert [r["step"] for r in logged] == [1, *range(2, 13, 2)]
    resumed = {**logged[2], "loss": 9.5}  # a resumed run logs step 4 again
    vals = [
        {"step": s, "val_loss": 6.0 - s / 4, "val_loss_by_source": {"a": 6.1 - s / 4, "b": 5.9}}
        for s in (4, 8, 12)
    ]
    with (tmp_path / "metrics.jsonl").open("a") as f:
        for rec in [vals[0], resumed, *vals[1:]]:
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 14, "val_loss": 1.0, "val_loss_by_source": [1.0]}\n')  # not a dict
        f.write('{"step": 14, "lo')  # a line cut short by a crash
    with (tmp_path / "metrics.jsonl").open("ab") as f:
        f.write(b'\n{"step": 16, "lo\xff\xfe')  # a torn write: not even UTF-8

    train, val, bad = read_metrics(tmp_path / "metrics.jsonl")
    assert sorted(train) == [1, 2, 4, 6, 8, 10, 12] and sorted(val) == [4, 8, 12, 14]
    assert train[4]["loss"] == 9.5 and bad == 2
    assert _legends(train, val) == [
        ["training loss", "validation loss", "validation: a", "validation: b"],
        ["learning rate"],
        ["tokens/s per device"],
    ]
    assert main([str(tmp_path)]) == 0
    assert "7 training and 4 validation records (skipped 2 unreadable lines)" in (
        capsys.readouterr().out
    )
    assert (tmp_path / "metrics.png").read_bytes()[:8] == PNG
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_chart_without_validation_and_bad_inputs(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "loss": 5.0 / s, "lr": 1e-3, "tokens_per_s": 1000.0} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "charts" / "run.png"
    out.parent.mkdir()
    assert _legends(*read_metrics(run / "metrics.jsonl")[:2]) == [
        ["training loss"],
        ["learning rate"],
        ["tokens/s per device"],
    ]
    assert main([str(run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG and not (run / "metrics.png").exists()
    capsys.readouterr()

    assert main([str(run), "--out", str(tmp_path / "x.jpg")]) == 2
    _one_error_line(capsys, "x.jpg: must end in .png")
    assert main([str(run), "--out", str(out / "below.png")]) == 2
    _one_error_line(capsys, f"cannot be written: {out} is a file, not a folder")
    assert main([str(run), "--out", str(tmp_path / "new" / "dir" / "m.png")]) == 0  # made
    assert (tmp_path / "new" / "dir" / "m.png").read_bytes()[:8] == PNG
    assert main([str(run / "metrics.jsonl")]) == 0  # the file itself names the run too
    assert (run / "metrics.png").read_bytes()[:8] == PNG
    capsys.readouterr()
    assert main([str(tmp_path / "nope")]) == 2
    _one_error_line(capsys, "nope: no such file or folder; pass a run's output folder")
    assert main([str(tmp_path / "charts")]) == 2  # a folder without metrics.jsonl
    _one_error_line(capsys, "charts/metrics.jsonl: no such file")
    # A file that is not a PNG is never replaced (a chart is); the default path says --out.
    notes = tmp_path / "notes.png"
    notes.write_text("notes")
    assert main([str(run), "--out", str(notes)]) == 2
    _one_error_line(capsys, f"--out {notes}: exists and is not a PNG image")
    assert notes.read_text() == "notes"
    assert main([str(run), "--out", str(out)]) == 0  # the chart of before: replaced
    samples = tmp_path / "samples.png"  # generate.py's figure belongs with its .npz
    plot_samples(samples, np.zeros((2, 1), np.uint8), np.ones((1, 2, 3), np.uint8), None, "s")
    before = samples.read_bytes()
    assert main([str(run), "--out", str(samples)]) == 2
    _one_error_line(capsys, f"--out {samples}: is generate.py's figure of samples")
    assert samples.read_bytes() == before
    step = tmp_path / "checkpoint" / "step-5"  # nothing goes into a checkpoint (the output
    step.mkdir(parents=True)  # check every command shares)
    (step / ".metadata").write_bytes(b"")
    (step / "__0_0.distcp").write_bytes(b"")
    assert main([str(run), "--out", str(step / "charts" / "m.png")]) == 2
    _one_error_line(capsys, f"is inside the checkpoint {step}; nothing is written into")
    (run / "metrics.png").unlink()
    (run / "metrics.png").mkdir()
    assert main([str(run)]) == 2
    _one_error_line(capsys, "metrics.png: is a folder; name another .png file with --out")
    # Not a metrics log: a folder in its place, another file, records with a wrong loss.
    (run / "metrics.jsonl").rename(run / "kept.jsonl")
    (run / "metrics.jsonl").mkdir()
    assert main([str(run)]) == 2
    _one_error_line(capsys, "metrics.jsonl: a folder, not a metrics file")
    (run / "metrics.jsonl").rmdir()
    (run / "config.toml").write_text('[job]\ndump_folder = "x"\n')
    assert main([str(run / "config.toml")]) == 2
    _one_error_line(capsys, "none of its 2 lines is a training or validation record")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": "abc"}\n{"step": 2, "loss": null}\n')
    assert main([str(run), "--out", str(out)]) == 0  # the null: a step that was not finite
    assert "1 training and 0 validation records (skipped 1 unreadable lines)" in (
        capsys.readouterr().out
    )
    (run / "metrics.jsonl").write_text("\n")
    assert main([str(run)]) == 2
    _one_error_line(capsys, "no training or validation records")
    assert main([]) == 2
    _one_error_line(capsys, "output_dir")


def test_an_output_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    """Refused before drawing where a probe file cannot be created (permission bits say
    nothing to root: /sys refuses new files even to root); a write that fails anyway, a
    full disk say, names the chart, not a temporary file, and leaves nothing."""
    from titan import plot

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    if Path("/sys").is_dir() and cannot_write_in(Path("/sys")):
        assert main([str(run), "--out", "/sys/titan/m.png"]) == 2
        _one_error_line(capsys, "--out /sys/titan/m.png: cannot be written: no file can be")
    real_savefig = Figure.savefig

    def disk_full(fig, target, **kwargs):
        real_savefig(fig, target, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", disk_full)
    assert plot.main([str(run)]) == 1
    _one_error_line(
        capsys, f"cannot write {run / 'metrics.png'} (No space left on device); name another"
    )
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_non_finite_numbers_are_written_as_null(tmp_path, capsys):
    """metrics.jsonl and results files stay strict JSON (jq, JavaScript), and the chart
    marks the steps whose loss was not a number instead of drawing them."""
    from titan.files import json_text

    rec = {"step": 2, "val_loss": float("nan"), "val_loss_by_source": {"a": float("inf")}}
    line = json_text(rec)
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "step": 2, "val_loss": None, "val_loss_by_source": {"a": None}
    }  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    train = json_text({"step": 1, "loss": 3.0, "lr": 1e-3, "tokens_per_s": 1.0})
    (run / "metrics.jsonl").write_text(f"{train}\n{line}\n")
    assert main([str(run)]) == 0, capsys.readouterr().err
    train, val, _ = read_metrics(run / "metrics.jsonl")
    assert _legends(train, val)[0] == ["training loss", "loss not finite (1 step)"]
    diverged = {s: {"step": s, "loss": None, "lr": 1e-3} for s in (1, 2, 3)}
    fig = build_figure(diverged, {}, "run")
    loss_panel = fig.axes[0]
    marks = [line for line in loss_panel.lines if line.get_label().startswith("loss not")]
    assert [list(m.get_xdata()) for m in marks] == [[1, 2, 3]]
    assert [t.get_text() for t in loss_panel.texts] == ["no finite value"]  # not "not in
    assert [t.get_text() for t in fig.axes[2].texts] == ["not in this run"]  # this run"
