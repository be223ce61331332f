"""Sample spike trains from a trained model, token by token with a KV cache.

    python generate.py --checkpoint outputs/debug_model/checkpoint/step-100 \
        --dataset synthetic --row 0 --prompt_bins 20 --bins 100 --out samples/row0.npz
    python generate.py --checkpoint exports/debug-hf --neurons 32 --bins 100 \
        --num_samples 4 --out samples/free.npz

Weights come from a DCP directory (a training step, full or model-only, or a
`llama_to_dcp.py` output; only its `model.*` tensors are read) or from a Hugging Face
export (`config.json` + safetensors, as `dcp_to_llama.py` writes it). Conditional
generation continues the first `--prompt_bins` time bins of a dataset row and keeps the
row's next `--bins` bins (as many as it has) for comparison; unconditional generation
(`--neurons N`) starts from the separator alone. The separator 255 is forced at the start
of every time bin (every n_neurons + 1 tokens) and never sampled anywhere else.

The `.npz` holds uint8 counts, each a (neurons, time bins) matrix as in the Neural Pile,
clipped to 254 as the tokenizer clips them (a stored 255 is read as 254):
- `spike_counts_generated`: (num_samples, neurons, bins);
- `spike_counts_prompt`: (neurons, prompt_bins), the prompt all samples share (0 bins
  when unconditional);
- `spike_counts_real`: (neurons, real bins <= bins), the row's real continuation
  (conditional only);
- `metadata`: a JSON string (checkpoint, dataset row ids, sampling settings, timing).
Sample i as a Neural Pile row is `concatenate([prompt, generated[i]], axis=1)`. A PNG with
the same name shows rasters (real vs generated, prompt marked) and per-neuron rates.
Every bad input ends the command with one `error: ...` line and writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from titan.cli import EXIT_INTERRUPTED, noting_ctrl_c
from titan.config import ConfigError, JobConfig
from titan.convert import DTYPES, ConvertError
from titan.convert.common import first_line, interrupted
from titan.data import sources
from titan.data.tokenizer import MAX_COUNT, SEPARATOR, arrow_row_matrix, tokenize_row
from titan.files import output_problem, written_atomically
from titan.inference import GenerateError, check_checkpoint, load_model
from titan.logging import init_logger, logger
from titan.models.llama import FLAVORS
from titan.plot import plot_samples, samples_title
from titan.sampling import NonFiniteLogits, Sampling, generate_tokens, tokens_to_counts

ID_COLUMNS = ("subject_id", "session_id", "segment_id", "source_dataset")
"""String columns of a Neural Pile row, copied into the metadata."""


# ----------------------------------------------------------------------------- data


@dataclass
class Row:
    """One dataset row to prompt with."""

    counts: np.ndarray
    """(n_neurons, n_time_bins) uint8, clipped to `MAX_COUNT` as the tokenizer does."""
    ids: dict[str, str | None]
    """The row's string columns (subject_id, session_id, ...); None where null."""
    label: str
    """The dataset, as messages name it."""


def read_row(dataset: str | None, dataset_path: str | None, split: str, row: int) -> Row:
    """Row `row` of a split of a named dataset or a dataset path (as training reads them)."""
    cfg = JobConfig()
    cfg.training.dataset = dataset or "dataset_path"
    cfg.training.dataset_path = dataset_path
    try:
        src = sources.resolve_source(cfg)
        ds = sources.open_split(src, split, False, [], extra_columns=ID_COLUMNS, key="--split")
    except ConfigError as e:  # it names the training keys: name this command's options
        text = str(e).replace("training.dataset_path", "--dataset_path")
        raise GenerateError(text.replace("training.dataset", "--dataset")) from None
    if not 0 <= row < len(ds):
        raise GenerateError(
            f"--row {row}: out of range; the {split} split of {src.label} has {len(ds)} rows"
        )
    table = ds.with_format("arrow")[row]  # a 1-row pyarrow Table
    cell = pa.concat_arrays(table.column(sources.COLUMN).chunks)
    counts, why = arrow_row_matrix(cell)
    if counts is None:
        raise GenerateError(f"row {row} of the {split} split of {src.label}: {why}")
    values = {c: table.column(c)[0].as_py() for c in ID_COLUMNS if c in table.column_names}
    ids = {c: None if v is None else str(v) for c, v in values.items()}  # null stays null
    # counts as the model sees them (the tokenizer clips 255 to 254), so that the prompt,
    # the real continuation and the samples compare like with like
    clipped = np.minimum(counts, MAX_COUNT).astype(np.uint8, copy=False)
    return Row(np.ascontiguousarray(clipped), ids, src.label)


