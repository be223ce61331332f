"""The synthetic generator: Neural Pile schema with train and test splits, sizes and shapes
as asked, sessions cut into segments, deterministic from the seed, structure a model can
learn (per-neuron rates, refractoriness, shared drive), and the command line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from datasets import load_from_disk

from titan.data.synthetic import generate, main, read_params


def matrices(path, split="train") -> list[np.ndarray]:
    ds = load_from_disk(str(path))[split].with_format("arrow")
    return [np.array(m) for m in ds["spike_counts"].to_pylist()]


def test_schema_sizes_and_segments(tmp_path):
    out = generate(tmp_path / "s", rows=12, seed=1, test_rows=5, neurons=(3, 9),
                   bins=(20, 50), max_values=150)  # fmt: skip
    dd = load_from_disk(str(out))
    assert set(dd) == {"train", "test"}
    assert (len(dd["train"]), len(dd["test"])) == (12, 5)
    assert dd["train"].features["spike_counts"].feature.feature.dtype == "uint8"
    assert {"subject_id", "session_id", "segment_id", "source_dataset"} <= set(dd["train"].features)
    for m in matrices(out):
        assert m.ndim == 2 and 3 <= m.shape[0] <= 9 and 1 <= m.shape[1] <= 50
        assert m.size <= max(150, m.shape[0])
    segments = dd["train"]["segment_id"]
    assert "segment_1" in segments  # long sessions are cut, as in the Neural Pile
    assert read_params(out)["rows"] == 12


def test_deterministic_from_the_seed(tmp_path):
    kw = dict(rows=6, neurons=(2, 5), bins=(10, 30))
    a, b = generate(tmp_path / "a", seed=5, **kw), generate(tmp_path / "b", seed=5, **kw)
    c = generate(tmp_path / "c", seed=6, **kw)
    same = [np.array_equal(x, y) for x, y in zip(matrices(a), matrices(b), strict=True)]
    assert all(same)
    assert not all(
        x.shape == y.shape and np.array_equal(x, y)
        for x, y in zip(matrices(a), matrices(c), strict=True)
    )


def test_learnable_structure(tmp_path):
    kw = dict(rows=1, seed=0, neurons=(40, 40), bins=(3000, 3000))
    m = matrices(generate(tmp_path / "s", **kw))[0].astype(float)  # (neurons, time)
    rates = m.mean(axis=1)
    assert rates.max() > 4 * rates.min() + 1e-3  # neurons have their own rates

    # a shared latent drive correlates neurons far beyond chance (time-shuffled neurons)
    def mean_abs_corr(mat):
        corr = np.corrcoef(mat[mat.sum(axis=1) > 0])
        return np.abs(corr[~np.eye(len(corr), dtype=bool)]).mean()

    rng = np.random.default_rng(0)
    shuffled = np.stack([rng.permutation(row) for row in m])
    assert mean_abs_corr(m) > 2.5 * mean_abs_corr(shuffled)

    # refractoriness: fewer spikes right after a spike than without it (same seed)
    def back_to_back(mat):
        s = mat > 0
        return (s[:, 1:] & s[:, :-1]).sum() / s[:, :-1].sum()

    free = matrices(generate(tmp_path / "free", refractory=0.0, **kw))[0]
    assert back_to_back(m) < 0.7 * back_to_back(free)
    strict = matrices(generate(tmp_path / "strict", refractory=1.0, **kw))[0]
    assert back_to_back(strict) == 0


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--rows", "5", "--neurons", "2", "4", "--bins", "8", "16"]
    assert main(args) == 0
    assert "5 train rows" in capsys.readouterr().out
    assert main(args) == 0  # idempotent: an existing dataset is kept
    assert "keeping it" in capsys.readouterr().out
    proc = subprocess.run(
        [sys.executable, "-m", "titan.data.synthetic", "--out", str(tmp_path / "m"), "--rows", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(load_from_disk(str(tmp_path / "m"))["train"]) == 2
    for bad, words in [
        (["--rows", "0"], "--rows 0: must be at least 1"),
        (["--sources", "0"], "--sources 0: must be at least 1"),
        (["--seed", "-3"], "--seed -3: must be >= 0"),
        (["--neurons", "4", "2"], "--neurons 4 2: need 1 <= MIN <= MAX"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["--out", str(tmp_path / "never"), *bad])
        assert e.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
