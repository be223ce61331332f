"""Checkpoint benchmark: save and load times, and how long the training loop is blocked
by a save in each async mode, for a Llama model of about 114M parameters with its AdamW
state, sharded with FSDP2 over the ranks torchrun gives it.

    .venv/bin/torchrun --standalone --nproc_per_node 2 bench/checkpoint.py [--dim 768 --layers 12]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tabulate import tabulate

from titan.config import load_config
from titan.distributed import exit_process, init_distributed
from titan.logging import init_logger
from titan.models import llama
from titan.run import build_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    if opts.dim < 128 or opts.dim % 128:  # 64-wide heads, half as many KV heads
        parser.error(f"--dim {opts.dim}: use a positive multiple of 128")
    if opts.layers < 1 or opts.repeats < 1:
        parser.error("--layers and --repeats must be at least 1")
    llama.FLAVORS["bench"] = llama.ModelArgs(
        **{
            **llama.FLAVORS["debugmodel"].__dict__,
            "dim": opts.dim,
            "n_layers": opts.layers,
            "n_heads": opts.dim // 64,
            "n_kv_heads": opts.dim // 128,
            "multiple_of": 256,
            "vocab_size": 32000,
        }
    )
    device, rank, world = init_distributed()
    init_logger(rank)
    folder = Path(tempfile.mkdtemp(prefix="titan-ckpt-bench-")) if rank == 0 else None
    holder = [str(folder)]
    dist.broadcast_object_list(holder)
    rows = []
    for mode in ("disabled", "async", "async_with_pinned_mem"):
        cfg = load_config(
            [
                "--model.flavor=bench",
                "--training.vocab_size=32000",
                "--training.seq_len=128",
                "--activation_checkpoint.mode=none",
                "--training.mixed_precision_param=float32",
                "--checkpoint.enable_checkpoint",
                f"--checkpoint.async_mode={mode}",
                f"--job.dump_folder={holder[0]}/{mode}",
                "--checkpoint.interval=1",
                "--training.steps=1000",
                "--checkpoint.keep_latest_k=1",
            ]
        )
        with build_run(cfg, train=False) as run:
            model, ckpt = run.model, run.checkpointer
            # One real step so the optimizer state exists and is saved.
            model(torch.randint(0, 256, (1, 128), device=device)).float().mean().backward()
            run.optimizer.step()
            blocked, total = [], []
            for step in range(1, opts.repeats + 1):
                dist.barrier()
                begin = time.perf_counter()
                ckpt.maybe_save(step)
                blocked.append(time.perf_counter() - begin)
                ckpt.wait()
                dist.barrier()
                total.append(time.perf_counter() - begin)
            begin = time.perf_counter()
            ckpt.load()
            load_s = time.perf_counter() - begin
        n = sum(p.numel() for p in model.parameters())
        rows.append(
            (
                mode,
                f"{n / 1e6:.0f}M",
                f"{min(blocked):.2f}",
                f"{min(total):.2f}",
                f"{100 * min(blocked) / min(total):.0f}%",
                f"{load_s:.2f}",
            )
        )
    if rank == 0:
        print(
            tabulate(
                rows,
                headers=[
                    "async_mode",
                    "params",
                    "loop blocked s",
                    "save done s",
                    "blocked / save",
                    "load s",
                ],
                tablefmt="github",
            )
        )
        print(
            f"world size {world}, device {device.type}, torch {torch.__version__}; "
            "minimum over repeats"
        )
        shutil.rmtree(holder[0], ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process(0)  # (interpreter teardown can abort under gloo)