# ----------------------------------------------------------------------------- output


def save(
    out: Path,
    prompt: np.ndarray,
    generated: np.ndarray,
    real: np.ndarray | None,
    metadata: dict[str, Any],
) -> Path:
    """Write `out` (.npz) and the PNG beside it, each to a temporary name first, so that a
    failure leaves neither; returns the PNG's path."""
    png = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"spike_counts_prompt": prompt, "spike_counts_generated": generated}
    if real is not None:
        arrays["spike_counts_real"] = real
    with written_atomically(out) as tmp_npz, written_atomically(png) as tmp_png:
        with open(tmp_npz, "wb") as f:
            np.savez_compressed(f, **arrays, metadata=np.array(json.dumps(metadata)))
        plot_samples(tmp_png, prompt, generated, real, samples_title(metadata))
    return png


# ----------------------------------------------------------------------------- command


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise GenerateError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="generate.py",
        description="Sample spike trains from a trained model (KV-cache decoding); writes "
        "an .npz of uint8 counts and a PNG beside it.",
    )
    p.add_argument("--checkpoint", required=True, help="DCP step directory or HF export folder")
    p.add_argument("--out", required=True, help="output FILE.npz (FILE.png is written beside)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace FILE.npz and FILE.png if they exist"
    )
    g = p.add_argument_group("prompt: a dataset row (conditional) or --neurons (unconditional)")
    g.add_argument("--dataset", default=None, help="primate, rodent or synthetic")
    g.add_argument("--dataset_path", default=None, help="local dataset or Hub id to read instead")
    g.add_argument("--split", default=None, help="split to read the row from (default test)")
    g.add_argument("--row", type=int, default=None, help="row index in the split (default 0)")
    g.add_argument(
        "--prompt_bins",
        type=int,
        default=None,
        help="time bins of the row given as the prompt (default 20)",
    )
    g.add_argument("--neurons", type=int, default=None, help="unconditional: number of neurons")
    s = p.add_argument_group("sampling")
    s.add_argument("--bins", type=int, default=100, help="time bins to generate (default 100)")
    s.add_argument("--num_samples", type=int, default=1, help="samples generated together")
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1)")
    s.add_argument("--top_k", type=int, default=0, help="keep the k likeliest counts (0 = all)")
    s.add_argument("--top_p", type=float, default=1.0, help="nucleus mass in (0, 1] (default 1)")
    s.add_argument("--seed", type=int, default=0, help="sample i draws from (seed, i); default 0")
    r = p.add_argument_group("model and runtime")
    r.add_argument(
        "--flavor",
        choices=list(FLAVORS),
        default=None,
        help="architecture of a DCP directory, if neither its params.json nor its run's "
        "config.toml says",
    )
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if any)")
    r.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: decoding one token at a time gains little from more, "
        "and loses much on a busy machine)",
    )
    r.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="compute dtype (default float32 on CPU, bfloat16 on CUDA)",
    )
    return p


