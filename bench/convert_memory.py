"""Peak memory of the two converter scripts on a >= 500M-parameter checkpoint (issue 5).

    .venv/bin/python bench/convert_memory.py [--workdir /tmp/titan_convert_bench] [--layers 16]

Builds a random bf16 checkpoint with the 1B flavor's shapes and Llama-3's 128256-token
vocabulary (1.40B parameters, 2.80 GB with 16 layers) in Meta layout (2 model-parallel
shards) and Hugging Face layout (safetensors shards), then runs as subprocesses:

1. llama_to_dcp.py on the HF layout (the default: embedding and output dropped, vocab 256);
2. llama_to_dcp.py on the Meta shards with --keep_embeddings (every tensor goes through,
   shards merged);
3. dcp_to_llama.py on (2)'s DCP directory with --format both (HF shards + Meta file);

and prints each run's peak resident memory (`ru_maxrss` of that child, from os.wait4)
next to the checkpoint size and the baseline of a process that only imports the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIM0 = ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings")


def build_checkpoint(folder: Path, layers: int) -> tuple[int, int]:
    """Random weights in both layouts; returns (parameters, bytes of one copy). Runs in a
    child process, so that this process stays small: a child's peak RSS counts the memory
    of its parent at fork time."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from titan.models import keymap
    from titan.models.llama import build_model_args, param_shapes

    args = build_model_args("1B", vocab_size=128256, seq_len=131072)
    args = dataclasses.replace(args, n_layers=layers)
    gen = torch.Generator().manual_seed(0)
    shapes = param_shapes(args)
    sd = {}
    for name, shape in shapes.items():
        sd[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    n_params = sum(t.numel() for t in sd.values())
    n_bytes = sum(t.nbytes for t in sd.values())

    meta = folder / "meta"
    meta.mkdir(parents=True)
    (meta / "params.json").write_text(json.dumps(keymap.meta_params_from_args(args)))
    for rank in range(2):
        shard = {}
        for name, t in sd.items():
            proj = name.split(".")[-2]
            if proj in DIM0:
                shard[name] = t.chunk(2, dim=0)[rank].clone()
            elif proj in ("wo", "w2"):
                shard[name] = t.chunk(2, dim=1)[rank].clone()
            else:
                shard[name] = t
        torch.save(shard, meta / f"consolidated.{rank:02d}.pth")
        del shard

    hf = folder / "hf"
    hf.mkdir()
    config = keymap.hf_config_from_args(args)
    (hf / "config.json").write_text(json.dumps(config))
    hf_sd = keymap.ours_to_hf_state_dict(sd, args)
    del sd
    names = list(hf_sd)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:])):
        save_file(
            {n: hf_sd[n].contiguous() for n in part},
            hf / f"model-{i + 1:05d}-of-00002.safetensors",
            metadata={"format": "pt"},
        )
    return n_params, n_bytes


def peak_rss(cmd: list[str]) -> tuple[float, float, int]:
    """(peak RSS in GB, seconds, exit status) of one child process."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024 / 1e9, time.monotonic() - start, proc.returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/titan_convert_bench")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--keep", action="store_true", help="keep the files afterwards")
    p.add_argument("--build_only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    work = Path(a.workdir)
    if a.build_only:
        print(json.dumps(build_checkpoint(work, a.layers)))
        return
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.monotonic()
    build = [sys.executable, __file__, "--build_only", "--workdir", str(work)]
    out = subprocess.run([*build, "--layers", str(a.layers)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"building the checkpoint failed:\n{out.stderr[-2000:]}")
    n_params, n_bytes = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"checkpoint: {n_params / 1e9:.3f}B parameters, {n_bytes / 1e9:.2f} GB bf16 per layout "
        f"(built in {time.monotonic() - t0:.0f} s)",
        flush=True,
    )
    py = sys.executable
    runs = [
        ("import titan.convert (baseline)", [py, "-c", "import titan.convert"]),
        (
            "llama_to_dcp HF -> DCP (embeddings dropped)",
            [py, "llama_to_dcp.py", "--input_dir", str(work / "hf"),
             "--output_dir", str(work / "dcp_hf")],
        ),
        (
            "llama_to_dcp Meta 2 shards -> DCP (--keep_embeddings)",
            [py, "llama_to_dcp.py", "--input_dir", str(work / "meta"),
             "--output_dir", str(work / "dcp_meta"), "--keep_embeddings"],
        ),
        (
            "dcp_to_llama DCP -> HF + Meta (--format both)",
            [py, "dcp_to_llama.py", "--input_dir", str(work / "dcp_meta"),
             "--output_dir", str(work / "export"), "--format", "both"],
        ),
    ]  # fmt: skip
    results = []
    for label, cmd in runs:
        print(f"\n$ {' '.join(cmd)}", flush=True)
        rss, seconds, rc = peak_rss(cmd)
        if rc != 0:
            sys.exit(f"{label}: exit status {rc}")
        results.append((label, rss, seconds))
    print(f"\ncheckpoint size: {n_bytes / 1e9:.2f} GB ({n_params / 1e9:.3f}B parameters, bf16)")
    print(f"{'run':<56} {'peak RSS':>9} {'of ckpt':>8} {'time':>7}")
    for label, rss, seconds in results:
        print(f"{label:<56} {rss:>6.2f} GB {rss * 1e9 / n_bytes:>7.0%} {seconds:>6.1f}s")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
