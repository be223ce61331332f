"""Generation (`generate.py`, `titan/generate.py`) and the model's KV cache, on CPU with a
randomly initialized debug model saved as a training step and exported to HF:

- cached forwards (prefill, single tokens, chunks after a prefill) give the full
  forward's logits, and cached greedy generation equals full recompute token for token;
- separators open every time bin and are never drawn elsewhere (even when the model
  prefers them); top_k = 1 and a tiny top_p are greedy, top_k keeps exactly k counts when
  logits tie, and no temperature is too small; a seed repeats its sample and another seed
  does not, and sample i is the same whatever the number of samples beside it;
- the .npz holds the row's prompt and real continuation (clipped to 254 as the model saw
  them), and each sample fed back through the Neural Pile schema and `tokenize_row` gives
  the generated tokens;
- the HF export and the DCP directory give the same logits;
- every bad input is one `error:` line, and a failure leaves no output.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import ROOT

from titan.checkpoint.storage import checksums, complete, rank_files
from titan.convert import dcp_to_llama
from titan.data.synthetic import generate as make_dataset
from titan.data.tokenizer import SEPARATOR, arrow_row_matrix, tokenize_row
from titan.generate import main, read_row
from titan.inference import load_model
from titan.models.llama import KVCache, Transformer, build_model_args
from titan.sampling import (
    NonFiniteLogits,
    RaceNoise,
    Sampling,
    generate_tokens,
    sample_counts,
    sample_generators,
    tokens_to_counts,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
TRAINED_SEQ_LEN = 64
GREEDY = Sampling(temperature=0.0)
PLAIN = Sampling(temperature=1.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decoding one token at a time is fastest on one thread (by far on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny dataset, a full training checkpoint of a random debug model (with its run's
    config.toml and an optimizer entry that must not be read) and its HF export."""
    root = tmp_path_factory.mktemp("generate")
    data = make_dataset(root / "data", rows=4, seed=0, test_rows=3, neurons=(5, 8), bins=(40, 60))
    args = build_model_args("debugmodel", vocab_size=256, seq_len=TRAINED_SEQ_LEN)
    model = Transformer(args)
    model.init_weights(seed=3)
    step = root / "run" / "checkpoint" / "step-3"
    state = {"model": model.state_dict(), "optimizer": {"exp_avg": torch.zeros(3)}}
    dcp.save(state, checkpoint_id=str(step), no_dist=True)
    complete(step, {"step": 3, "kind": "full"}, checksums(step, rank_files(step, 0)))
    (root / "run" / "config.toml").write_text(
        f'[model]\nflavor = "debugmodel"\n[training]\nseq_len = {TRAINED_SEQ_LEN}\n'
    )
    dcp_to_llama(step, root / "hf", log=lambda _: None)
    return {"data": data, "dcp": step, "hf": root / "hf", "root": root}


@pytest.fixture(scope="module")
def model(files) -> Transformer:
    return load_model(files["dcp"], torch.device("cpu"), torch.float32, 512).model


def _prompt(counts: np.ndarray) -> torch.Tensor:
    """Tokens of whole time bins plus the separator opening the next one."""
    return torch.from_numpy(np.concatenate([tokenize_row(counts), [SEPARATOR]]).astype(np.int64))


def _noise(rows: int) -> torch.Tensor:
    """One token's sampling noise for `rows` samples."""
    cpu = torch.device("cpu")
    return RaceNoise(sample_generators(0, rows, cpu), cpu, block=1).next()


