"""Held-out loss of a checkpoint, and the same numbers for validation during training.

    torchrun --nproc_per_node 2 evaluate.py --job.config_file train_configs/debug_model.toml
    python evaluate.py --job.config_file X.toml --checkpoint.load_step 50
    python evaluate.py --job.config_file X.toml --eval.checkpoint DIR/step-N --eval.max_tokens 10000

The model is built and sharded as for training (any number of ranks), its weights only are
loaded (never the optimizer state), and it runs under `torch.no_grad`: no weight changes
and nothing is written into the checkpoint. The split (`eval.split`, default test) is read
with the training tokenization as one stream of windows (`titan.data.held_out`), the same
windows whatever the number of ranks. Reported: the mean token cross-entropy (nats) and
bits per token, over all labels and over spike-count labels only (the separator 255 that
opens every time bin is trivially predictable), overall and per `source_dataset`. Results
go to the console as a table and to a JSON file beside the checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

from titan.checkpoint import storage
from titan.checkpoint.resume import newest_weights, refuse_other_weights
from titan.cli import run_command
from titan.config import ConfigError, JobConfig
from titan.data.held_out import IGNORE, HeldOut
from titan.data.sources import resolve_source
from titan.data.tokenizer import SEPARATOR
from titan.distributed import ParallelDims, dry_run_world_size, env_rank
from titan.files import json_text, output_problem, written_atomically
from titan.logging import init_logger, logger
from titan.memory import dry_run_plans, format_plan, with_eval_batch
from titan.models.llama import param_shapes
from titan.preflight import checkpoint_folder, shape_args
from titan.run import build_run, model_args


@torch.no_grad()
def evaluate(
    model: nn.Module, data: HeldOut, dims: ParallelDims, batch_size: int, n_windows: int
) -> dict[str, Any]:
    """Loss sums over this evaluation's windows, reduced over the ranks (float64, so the
    order of the sums does not show), as `summarize` reports them."""
    device = next(model.parameters()).device
    # per source: loss and labels over all labels, then over the spike-count labels only
    sums = torch.zeros(4, len(data.source_names), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for inputs, labels, source in data.batches(
        dims.dp_rank(), dims.dp_degree, batch_size, n_windows
    ):
        labels, source = labels.to(device).flatten(), source.to(device).flatten()
        logits = model(inputs.to(device))  # (batch, seq, vocab)
        ce = F.cross_entropy(
            logits.flatten(0, 1).float(), labels, ignore_index=IGNORE, reduction="none"
        ).double()  # (batch * seq,), 0 where ignored
        # masks by multiplication, not indexing: no host sync per batch on a GPU
        valid = (labels != IGNORE).double()
        is_count = valid * (labels != SEPARATOR)
        row = source.clamp_min(0)  # padding's -1 adds zeros to source 0
        sums.index_add_(1, row, torch.stack([ce, valid, ce * is_count, is_count]))
    model.train(was_training)
    dist.all_reduce(sums)
    by_source = {n: sums[:, i].tolist() for i, n in enumerate(data.source_names)}
    return summarize(sums.sum(dim=1).tolist(), by_source)


def _means(loss: float, tokens: float, count_loss: float, count_tokens: float) -> dict[str, Any]:
    """Mean losses (nats) and bits per token, over all labels and the spike counts only."""

    def mean(total: float, n: float) -> float:
        return total / n if n else math.nan

    return {
        "loss": mean(loss, tokens),
        "bits_per_token": mean(loss, tokens) / math.log(2),
        "tokens": int(tokens),
        "loss_counts": mean(count_loss, count_tokens),
        "bits_per_token_counts": mean(count_loss, count_tokens) / math.log(2),
        "count_tokens": int(count_tokens),
    }


def summarize(totals: list[float], by_source: dict[str, list[float]]) -> dict[str, Any]:
    """The results from sums (loss, labels, loss on count labels, count labels), in all
    and per source (the sources this evaluation reached)."""
    return _means(*totals) | {
        "by_source": {name: _means(*s) for name, s in by_source.items() if s[1] > 0}
    }


def results_table(result: dict[str, Any]) -> str:
    """All labels and the spike counts only, in all and per source."""
    keys = ("tokens", "loss", "bits_per_token", "loss_counts", "bits_per_token_counts")
    rows = [("all sources", *(result[k] for k in keys))]
    rows += [(f"source {name}", *(r[k] for k in keys)) for name, r in result["by_source"].items()]
    return tabulate(
        rows,
        headers=["", "tokens", "loss (nats)", "bits/token", "spike counts only: loss",
                 "bits/token"],
        floatfmt=".4f",
        intfmt=",",
        tablefmt="simple_outline",
    )  # fmt: skip


def results_path(cfg: JobConfig, step_dir: Path) -> Path:
    """`eval.output`, else `<step directory>.eval-<split>.json` beside it (the checkpoint
    directory itself is never written)."""
    if cfg.eval.output:
        return Path(cfg.eval.output)
    step_dir = step_dir.resolve()  # (a name, also for `--eval.checkpoint .`)
    return step_dir.parent / f"{step_dir.name}.eval-{cfg.eval.split}.json"


def check_output(out: Path, key: str) -> None:
    """Refuse, before any work, a results path that cannot be written as a .json file, or
    that names an existing file other than an evaluation's results (never replaced)."""
    problem = output_problem(out, ".json")
    if problem is None and out.exists() and not _is_result(out):
        problem = "exists and is not an evaluation's results file; choose another file"
    if problem is not None:
        raise ConfigError(f"{key} {out}: {problem}")


