"""Speed benchmark: titan's training step against transformers' LlamaForCausalLM.

    python bench/step.py --out bench/results/$(date +%F)-h200.md          # a GPU node
    python bench/step.py --seqs 131072 --policies attn,full --compile on   # a subset
    python bench/step.py --seqs 131072 --configs titan:full:off,titan:attn:on,transformers:ckpt:off
    python bench/step.py --tiny                                            # CPU, seconds

In one process, on one device: the bf16 matmul ceiling; every attention kernel that can
run here, forward + backward at each sequence length (TFLOP/s counting the causal half);
then whole optimizer steps of titan's own code (`build_run` + `train_step`, FSDP2 on a
world of one, bf16 parameters, fp32 master weights and reduction, fused AdamW) for each
activation policy and with/without `torch.compile`, against `transformers`'
LlamaForCausalLM built with the same shapes (fp32 weights, bf16 autocast, fused AdamW,
SDPA, gradient checkpointing on and off), eager and compiled. Models have Llama-3.1-8B's
layer shapes with `--layers` layers (so one GPU holds them) and vocabulary 256. Each
configuration reports tokens/s, TFLOP/s, MFU by torchtitan's formula and the causal one,
peak memory and its ratio to the best transformers configuration at that length. Warm-up
steps are excluded, the device is synchronized around each step, times are medians. A
configuration that runs out of memory is reported as such. The results file (markdown)
records the device, driver, torch, CUDA and cuDNN versions and the command; the table is
printed last.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from titan.cli import OneLineParser, at_least  # noqa: E402
from titan.config import load_config  # noqa: E402
from titan.distributed import exit_process  # noqa: E402
from titan.files import output_problem  # noqa: E402
from titan.kernel_choice import CUDA_CANDIDATES, AttnShape, time_forward_backward  # noqa: E402
from titan.metrics import peak_tflops  # noqa: E402
from titan.models import keymap, llama  # noqa: E402
from titan.models.attention import attention_fn, unavailable_reason  # noqa: E402
from titan.run import build_run  # noqa: E402
from titan.trainer import train_step  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.reset()


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def matmul_ceiling(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """TFLOP/s of an n x n x n matmul (median of 10 after warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(13):
        _sync(device)
        begin = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - begin)
    return 2 * n**3 / statistics.median(times) / 1e12


def attention_rows(device, args, seqs, dtype) -> tuple[list[list], dict[int, str]]:
    """Each kernel's forward + backward time at each length; also the fastest per length."""
    candidates = CUDA_CANDIDATES if device.type == "cuda" else ("sdpa",)
    rows, fastest = [], {}
    for seq in seqs:
        shape = AttnShape(1, seq, args.n_heads, args.n_kv_heads, args.head_dim, dtype)
        flops = 3.5 * 2 * seq * seq * args.n_heads * args.head_dim  # fwd + bwd, causal half
        best = None
        for impl in candidates:
            reason = unavailable_reason(impl, device)
            if reason is not None:
                rows.append([seq, impl, "-", "-", reason[:60]])
                continue
            try:
                ms = time_forward_backward(attention_fn(impl), shape, device)
            except Exception as e:  # noqa: BLE001 - reported in the table
                rows.append([seq, impl, "-", "-", f"{type(e).__name__}: {str(e)[:50]}"])
                continue
            finally:
                _free(device)
            rows.append([seq, impl, f"{ms:.2f}", f"{flops / ms / 1e9:.3g}", ""])
            if best is None or ms < best[1]:
                best = (impl, ms)
        fastest[seq] = best[0] if best else "sdpa"
    return rows, fastest


