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

from titan.cli import run_command
from titan.config import JobConfig
from titan.data.held_out import IGNORE, HeldOut
from titan.data.tokenizer import SEPARATOR
from titan.distributed import ParallelDims, env_rank
from titan.logging import init_logger, logger
from titan.run import build_run


@torch.no_grad()
def evaluate(
    model: nn.Module, data: HeldOut, dims: ParallelDims, batch_size: int, n_windows: int
) -> dict[str, Any]:
    """Loss sums over this evaluation's windows, reduced over the ranks (float64, so the
    order of the sums does not show), as `summarize` reports them."""
    device = next(model.parameters()).device
    n_sources = len(data.source_names)
    loss = torch.zeros(n_sources, dtype=torch.float64, device=device)  # per source
    tokens = torch.zeros(n_sources, dtype=torch.float64, device=device)
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # count labels: loss, tokens
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
        row = source.clamp_min(0)  # padding's -1 adds zeros to source 0
        loss.index_add_(0, row, ce)
        tokens.index_add_(0, row, valid)
        is_count = valid * (labels != SEPARATOR)
        counts += torch.stack([(ce * is_count).sum(), is_count.sum()])
    model.train(was_training)
    totals = torch.cat([loss, tokens, counts])
    dist.all_reduce(totals)
    loss, tokens, counts = totals[:n_sources], totals[n_sources : 2 * n_sources], totals[-2:]
    return summarize(
        float(loss.sum()),
        float(tokens.sum()),
        float(counts[0]),
        float(counts[1]),
        {n: (float(loss[i]), float(tokens[i])) for i, n in enumerate(data.source_names)},
    )


def summarize(
    loss: float,
    tokens: float,
    count_loss: float,
    count_tokens: float,
    by_source: dict[str, tuple[float, float]],
) -> dict[str, Any]:
    """Mean losses (nats) and bits per token from sums of losses and label counts."""

    def mean(total: float, n: float) -> float:
        return total / n if n else math.nan

    result = {
        "loss": mean(loss, tokens),
        "bits_per_token": mean(loss, tokens) / math.log(2),
        "tokens": int(tokens),
        "loss_counts": mean(count_loss, count_tokens),
        "bits_per_token_counts": mean(count_loss, count_tokens) / math.log(2),
        "count_tokens": int(count_tokens),
        "by_source": {  # sources this evaluation reached
            name: {"loss": mean(s, n), "bits_per_token": mean(s, n) / math.log(2), "tokens": int(n)}
            for name, (s, n) in by_source.items()
            if n > 0
        },
    }
    return result


def results_table(result: dict[str, Any]) -> str:
    rows = [
        ("all labels", result["tokens"], result["loss"], result["bits_per_token"]),
        ("spike counts only", result["count_tokens"], result["loss_counts"],
         result["bits_per_token_counts"]),
    ]  # fmt: skip
    rows += [
        (f"source {name}", r["tokens"], r["loss"], r["bits_per_token"])
        for name, r in result["by_source"].items()
    ]
    return tabulate(
        rows,
        headers=["", "tokens", "loss (nats)", "bits/token"],
        floatfmt=".4f",
        intfmt=",",
        tablefmt="simple_outline",
    )


def results_path(cfg: JobConfig, step_dir: Path) -> Path:
    """`eval.output`, else `<step directory>.eval-<split>.json` beside it (the checkpoint
    directory itself is never written)."""
    if cfg.eval.output:
        return Path(cfg.eval.output)
    return step_dir.parent / f"{step_dir.name}.eval-{cfg.eval.split}.json"


def run_evaluation(cfg: JobConfig) -> dict[str, Any]:
    """Everything `evaluate.py` does; returns the results (on every rank)."""
    begin = time.perf_counter()
    with build_run(cfg, train=False) as run:
        path = (
            Path(cfg.eval.checkpoint) if cfg.eval.checkpoint else run.checkpointer.newest_weights()
        )
        run.checkpointer.load_weights(path)
        data = HeldOut.open(cfg, cfg.eval.split)
        batch = cfg.eval.batch_size if cfg.eval.batch_size > 0 else cfg.training.batch_size
        dp = run.dims.dp_degree
        n_windows = data.windows_for(cfg.eval.steps, cfg.eval.max_tokens, dp, batch)
        result = evaluate(run.model, data, run.dims, batch, n_windows)
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
        out = results_path(cfg, path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)
        whole = (
            "the whole split"
            if n_windows == data.num_windows
            else f"{n_windows} of {data.num_windows} windows"
        )
        logger.info(
            f"Evaluated {path} on {data.label} ({whole}, {result['tokens']:,} labels) in "
            f"{result['seconds']:.1f} s:\n{results_table(result)}\nResults: {out}"
        )
    return result


def _evaluate(cfg: JobConfig) -> None:
    init_logger(env_rank()[0])
    run_evaluation(cfg)


def main(argv: list[str]) -> int:
    """`evaluate.py`: the held-out loss of a checkpoint of the run a recipe describes."""
    return run_command("evaluate.py", argv, _evaluate)
