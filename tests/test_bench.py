"""The speed benchmark's CPU smoke mode runs and writes its results file: environment,
the attention table and titan's steps beside transformers' for every AC policy, with the
memory planner's estimate; progress goes to stderr, and a configuration that fails is a
note in the table, not the end of the benchmark. `--configs` runs exactly the
configurations it names (the transformers baseline first); a wrong option value (also
under --tiny, which only changes the defaults) or an output it cannot write is one line
before any work."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import torch
from conftest import ROOT, TRAIN_ENV


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "bench" / "step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_step_benchmark_tiny_mode(tmp_path):
    out = tmp_path / "results.md"
    result = subprocess.run(
        [sys.executable, "bench/step.py", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=TRAIN_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert result.stdout.strip().endswith(text.strip().splitlines()[-1])  # table printed last
    for needle in (
        "- torch: ",
        "- command: ",
        "bench/step.py --tiny",
        "float32 matmul 256^3",
        "## Attention",
        "## Training step",
        "| transformers | gradient ckpt",
        "| plan GiB ",
        "blocks: attn x 2",
    ):
        assert needle in text, needle  # fmt: skip
    for policy in ("none", "attn", "full", "auto"):
        assert f"| titan        | {policy}" in text, policy
    assert "out of memory" not in text
    assert "in progress" not in text
    assert "[12/12] 128 tokens, titan auto, compile False: " in result.stderr


def test_a_failing_configuration_is_a_note(tmp_path):
    step = _bench_module()

    def fails():
        raise RuntimeError("no kernel for this shape\nsecond line")

    cpu = torch.device("cpu")
    result = step._measure(fails, cpu, step.Result(64, "titan", "attn", False))
    assert result.seconds is None and result.note == "RuntimeError: no kernel for this shape"
    row = step.step_row(result, None, None, None)
    assert row[4] == "-" and row[-1] == result.note


def test_configs_names_exactly_what_runs(tmp_path):
    step = _bench_module()
    assert step.parse_configs("titan:full:off,transformers:ckpt:on,titan:2:on") == [
        ("transformers", "ckpt", True),
        ("titan", "full", False),
        ("titan", "2", True),
    ]
    for wrong, words in {
        "titan:attn": "write SYSTEM:SETTING:COMPILE",
        "titan:attn:yes": "write SYSTEM:SETTING:COMPILE",
        "transformers:full:off": "a transformers setting is one of ckpt, no_ckpt",
        "titan:attn:on,titan:bogus:off": "'titan:bogus:off': a titan setting is one of none",
    }.items():
        try:
            step.parse_configs(wrong)
        except ValueError as e:
            assert words in str(e), (wrong, e)
        else:
            raise AssertionError(f"{wrong} was accepted")
    out = tmp_path / "results.md"
    configs = "titan:attn:off,transformers:ckpt:off"
    result = subprocess.run(
        [sys.executable, "bench/step.py", "--tiny", "--configs", configs, "--out", str(out)],
        cwd=ROOT, env=TRAIN_ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    steps = out.read_text().split("## Training step")[1]
    cells = [[c.strip() for c in line.split("|")] for line in steps.splitlines()]
    assert [row[2:4] for row in cells if row[1:2] == ["64"]] == [
        ["transformers", "gradient ckpt"],
        ["titan", "attn"],
    ]
    assert "[4/4] 128 tokens, titan attn, compile False: " in result.stderr


def test_wrong_options_are_one_line_before_any_work(tmp_path, capsys):
    step = _bench_module()
    (tmp_path / "a_file").write_text("")
    for argv, words in {
        ("--seqs", "64,abc"): "argument --seqs: 'abc' is not an integer",
        ("--seqs", "0"): "argument --seqs: 0 is below 2",
        ("--steps", "0"): "argument --steps: 0 is below 1",
        ("--warmup", "-1"): "argument --warmup: -1 is below 0",
        ("--layers", "0"): "argument --layers: 0 is below 1",
        ("--policies", "attn,0"): "--policies 0: each must be one of none, attn",
        ("--policies", "\u00b2"): "--policies \u00b2: each must be one of",  # a digit to Python
        ("--configs", "titan:attn:off", "--compile", "on"): "drop --policies and --compile",
        ("--out", str(tmp_path)): "is a folder; name a .md file",
        ("--out", str(tmp_path / "a_file" / "r.md")): "is a file, not a folder",
        ("--out", str(tmp_path / "r.txt")): "must end in .md",
    }.items():
        try:  # a bad option beside a good --out: nothing is written there either
            good = [] if "--out" in argv else ["--out", str(tmp_path / "r.md")]
            status = step.main(["--tiny", *argv, *good])
        except SystemExit as e:  # argparse's own errors
            status = e.code
        err = capsys.readouterr().err
        assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert words in err, (argv, err)
    assert not list(tmp_path.glob("*.md"))