def _timed_steps(step, device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds of `step()` after `warmup` calls, synchronized around each."""
    times = []
    for i in range(warmup + steps):
        _sync(device)
        begin = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


POLICIES = ("none", "attn", "op", "full", "auto")
"""`--policies`: activation_checkpoint.mode none/full/auto, or a selective option."""


def titan_step_time(opts, seq: int, policy: str, compiled: bool, attn: str):
    """(seconds per optimizer step, the planner's peak estimate in bytes, its policy per
    block) of titan's trainer code on one micro-batch."""
    mode, option = (policy, "attn") if policy in ("none", "full", "auto") else ("selective", policy)
    cfg = load_config(
        [
            "--model.flavor=bench",
            f"--model.attn_impl={attn}",
            f"--training.seq_len={seq}",
            "--training.batch_size=1",
            "--training.vocab_size=256",
            f"--training.compile={compiled}",
            f"--training.mixed_precision_param={opts.dtype}",
            f"--activation_checkpoint.mode={mode}",
            f"--activation_checkpoint.selective_ac_option={option}",
        ]
    )
    with build_run(cfg, train=False) as run:
        tokens = torch.randint(0, 256, (1, seq + 1), device=run.device)
        batch = [(tokens[:, :-1], tokens[:, 1:])]
        seconds = _timed_steps(
            lambda: train_step(run.model, run.optimizer, batch, seq, 1, 1.0),
            run.device,
            opts.warmup,
            opts.steps,
        )
        return seconds, run.memory.total, f"blocks: {run.memory.policy_summary()}"


def transformers_step_time(opts, device, args, seq: int, checkpointing: bool, compiled: bool):
    """Seconds per optimizer step of LlamaForCausalLM with the same shapes."""
    import transformers

    config = transformers.LlamaConfig(
        **keymap.hf_config_from_args(keymap.above_rope_original_context(args))
    )
    config._attn_implementation = "sdpa"
    config.use_cache = False  # training: no KV cache (it would be refused with checkpointing)
    model = transformers.LlamaForCausalLM(config).to(device)  # fp32 master weights
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=not fused)
    forward = torch.compile(model) if compiled else model
    tokens = torch.randint(0, 256, (1, seq), device=device)
    autocast = opts.dtype == "bfloat16"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _timed_steps(step, device, opts.warmup, opts.steps), None, ""


@dataclasses.dataclass
class Result:
    seq: int
    system: str
    policy: str
    compiled: bool
    seconds: float | None = None
    peak: float | None = None
    """Measured peak GiB (CUDA only)."""
    plan: int | None = None
    """The memory planner's estimate in bytes (titan only)."""
    note: str = ""


def _measure(fn, device: torch.device, result: Result) -> Result:
    """Fill `result` from `fn() -> (seconds, plan bytes, note)`; a failure (out of memory,
    a compile error) becomes the note, and the benchmark goes on."""
    _free(device)
    try:
        result.seconds, result.plan, result.note = fn()
        result.peak = _peak_gib(device)
    except torch.OutOfMemoryError:
        result.note = "out of memory"
    except Exception as e:  # noqa: BLE001 - reported in the table
        result.note = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    finally:
        _free(device)
    return result


STEP_HEADERS = [
    "seq", "system", "AC", "compile", "tokens/s", "TFLOP/s", "MFU %", "MFU causal %",
    "peak GiB", "plan GiB", "vs best transformers", "note",
]  # fmt: skip


def step_row(r: Result, args, peak_tflops_: float | None, baseline: float | None) -> list:
    """One table row; `baseline`: the best transformers tokens/s at this length."""
    plan = f"{r.plan / 2**30:.3g}" if r.plan is not None else "-"
    if r.seconds is None:
        return [r.seq, r.system, r.policy, r.compiled, "-", "-", "-", "-", "-", plan, "-", r.note]
    flops = llama.flops_per_token(args, r.seq), llama.flops_per_token(args, r.seq, causal=True)
    tps = r.seq / r.seconds
    mfu = [f"{100 * tps * f / 1e12 / peak_tflops_:.1f}" if peak_tflops_ else "-" for f in flops]
    return [
        r.seq, r.system, r.policy, r.compiled, f"{tps:,.0f}", f"{tps * flops[0] / 1e12:.3g}",
        *mfu, f"{r.peak:.1f}" if r.peak is not None else "-", plan,
        f"{tps / baseline:.2f}x" if baseline else "-", r.note,
    ]  # fmt: skip