def _check(opts: argparse.Namespace) -> None:
    """Refuse impossible options before reading anything."""
    for option in ("checkpoint", "out", "dataset", "dataset_path"):
        if (value := getattr(opts, option)) is not None and not value.strip():
            raise GenerateError(f"--{option} is empty (an unset variable?); give a value")
    conditional = opts.dataset is not None or opts.dataset_path is not None
    if conditional and opts.neurons is not None:
        raise GenerateError("give a dataset row (--dataset/--dataset_path) or --neurons, not both")
    if not conditional and opts.neurons is None:
        raise GenerateError(
            "nothing to generate from: give a dataset row (--dataset or --dataset_path, with "
            "--split and --row) or --neurons N for unconditional generation"
        )
    row_options = {"--split": opts.split, "--row": opts.row, "--prompt_bins": opts.prompt_bins}
    if opts.neurons is not None and (given := [k for k, v in row_options.items() if v is not None]):
        raise GenerateError(
            f"{', '.join(given)}: options of a dataset row, which --neurons (unconditional) "
            "has none of; drop them, or give --dataset/--dataset_path instead of --neurons"
        )
    opts.split = "test" if opts.split is None else opts.split
    opts.row = 0 if opts.row is None else opts.row
    opts.prompt_bins = 20 if opts.prompt_bins is None else opts.prompt_bins
    rules = [
        (opts.neurons is None or opts.neurons > 0, f"--neurons {opts.neurons}: must be > 0"),
        (opts.bins > 0, f"--bins {opts.bins}: must be > 0"),
        (opts.num_samples > 0, f"--num_samples {opts.num_samples}: must be > 0"),
        (
            0 < opts.threads <= (os.cpu_count() or 1),
            f"--threads {opts.threads}: must be between 1 and this machine's {os.cpu_count()} CPUs",
        ),
        (-(2**63) <= opts.seed < 2**64, f"--seed {opts.seed}: must fit in 64 bits"),
        (opts.prompt_bins >= 0, f"--prompt_bins {opts.prompt_bins}: must be >= 0"),
        (
            0 <= opts.temperature < math.inf,
            f"--temperature {opts.temperature}: must be finite and >= 0 (0 = greedy)",
        ),
        (
            0 <= opts.top_k <= SEPARATOR,
            f"--top_k {opts.top_k}: must be between 0 (all counts) and {SEPARATOR} (there are "
            f"{SEPARATOR} counts)",
        ),
        (0 < opts.top_p <= 1, f"--top_p {opts.top_p}: must be in (0, 1]"),
    ]
    for ok, message in rules:
        if not ok:
            raise GenerateError(message)
    check_checkpoint(Path(opts.checkpoint), opts.flavor)  # before the data is read
    out = Path(opts.out)
    problem = output_problem(out, ".npz")
    if problem is None:  # (a folder such as "." is refused above: it has no suffix to swap)
        png = out.with_suffix(".png")
        if chart := output_problem(png, ".png"):
            problem = f"the chart beside it, {png}, {chart}"
        elif not opts.overwrite and (out.exists() or png.exists()):
            which = "it" if out.exists() else f"the chart beside it, {png},"
            problem = f"{which} exists; pass --overwrite to replace it, or choose another"
    if problem is not None:
        raise GenerateError(f"--out {out}: {problem}")


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GenerateError(f"--device {name}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise GenerateError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise GenerateError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )
    return device


def generate(opts: argparse.Namespace) -> dict[str, Any]:
    """Everything the command does; returns the metadata written into the .npz."""
    _check(opts)
    device = _device(opts.device)
    dtype = DTYPES[opts.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if device.type == "cpu":
        torch.set_num_threads(opts.threads)
    row = None
    if opts.neurons is None:
        row = read_row(opts.dataset, opts.dataset_path, opts.split, opts.row)
        n_neurons, have = row.counts.shape
        if opts.prompt_bins > have:
            raise GenerateError(
                f"--prompt_bins {opts.prompt_bins}: row {opts.row} has only {have} time bins"
            )
        prompt = row.counts[:, : opts.prompt_bins]  # (neurons, prompt_bins)
        real = row.counts[:, opts.prompt_bins : opts.prompt_bins + opts.bins]  # (neurons, <=bins)
        if real.shape[1] < opts.bins:
            logger.warning(
                f"Row {opts.row} has {real.shape[1]} time bins after the prompt: the real "
                f"continuation to compare is that long, not --bins {opts.bins}"
            )
    else:
        n_neurons = opts.neurons
        prompt = np.zeros((n_neurons, 0), dtype=np.uint8)  # (neurons, 0)
        real = None
    period = n_neurons + 1
    total = (prompt.shape[1] + opts.bins) * period
    prompt_len = prompt.shape[1] * period + 1
    loaded = load_model(
        Path(opts.checkpoint), device, dtype, total, opts.flavor, opts.num_samples, prompt_len
    )
    logger.info(f"Model: {loaded.origin}, {device}, {str(dtype).removeprefix('torch.')}")
    if loaded.trained_seq_len is not None and total > loaded.trained_seq_len:
        logger.warning(
            f"Generating {total:,} tokens (({prompt.shape[1]} prompt + {opts.bins} new bins) x "
            f"({period - 1} neurons + a separator)), beyond the {loaded.trained_seq_len:,}-token "
            "context the model was trained with: expect samples past it to degrade"
        )

    sampling = Sampling(opts.temperature, opts.top_k, opts.top_p)
    prompt_tokens = np.concatenate([tokenize_row(prompt), [SEPARATOR]])
    start = time.perf_counter()
    try:
        tokens = generate_tokens(
            loaded.model,
            torch.from_numpy(prompt_tokens.astype(np.int64)),
            n_neurons,
            opts.bins,
            opts.num_samples,
            sampling,
            opts.seed,
        )
    except NonFiniteLogits:
        raise GenerateError(
            f"{opts.checkpoint}: the model's logits are NaN or infinite (a diverged "
            "checkpoint?); use an earlier step"
        ) from None
    seconds = time.perf_counter() - start
    new_tokens = opts.num_samples * (total - prompt_tokens.size + 1)
    logger.info(
        f"Generated {opts.num_samples} x {opts.bins} bins of {n_neurons} neurons in "
        f"{seconds:.2f} s ({new_tokens / seconds:.0f} tokens/s)"
    )
    generated = tokens_to_counts(tokens[:, prompt.shape[1] * period :].cpu().numpy(), n_neurons)
    metadata = {
        "checkpoint": str(opts.checkpoint),
        "model": loaded.origin,
        "trained_seq_len": loaded.trained_seq_len,
        "dataset": None if row is None else row.label,
        "split": None if row is None else opts.split,
        "row": None if row is None else opts.row,
        "row_ids": {} if row is None else row.ids,
        "n_neurons": n_neurons,
        "prompt_bins": prompt.shape[1],
        "bins": opts.bins,
        "real_bins": None if real is None else real.shape[1],
        "num_samples": opts.num_samples,
        "sampling": dataclasses.asdict(sampling),
        "seed": opts.seed,
        "seeding": "sample i: a torch generator seeded with numpy SeedSequence(seed mod 2**64, "
        "spawn_key=(i,)).generate_state(1, uint64); each count = argmax(p / Exp(1) noise)",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": round(seconds, 3),
        "layout": "counts are uint8 (neurons, time bins) matrices; generated has a leading "
        "sample axis; sample i as a row = concatenate([prompt, generated[i]], axis=1)",
    }
    try:
        png = save(Path(opts.out), prompt, generated, real, metadata)
    except OSError as e:  # a full disk, say: name the output, not a temporary file
        raise OSError(
            f"cannot write --out {opts.out} ({e.strerror or first_line(e)}); choose another "
            "--out, or free space"
        ) from None
    logger.info(f"Wrote {opts.out} and {png}")
    return metadata


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (every failure is one `error:` line)."""
    init_logger(0)
    threads = torch.get_num_threads()
    try:
        with noting_ctrl_c() as ctrl_c:
            generate(build_parser().parse_args(argv))
    except BaseException as e:
        failure = _failure(e, bool(ctrl_c))
        if failure is None:
            raise
        print(f"error: {failure[1]}", file=sys.stderr, flush=True)
        return failure[0]
    finally:
        torch.set_num_threads(threads)  # --threads is for this command, not its caller
    return 0


def _failure(e: BaseException, ctrl_c: bool) -> tuple[int, str] | None:
    """(exit status, message) of a generation that raised `e`, after a Ctrl-C if `ctrl_c`
    (safetensors turns one into its own error while it reads); None for an unexpected
    error (a bug: its traceback is wanted) or an exit."""
    if isinstance(e, (SystemExit, GeneratorExit)):
        return None
    if ctrl_c or interrupted(e):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(e, (GenerateError, ConfigError, ConvertError)):
        return 2, str(e)
    if isinstance(e, OSError):  # unreadable files, full disk, permissions
        return 1, first_line(e)
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):  # beyond what check_memory saw
        return 1, f"out of memory ({first_line(e)}); generate fewer --bins or --num_samples"
    return None