def test_counts_are_drawn_with_the_models_probabilities():
    """The exponential race draws each count with its probability (after temperature,
    top-k and top-p), over 40,000 draws; a diverged model's NaN logits stop generation."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.full((40_000, 256), -1e9)
    logits[:, [3, 0, 254, 100]] = p.log()
    for sampling, expected in [
        (Sampling(1.0), p),
        (Sampling(2.0), p.sqrt() / p.sqrt().sum()),
        (Sampling(1.0, top_k=2), torch.tensor([0.5, 0.3, 0, 0]) / 0.8),
        (Sampling(1.0, top_p=0.85), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95),
    ]:
        drawn = sample_counts(logits, sampling, _noise(40_000))
        freq = torch.stack([(drawn == c).float().mean() for c in (3, 0, 254, 100)])
        assert torch.allclose(freq, expected, atol=0.012), (sampling, freq, expected)
        assert set(drawn.tolist()) <= {3, 0, 254, 100}


def test_non_finite_logits_stop_generation(model):
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.output.weight[5, 0] = torch.nan
    for sampling in (GREEDY, PLAIN):
        with pytest.raises(NonFiniteLogits):
            generate_tokens(broken, _prompt(np.zeros((4, 0))), 4, 3, 2, sampling)


def test_kv_cache_forward_equals_full_forward(model):
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.args, batch=2, max_len=40)
    with torch.no_grad():
        full = model(tokens)
        chunks = [(0, 17), (17, 18), (18, 19), (19, 40)]  # prefill, 2 tokens, a chunk
        cached = torch.cat([model(tokens[:, a:b], cache, a) for a, b in chunks], dim=1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_cached_generation_equals_full_recompute(model, files):
    counts = read_row(None, str(files["data"]), "test", 0).counts[:, :3]
    n = counts.shape[0]
    args = (model, _prompt(counts), n, 4, 2, GREEDY)
    cached = generate_tokens(*args)
    recomputed = generate_tokens(*args, use_cache=False)
    assert cached.shape == (2, 7 * (n + 1))
    assert torch.equal(cached, recomputed)


def test_separators_every_bin_and_nowhere_else(model):
    n, bins = 6, 5
    tokens = generate_tokens(model, _prompt(np.zeros((n, 0))), n, bins, 3, Sampling(2.0), seed=0)
    is_sep = (tokens == SEPARATOR).numpy()
    assert is_sep.shape == (3, bins * (n + 1))
    assert (is_sep == (np.arange(bins * (n + 1)) % (n + 1) == 0)).all()
    # Even when the separator (or a token above it) dominates, counts 0..254 are drawn.
    logits = torch.zeros(64, 300)
    logits[:, SEPARATOR] = logits[:, 280] = 1e4
    for sampling in (GREEDY, Sampling(1.0), Sampling(1.0, top_k=5), Sampling(1.0, top_p=0.5)):
        drawn = sample_counts(logits, sampling, _noise(64))
        assert drawn.max() < SEPARATOR, sampling


def test_ties_and_tiny_temperatures():
    # bf16 logits often tie: top_k keeps exactly k counts, and top_k = 1 is greedy
    logits = torch.full((2000, 256), -5.0)
    logits[:, [7, 9, 11]] = 3.0
    top2 = sample_counts(logits, Sampling(1.0, top_k=2), _noise(2000)).tolist()
    assert set(top2) <= {7, 9, 11} and len(set(top2)) == 2
    greedy = sample_counts(logits, GREEDY, None)
    assert torch.equal(sample_counts(logits, Sampling(1.0, top_k=1), _noise(2000)), greedy)
    # however small the temperature, only the most likely counts are drawn (no NaN)
    # 1e-30 is divided by; the rest are below float32's smallest normal: greedy
    for temperature in (1e-30, 1e-39, 1e-45, 1e-46, 1e-300):
        drawn = sample_counts(logits, Sampling(temperature), _noise(2000))
        assert set(drawn.tolist()) <= {7, 9, 11}


def test_seeds_and_truncation(model):
    n, bins = 5, 6
    prompt = _prompt(np.zeros((n, 0)))

    def sample(seed: int, sampling: Sampling = PLAIN, num_samples: int = 2) -> torch.Tensor:
        return generate_tokens(model, prompt, n, bins, num_samples, sampling, seed)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    # sample i's draws come from (seed, i) alone: the same beside more samples or none (in
    # float32 on CPU, batching changes no draw of this tiny model), and no sample of one
    # seed is another seed's (as seed + i would make them)
    four = sample(3, num_samples=4)
    assert torch.equal(four[:2], sample(3)) and torch.equal(four[:1], sample(3, num_samples=1))
    assert not any(torch.equal(a, b) for a in four for b in sample(4, num_samples=4))
    assert torch.equal(sample(-1), sample(2**64 - 1))  # a negative seed is its 64-bit pattern
    greedy = generate_tokens(model, prompt, n, bins, 2, GREEDY)
    assert torch.equal(sample(0, Sampling(1.0, top_k=1)), greedy)
    assert torch.equal(sample(1, Sampling(1.0, top_p=1e-6)), greedy)


def test_npz_round_trips_to_the_neural_pile_schema(model, files, tmp_path, capsys):
    out = tmp_path / "gen" / "row1.npz"
    argv = ["--checkpoint", str(files["dcp"]), "--dataset_path", str(files["data"]),
            "--row", "1", "--prompt_bins", "5", "--bins", "8", "--num_samples", "2",
            "--seed", "7", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    log = capsys.readouterr().out
    assert f"beyond the {TRAINED_SEQ_LEN}-token context the model was trained with" in log
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = np.load(out)
    row = read_row(None, str(files["data"]), "test", 1)
    n = row.counts.shape[0]
    prompt, real = saved["spike_counts_prompt"], saved["spike_counts_real"]
    generated = saved["spike_counts_generated"]
    assert generated.shape == (2, n, 8) and generated.dtype == np.uint8
    assert np.array_equal(prompt, row.counts[:, :5])
    assert np.array_equal(real, row.counts[:, 5:13])
    meta = json.loads(str(saved["metadata"]))
    assert meta["row"] == 1 and meta["row_ids"] == row.ids and meta["seed"] == 7
    assert meta["sampling"] == {"temperature": 1.0, "top_k": 0, "top_p": 1.0}

    # The same sampling here gives the tokens that the saved rows tokenize back to.
    tokens = generate_tokens(model, _prompt(prompt), n, 8, 2, Sampling(1.0), 7).numpy()
    assert np.array_equal(tokens_to_counts(tokens[:, 5 * (n + 1) :], n), generated)
    rows = [np.concatenate([prompt, g], axis=1) for g in generated]  # (neurons, 13) each
    spikes = pa.array([r.tolist() for r in rows], pa.list_(pa.list_(pa.uint8())))
    for i in range(2):
        counts, why = arrow_row_matrix(spikes[i : i + 1])
        assert why == "" and np.array_equal(tokenize_row(counts), tokens[i])


def test_a_row_shorter_than_the_request_says_so(files, tmp_path, capsys):
    """Near its end a row has fewer real bins to compare than --bins: generated in full,
    the real continuation is what there is, and the log says so."""
    have = read_row(None, str(files["data"]), "test", 0).counts.shape[1]
    out = tmp_path / "end.npz"
    argv = ["--checkpoint", str(files["dcp"]), "--dataset_path", str(files["data"]),
            "--prompt_bins", str(have - 2), "--bins", "5", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "Row 0 has 2 time bins after the prompt" in capsys.readouterr().out
    saved = np.load(out)
    assert saved["spike_counts_real"].shape[1] == 2
    assert saved["spike_counts_generated"].shape[2] == 5


def test_a_stored_255_is_read_as_the_254_the_model_saw(tmp_path):
    import datasets

    counts = [[0, 255, 3], [255, 254, 1]]  # (neurons, bins), 255 is clipped by the tokenizer
    split = datasets.Dataset.from_dict({"spike_counts": [counts]})
    datasets.DatasetDict({"test": split}).save_to_disk(str(tmp_path / "d"))
    row = read_row(None, str(tmp_path / "d"), "test", 0)
    assert row.counts.dtype == np.uint8
    assert row.counts.tolist() == [[0, 254, 3], [254, 254, 1]]
    assert np.array_equal(tokenize_row(row.counts), tokenize_row(np.array(counts)))


def test_a_null_id_stays_null(tmp_path):
    import datasets

    split = datasets.Dataset.from_dict(
        {"spike_counts": [[[1, 2]]], "source_dataset": [None], "session_id": ["s1"]}
    )
    datasets.DatasetDict({"test": split}).save_to_disk(str(tmp_path / "d"))
    assert read_row(None, str(tmp_path / "d"), "test", 0).ids == {
        "source_dataset": None,  # not the string "None"
        "session_id": "s1",
    }


def test_unconditional_from_the_hf_export(files, tmp_path, capsys):
    out = tmp_path / "free.npz"
    argv = ["--checkpoint", str(files["hf"]), "--neurons", "4", "--bins", "3", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    saved = np.load(out)
    assert "spike_counts_real" not in saved.files
    assert saved["spike_counts_prompt"].shape == (4, 0)
    assert saved["spike_counts_generated"].shape == (1, 4, 3)
    assert json.loads(str(saved["metadata"]))["row"] is None
    # A second run names the file it would replace; --overwrite replaces it.
    before = out.read_bytes()
    assert main([*argv, "--seed", "3"]) == 2
    assert f"--out {out}: it exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main([*argv, "--seed", "3", "--overwrite"]) == 0
    assert out.read_bytes() != before
    # The export names the context its run trained with: going past it is warned of.
    longer = ["--checkpoint", str(files["hf"]), "--neurons", "4", "--bins", "20"]
    assert main([*longer, "--out", str(tmp_path / "long.npz")]) == 0
    assert f"beyond the {TRAINED_SEQ_LEN}-token context" in capsys.readouterr().out
    meta = json.loads(str(np.load(tmp_path / "long.npz")["metadata"]))
    assert meta["trained_seq_len"] == TRAINED_SEQ_LEN


def test_hf_export_and_dcp_give_the_same_logits(files, model):
    hf = load_model(files["hf"], torch.device("cpu"), torch.float32, 512).model
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens), model(tokens), atol=1e-5, rtol=1e-5)


def _bad_inputs(files: dict[str, Path], root: Path) -> dict[str, tuple[list[str], str]]:
    incomplete = root / "incomplete"
    dcp.save({"model": {"x": torch.zeros(2)}}, checkpoint_id=str(incomplete), no_dist=True)
    ckpt, data = ["--checkpoint", str(files["dcp"])], ["--dataset_path", str(files["data"])]
    shutil.copytree(files["dcp"].parent.parent, root / "damaged")  # its run folder
    damaged = root / "damaged" / "checkpoint" / files["dcp"].name
    shard = bytearray((damaged / "__0_0.distcp").read_bytes())
    shard[len(shard) // 2] ^= 0x04  # one flipped bit
    (damaged / "__0_0.distcp").write_bytes(bytes(shard))
    out_folder = root / "folder.npz"
    out_folder.mkdir()
    (root / "a_file").write_text("")
    (root / "taken.png").write_text("a chart")
    cases = {
        "missing checkpoint": (["--checkpoint", str(root / "nope"), "--neurons", "4"], "nope"),
        "checkpoint folder": (
            ["--checkpoint", str(files["dcp"].parent), "--neurons", "4"],
            "pass one, e.g.",
        ),
        "run folder": (
            ["--checkpoint", str(files["dcp"].parent.parent), "--neurons", "4"],
            f"it is a run's output folder: pass one of its steps, e.g. {files['dcp']}",
        ),
        "step not there": (
            ["--checkpoint", str(files["dcp"].parent / "step-9"), "--neurons", "4"],
            f"no such directory; pass a step that exists, e.g. {files['dcp']}",
        ),
        "incomplete, before the data": (  # the checkpoint is refused before a row is read
            ["--checkpoint", str(incomplete), "--dataset_path", str(root / "nodata")],
            "incomplete",
        ),
        "row out of range": ([*ckpt, *data, "--row", "3"], "--row 3: out of range"),
        "no such split": ([*ckpt, *data, "--split", "validation"], "no split 'validation'"),
        "no such dataset": ([*ckpt, "--dataset_path", str(root / "nodata")], "nodata"),
        "prompt too long": ([*ckpt, *data, "--prompt_bins", "1000"], "--prompt_bins 1000"),
        "neurons 0": ([*ckpt, "--neurons", "0"], "--neurons 0: must be > 0"),
        "bins 0": ([*ckpt, *data, "--bins", "0"], "--bins 0: must be > 0"),
        "samples 0": ([*ckpt, *data, "--num_samples", "0"], "--num_samples 0"),
        "threads 0": ([*ckpt, *data, "--threads", "0"], "--threads 0"),
        "top_p 0": ([*ckpt, *data, "--top_p", "0"], "--top_p 0.0: must be in (0, 1]"),
        "top_p 1.5": ([*ckpt, *data, "--top_p", "1.5"], "--top_p 1.5"),
        "temperature": ([*ckpt, *data, "--temperature", "-1"], "--temperature -1.0"),
        "top_k": ([*ckpt, *data, "--top_k", "-2"], "--top_k -2"),
        "top_k above the counts": (
            [*ckpt, *data, "--top_k", "256"],
            "between 0 (all counts) and 255",
        ),
        "checkpoint a file": (
            ["--checkpoint", str(root / "a_file"), "--neurons", "4"],
            "not a directory",
        ),  # fmt: skip
        "both prompts": ([*ckpt, *data, "--neurons", "4"], "not both"),
        "row options without a row": (
            [*ckpt, "--neurons", "4", "--row", "2", "--prompt_bins", "5"],
            "--row, --prompt_bins: options of a dataset row, which --neurons",
        ),
        "no prompt": (ckpt, "nothing to generate"),
        "not an int": ([*ckpt, "--neurons", "four"], "invalid int value"),
        "unknown option": ([*ckpt, "--neurons", "4", "--tokens", "9"], "unrecognized"),
        "bad device": ([*ckpt, "--neurons", "4", "--device", "tpu"], "--device tpu"),
        "threads beyond int64": ([*ckpt, *data, "--threads", str(10**20)], "must be between 1"),
        "seed beyond 64 bits": ([*ckpt, *data, "--seed", str(10**20)], "must fit in 64 bits"),
        "temperature inf": ([*ckpt, *data, "--temperature", "inf"], "must be finite"),
        "out a folder": ([*ckpt, *data, "--out", str(out_folder)], "is a folder"),
        "out the current folder": ([*ckpt, *data, "--out", "."], "--out .: is a folder"),
        "out empty": ([*ckpt, *data, "--out", ""], "--out is empty (an unset variable?)"),
        "dataset empty": ([*ckpt, "--dataset", ""], "--dataset is empty"),
        "flavor for an export": (
            ["--checkpoint", str(files["hf"]), "--neurons", "4", "--flavor", "8B"],
            "is a Hugging Face export, whose config.json gives the architecture; drop --flavor",
        ),
        "out inside the checkpoint": (
            [*ckpt, *data, "--out", str(files["dcp"] / "s.npz")],
            f"is inside the checkpoint {files['dcp']}; nothing is written into a checkpoint",
        ),
        "out in a step folder a run would move aside": (
            [*ckpt, *data, "--out", str(files["dcp"].parent / "step-9" / "s.npz")],
            f"is inside {files['dcp'].parent / 'step-9'}, a step folder beside the saved steps",
        ),
        "not a checkpoint, not an export": (
            ["--checkpoint", str(root), "--neurons", "4"],
            "neither a DCP directory (.metadata) nor a Hugging Face export (config.json)",
        ),
        "out below a file": (
            [*ckpt, *data, "--out", str(root / "a_file" / "x.npz")],
            f"cannot be written: {root / 'a_file'} is a file",
        ),
        "out's chart exists": (
            [*ckpt, *data, "--out", str(root / "taken.npz")],
            f"the chart beside it, {root / 'taken.png'}, exists; pass --overwrite",
        ),
        "no room": ([*ckpt, "--neurons", "3", "--bins", str(10**9)], "tokens x 1 samples need"),
        "damaged": (["--checkpoint", str(damaged), "--neurons", "4"], "is damaged: __0_0"),
    }
    if not torch.cuda.is_available():
        cases["no cuda"] = ([*ckpt, "--neurons", "4", "--device", "cuda"], "not available")
    return cases


def test_every_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out" / "x.npz"
    for name, (argv, words) in _bad_inputs(files, tmp_path).items():
        if "--out" not in argv:
            argv = [*argv, "--out", str(out)]
        assert main(argv) == 2, name
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, lines)
        assert words in lines[0], (name, lines[0])
    assert main(["--checkpoint", str(files["hf"]), "--neurons", "2", "--out", "x.txt"]) == 2
    assert "must end in .npz" in capsys.readouterr().err

    # A failure while writing (here: the plot) leaves neither file, nor temporary ones.
    def failing_plot(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("titan.generate.plot_samples", failing_plot)
    argv = ["--checkpoint", str(files["hf"]), "--neurons", "2", "--bins", "1", "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: cannot write --out {out} (No space left on device); choose another --out, "
        "or free space"
    ), err
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_ctrl_c_is_an_interrupt_wherever_it_lands(files, tmp_path, capsys, monkeypatch):
    """Exit 130 and `error: interrupted`, not a bad input: also when the Ctrl-C arrives
    while safetensors reads (it swallows the KeyboardInterrupt and raises its own error)
    or while DCP reads (it wraps the interrupt)."""
    import signal

    import safetensors
    from torch.distributed.checkpoint import FileSystemReader

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")

    def swallowing_open(*args, **kwargs):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
        raise TypeError("could not determine the shape of object type 'UntypedStorage'")

    def interrupted_read(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "x.npz"
    for checkpoint, target, patch in [
        (files["hf"], safetensors, ("safe_open", swallowing_open)),
        (files["dcp"], FileSystemReader, ("read_data", interrupted_read)),
    ]:
        with monkeypatch.context() as m:
            m.setattr(target, *patch)
            argv = ["--checkpoint", str(checkpoint), "--neurons", "2", "--out", str(out)]
            assert main(argv) == 130, checkpoint
        assert capsys.readouterr().err.strip().splitlines()[-1] == "error: interrupted"
        assert not out.exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_command_line_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(tmp_path / "none"),
         "--neurons", "4", "--out", str(tmp_path / "x.npz")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --checkpoint {tmp_path / 'none'}: "
                                                  "no such directory"]  # fmt: skip
    assert "Traceback" not in result.stdout + result.stderr