def step_rows(opts, device, args, fastest, report) -> list[list]:
    """Every configuration's row; `report(rows, done)` is called as rows are finished, so
    a run cut short (a time limit) leaves what it measured."""
    peak = peak_tflops(device)
    total = len(opts.seqs) * len(opts.configs)
    rows: list[list] = []
    for seq in opts.seqs:
        results: list[Result] = []
        for system, setting, compiled in opts.configs:  # transformers first: the baseline
            if system == "transformers":
                checkpointing = setting == "ckpt"
                fn = partial(
                    transformers_step_time, opts, device, args, seq, checkpointing, compiled
                )
                label = "gradient ckpt" if checkpointing else "no ckpt"
            else:
                fn = partial(titan_step_time, opts, seq, setting, compiled, fastest[seq])
                label = setting
            r = _measure(fn, device, Result(seq, system, label, compiled))
            results.append(r)
            outcome = f"{r.seconds:.3f} s" if r.seconds is not None else r.note
            print(f"[{len(rows) + len(results)}/{total}] {seq} tokens, {system} {label}, compile "
                  f"{compiled}: {outcome}", file=sys.stderr, flush=True)  # fmt: skip
            timed = [seq / b.seconds for b in results if b.system == "transformers" and b.seconds]
            baseline = max(timed, default=None)
            report(rows + [step_row(b, args, peak, baseline) for b in results], False)
        rows += [step_row(b, args, peak, baseline) for b in results]
    return rows


SYSTEMS = {"titan": POLICIES, "transformers": ("ckpt", "no_ckpt")}


def _titan_setting(value: str) -> bool:
    """A titan activation policy, or a block interval N >= 1."""
    return value in POLICIES or (value.isascii() and value.isdigit() and int(value) >= 1)


def _lengths(text: str) -> list[int]:
    """Comma-separated sequence lengths, each a whole number >= 2."""
    return [at_least(2)(item) for item in text.split(",")]


def parse_configs(text: str) -> list[tuple[str, str, bool]]:
    """`--configs`' SYSTEM:SETTING:COMPILE items as (system, setting, compiled), the
    transformers ones first; ValueError naming the first wrong item."""
    configs = []
    for item in text.split(","):
        parts = item.split(":")
        system = parts[0] if len(parts) == 3 else None
        if system not in SYSTEMS or parts[2] not in ("on", "off"):
            raise ValueError(f"--configs {item!r}: write SYSTEM:SETTING:COMPILE, e.g. "
                             "titan:attn:on or transformers:ckpt:off")  # fmt: skip
        if not (_titan_setting(parts[1]) if system == "titan" else parts[1] in SYSTEMS[system]):
            choices = ", ".join(SYSTEMS[system])
            raise ValueError(f"--configs {item!r}: a {system} setting is one of {choices}"
                             + " or a block interval N >= 1" * (system == "titan"))  # fmt: skip
        configs.append((system, parts[1], parts[2] == "on"))
    return sorted(configs, key=lambda c: c[0] != "transformers")