def _is_result(path: Path) -> bool:
    """Whether `path` holds the JSON results this command writes."""
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(result, dict) and {"checkpoint", "split", "loss"} <= result.keys()


def planned(cfg: JobConfig) -> tuple[Path, Path]:
    """(the checkpoint to evaluate, the results file), both checked before any work, as is
    the dataset's path: all an evaluation reads and writes (not what training would, such
    as `checkpoint.initial_load_path` or room for a checkpoint)."""
    resolve_source(cfg)
    if cfg.eval.checkpoint and cfg.checkpoint.load_step != -1:
        raise ConfigError(
            f"eval.checkpoint and checkpoint.load_step = {cfg.checkpoint.load_step} both name "
            "the checkpoint to evaluate; keep one (--checkpoint.load_step=-1 unsets the "
            "recipe's)"
        )
    if cfg.eval.checkpoint:
        path = Path(cfg.eval.checkpoint)
        if problem := storage.step_problem(path):
            raise ConfigError(f"eval.checkpoint {path}: {problem}")
    else:
        path = newest_weights(checkpoint_folder(cfg), cfg.checkpoint.load_step)
    refuse_other_weights(param_shapes(shape_args(cfg)), path)  # from .metadata alone
    out = results_path(cfg, path)
    check_output(out, "eval.output" if cfg.eval.output else "the results file")
    return path, out


def _write(out: Path, result: dict[str, Any]) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with written_atomically(out) as tmp:
            tmp.write_text(json_text(result, indent=2) + "\n")
    except OSError as e:
        raise ConfigError(
            f"cannot write the results file {out} ({e.strerror}); the table above has them"
        ) from None


def _batch(cfg: JobConfig) -> int:
    """Windows per forward on each rank."""
    return cfg.eval.batch_size if cfg.eval.batch_size > 0 else cfg.training.batch_size


def run_evaluation(cfg: JobConfig) -> dict[str, Any]:
    """Everything `evaluate.py` does; returns the results (on every rank)."""
    begin = time.perf_counter()
    path, out = planned(cfg)
    batch = _batch(cfg)
    data = HeldOut.open(cfg, cfg.eval.split, "eval.split")  # its problems before the model is built
    with build_run(cfg, train=False, eval_batch=batch) as run:
        run.checkpointer.load_weights(path)
        dp = run.dims.dp_degree
        n_windows = data.windows_for(cfg.eval.steps, cfg.eval.max_tokens, dp, batch)
        result = evaluate(run.model, data, run.dims, batch, n_windows)
    if result["tokens"] == 0:  # (the same sums on every rank)
        raise ConfigError(
            f"{data.label}: no label to evaluate: every row read was left out (the warnings "
            "above say why); no results written"
        )
    result |= {
        "checkpoint": str(path),
        "dataset": data.label,
        "split": cfg.eval.split,
        "seq_len": cfg.training.seq_len,
        "windows": n_windows,
        "of_windows": data.num_windows,
        "seconds": round(time.perf_counter() - begin, 2),
    }
    if run.rank == 0:
        whole = (
            "the whole split"
            if n_windows == data.num_windows
            else f"{n_windows} of {data.num_windows} windows"
        )
        logger.info(  # first, so that a failed write loses nothing
            f"Evaluated {path} on {data.label} ({whole}, {result['tokens']:,} labels) in "
            f"{result['seconds']:.1f} s:\n{results_table(result)}"
        )
        _write(out, result)
        logger.info(f"Results: {out}")
    return result


def dry_run(cfg: JobConfig) -> None:
    """The checks of a real start and its memory plan (for this machine, or the GPUs of
    `job.plan_for`, at the world size of WORLD_SIZE or the recipe's degrees); nothing is
    loaded or written. A dataset saved to disk is opened (its split and rows checked, its
    windows counted); a Hub dataset or parquet/arrow files are left to the real run,
    which converts them into `datasets`' cache."""
    world = dry_run_world_size(cfg)  # checked first: env_rank() trusts what torchrun sets
    init_logger(env_rank()[0])
    path, out = planned(cfg)
    batch = _batch(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dims = ParallelDims.from_config(cfg, world, device.type, training=False)
    source = resolve_source(cfg)
    # Hub ids and parquet/arrow files are left to the real run: `datasets` would download
    # or convert them into its cache, and a dry run writes nothing.
    reads = f"{source.label} [{cfg.eval.split}] (opened by the real run: `datasets` converts it)"
    if source.kind == "disk":  # a save_to_disk folder (the synthetic datasets too): mapped
        data = HeldOut.open(cfg, cfg.eval.split, "eval.split")
        n = data.windows_for(cfg.eval.steps, cfg.eval.max_tokens, dims.dp_degree, batch)
        reads = data.describe(n)
    args, _ = model_args(cfg, device, measure_auto=False)
    plans = dry_run_plans(with_eval_batch(cfg, batch), args, dims, device, training=False)
    logger.info(
        f"dry run: would evaluate {path}\n    on {reads}\n    and write {out}\n"
        + "\n".join(format_plan(p, f"{label}, world {world}") for label, p in plans)
    )


def _evaluate(cfg: JobConfig) -> None:
    if cfg.job.dry_run:
        dry_run(cfg)
        return
    init_logger(env_rank()[0])
    run_evaluation(cfg)


def main(argv: list[str]) -> int:
    """`evaluate.py`: the held-out loss of a checkpoint of the run a recipe describes."""
    return run_command("evaluate.py", argv, _evaluate)