def environment(device: torch.device) -> list[str]:
    lines = [f"date: {datetime.datetime.now().isoformat(timespec='seconds')}"]
    if device.type == "cuda":
        lines.append(f"device: {torch.cuda.get_device_name(device)}")
        try:
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30,
            ).stdout.strip()  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            driver = "unknown"
        lines.append(f"driver: {driver}")
        lines.append(f"CUDA: {torch.version.cuda}, cuDNN: {torch.backends.cudnn.version()}")
    else:
        lines.append(f"device: CPU ({platform.processor() or platform.machine()}, "
                     f"{os.cpu_count()} cores)")  # fmt: skip
    lines.append(f"torch: {torch.__version__}, python: {platform.python_version()}")
    lines.append("command: " + shlex.join([sys.executable, *sys.argv]))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU, debug shapes, seconds")
    p.add_argument("--layers", type=at_least(1), help="8B-shaped layers (default 4; --tiny: 2)")
    p.add_argument("--seqs", type=_lengths, help="sequence lengths (default 8192,32768,131072; "
                   "--tiny: 64,128)")  # fmt: skip
    policies = "titan's AC policies, or N: every N-th block fully recomputed (none,attn,full,auto)"
    p.add_argument("--policies", default=None, help=policies)
    compiled = "eager (off), torch.compile (on) or each (both, the default; --tiny: off)"
    p.add_argument("--compile", choices=["both", "on", "off"], default=None, help=compiled)
    configs = (
        "exactly these configurations instead of every combination of --policies and "
        "--compile (not given with it): comma-separated SYSTEM:SETTING:COMPILE, e.g. "
        "titan:full:off,titan:attn:on,transformers:ckpt:off (SETTING: a --policies value "
        "for titan, ckpt or no_ckpt for transformers; COMPILE: on or off)"
    )
    p.add_argument("--configs", default=None, help=configs)
    p.add_argument("--warmup", type=at_least(0), help="steps not timed (default 2; --tiny: 1)")
    p.add_argument("--steps", type=at_least(1), help="timed steps, median kept (default 5; "
                   "--tiny: 2)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="results file (markdown, .md)")
    opts = p.parse_args(argv)
    if opts.configs is not None and (opts.policies or opts.compile):
        print("error: --configs names whole configurations: drop --policies and --compile, "
              "or --configs", file=sys.stderr)  # fmt: skip
        return 2
    defaults = {"policies": "none,attn,full,auto", "seqs": [8192, 32768, 131072], "layers": 4,
                "warmup": 2, "steps": 5, "compile": "both"}  # fmt: skip
    if opts.tiny:
        defaults |= {"seqs": [64, 128], "layers": 2, "warmup": 1, "steps": 2, "compile": "off"}
    for name, value in defaults.items():
        if getattr(opts, name) is None:
            setattr(opts, name, value)
    compile_modes = {"both": (False, True), "on": (True,), "off": (False,)}[opts.compile]
    policies = opts.policies.split(",")
    unknown = [p for p in policies if not _titan_setting(p)]
    if unknown:
        print(f"error: --policies {','.join(unknown)}: each must be one of "
              f"{', '.join(POLICIES)} or a block interval N >= 1", file=sys.stderr)  # fmt: skip
        return 2
    if opts.configs is None:
        opts.configs = [
            ("transformers", setting, compiled)
            for compiled in compile_modes
            for setting in SYSTEMS["transformers"]
        ] + [("titan", policy, compiled) for compiled in compile_modes for policy in policies]
    else:
        try:
            opts.configs = parse_configs(opts.configs)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if opts.out is not None and (problem := output_problem(opts.out, ".md")):
        print(f"error: --out {opts.out}: {problem}", file=sys.stderr)
        return 2
    if opts.tiny:
        device, base, opts.dtype = torch.device("cpu"), "debugmodel", "float32"
        n = 256
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device; use --tiny for the CPU smoke mode", file=sys.stderr)
            return 2
        device, base, opts.dtype = torch.device("cuda"), "8B", "bfloat16"
        n = 8192
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    llama.FLAVORS["bench"] = dataclasses.replace(llama.FLAVORS[base], n_layers=opts.layers)
    args = llama.build_model_args("bench", 256, max(opts.seqs))
    dtype = getattr(torch, opts.dtype)
    ceiling = matmul_ceiling(device, n, dtype)
    attn_rows, fastest = attention_rows(device, args, opts.seqs, dtype)
    header = [
        "# titan step benchmark",
        "",
        *[f"- {line}" for line in environment(device)],
        f"- model: {base} layer shapes x {opts.layers} layers, vocab 256, batch 1; "
        f"{opts.warmup} warm-up + median of {opts.steps} steps",
        f"- {opts.dtype} matmul {n}^3: {ceiling:.3g} TFLOP/s",
        "- plan GiB: the activation planner's estimate of one rank's peak (eager blocks)",
        *(
            ["- vs best transformers: no transformers configuration was run"]
            if all(system != "transformers" for system, _, _ in opts.configs)
            else []
        ),  # fmt: skip
        "",
        "## Attention, forward + backward (TFLOP/s counting the causal half)",
        "",
        tabulate(attn_rows, ["seq", "kernel", "ms", "TFLOP/s", "note"], tablefmt="github"),
        "",
        "## Training step",
        "",
    ]

    def report(rows: list[list], done: bool) -> str:
        table = tabulate(rows, STEP_HEADERS, tablefmt="github")
        text = "\n".join(
            [
                *header,
                table,
                "" if done else "\n(in progress: the benchmark was cut short here)",
                "",
            ]
        )
        if opts.out is not None:
            opts.out.parent.mkdir(parents=True, exist_ok=True)
            opts.out.write_text(text)
        return text

    report([], False)
    print(report(step_rows(opts, device, args, fastest, report), True))
    return 0


if __name__ == "__main__":
    exit_process(main())  # (interpreter teardown can abort under gloo)
