"""Activation checkpointing policies and the memory plan.

- What "attn" keeps: per block, the block input and the attention kernel's outputs; the
  matmuls are recomputed in the backward and attention is not (counted op by op, with
  SDPA and with the FlashAttention custom op).
- The plan's estimate of the bytes each policy keeps per block equals what the debug
  model really keeps on CPU (allocator bytes in use after the forward), at two sequence
  lengths, within 10%; so does its estimate of the loss's peak per logit (the trainer's
  loss, float32 and bfloat16).
- The auto plan is monotone: more memory never gives any block a slower policy; and it
  keeps attention outputs before it drops recomputation.
- Each 8B/131k recipe's dry run prints the plan for H100 80 GB, GH200 96 GB, H200 141 GB;
  a run whose auto plan cannot fit stops with one line saying what would: `auto` for an
  explicit mode where it fits, else the largest micro-batch that fits and divides the
  global batch (found by bisection), one shorter sequence, or more ranks.
- `job.plan_for` takes known GPU names and sizes, each once.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import ROOT, TRAIN_ENV, assert_refused, run_train
from torch.utils._python_dispatch import TorchDispatchMode

from titan.config import ConfigError, load_config
from titan.distributed import ParallelDims
from titan.memory import (
    POLICIES,
    GiB,
    MemoryPlan,
    activation_bytes,
    device_capacity,
    format_plan,
    plan_memory,
    plan_policies,
)
from titan.models.llama import Transformer, build_model_args
from titan.parallelize import apply_ac
from titan.trainer import token_loss_sum

SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
FLASH = torch.ops.titan.flash_attention.default
MM = torch.ops.aten.mm.default


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))


def _model(policy: str, n_layers: int = 4, seq: int = 64, attn_impl: str = "sdpa"):
    args = dataclasses.replace(
        build_model_args("debugmodel", 256, seq, attn_impl), n_layers=n_layers
    )
    model = Transformer(args)
    model.init_weights(seed=0)
    apply_ac(model, [policy] * n_layers)
    return model


def _op_counts(policy: str, attn_impl: str = "sdpa") -> Counter:
    model = _model(policy, attn_impl=attn_impl)
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with _Count() as counter:
        model(tokens).float().square().mean().backward()
    return counter.ops


@pytest.mark.parametrize("attn_impl, attention_op", [("sdpa", SDPA_CPU), ("reference", FLASH)])
def test_attn_policy_recomputes_matmuls_but_not_attention(attn_impl, attention_op):
    if attn_impl == "reference":
        import test_attention  # noqa: F401 - registers the plain-PyTorch "reference" kernel
    counts = {p: _op_counts(p, attn_impl) for p in ("none", "attn", "full")}
    layers = 4
    # Each block's forward has 7 matmuls (wq, wk, wv, wo, w1, w3, w2); the recomputation
    # stops once the backward has what it needs, so w2's output (needed by nothing) is not
    # redone: the other 6 are recomputed under both policies.
    assert counts["attn"][MM] == counts["full"][MM] == counts["none"][MM] + 6 * layers
    assert counts["none"][attention_op] == layers
    assert counts["attn"][attention_op] == layers  # kept, not recomputed
    assert counts["full"][attention_op] == 2 * layers


# ----------------------------------------------------------------------------- bytes


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
        "keepcost".split()
    ]


def _bytes_in_use() -> int:
    """Bytes the C allocator has handed out and not taken back (heap + mmapped chunks);
    torch's CPU tensors come from it."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def _kept_per_block(policy: str, seq: int) -> float:
    """Bytes held from the forward for the backward, per block: a 4-block model's minus
    a 2-block model's, over 2 (the embedding, head and loss cancel)."""
    held = {}
    for layers in (4, 2):
        model = _model(policy, n_layers=layers, seq=seq)
        tokens = torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(0))
        gc.collect()
        before = _bytes_in_use()
        out = model(tokens)
        held[layers] = _bytes_in_use() - before
        del out
    return (held[4] - held[2]) / 2


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33")
@pytest.mark.parametrize("seq", [2048, 4096])
def test_estimated_bytes_per_block_match_what_cpu_keeps(seq):
    args = build_model_args("debugmodel", 256, seq)
    estimate = activation_bytes(args, 1, seq, torch.float32).kept
    for policy in POLICIES:
        measured = _kept_per_block(policy, seq)
        assert abs(estimate[policy] - measured) <= 0.1 * measured, (policy, estimate, measured)
    assert estimate["none"] > estimate["op"] > estimate["attn"] > estimate["full"]


class _PeakBytes(TorchDispatchMode):
    """The most allocator bytes in use (above those at entry) after any op, backward too."""

    def __enter__(self):
        gc.collect()
        self.base, self.peak = _bytes_in_use(), 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _bytes_in_use() - self.base)
        return out


def _head_peak(vocab: int, seq: int, dtype: torch.dtype) -> int:
    """Peak bytes of the trainer's loss and its backward through the final norm and the
    output layer (no blocks; the weights' own gradients are counted elsewhere)."""
    args = dataclasses.replace(build_model_args("debugmodel", vocab, seq), n_layers=0)
    model = Transformer(args).to(dtype)
    model.init_weights(seed=0)
    model.tok_embeddings.weight.requires_grad_(False)
    model.output.weight.requires_grad_(False)
    tokens = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    with _PeakBytes() as peak:
        token_loss_sum(model, tokens, tokens).backward()
    return peak.peak


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_estimated_logits_and_loss_bytes_match_what_cpu_holds(dtype):
    """What the plan counts per logit for the loss and its backward equals the trainer's
    loss's peak on CPU (two vocabulary sizes, so what does not grow with it cancels)."""
    seq, small, large = 2048, 16384, 32768  # 400 MB apart: the allocator's noise is small
    measured = _head_peak(large, seq, dtype) - _head_peak(small, seq, dtype)
    estimate = [
        activation_bytes(build_model_args("debugmodel", v, seq), 1, seq, dtype).head
        for v in (small, large)
    ]
    assert abs(estimate[1] - estimate[0] - measured) <= 0.1 * measured, (estimate, measured)


# ----------------------------------------------------------------------------- plan


def test_auto_plan_is_monotone_and_keeps_attention_first():
    args = build_model_args("8B", 256, 131072)
    act = activation_bytes(args, 1, 131072, torch.bfloat16)
    rank = {"none": 0, "attn": 1, "full": 2}
    previous = None
    seen = set()
    for gib in range(20, 1200, 2):
        policies = plan_policies(args.n_layers, act, gib * GiB)
        if policies is None:
            assert previous is None  # once it fits, more memory keeps it fitting
            continue
        seen.add(tuple(sorted(set(policies))))
        if previous is not None:
            assert all(rank[a] <= rank[b] for a, b in zip(policies, previous, strict=True))
        assert "none" not in policies or all(p != "full" for p in policies)
        previous = policies
    assert previous == ["none"] * 32
    assert {("full",), ("attn", "full"), ("attn",), ("attn", "none"), ("none",)} <= seen


RECIPES = ["primate_8b_131k", "synthetic_8b_131k", "synthetic_primate_8b_131k",
           "lang_primate_8b_131k"]  # fmt: skip


def test_8b_recipes_dry_run_plans_for_three_gpus():
    for recipe in RECIPES:
        result = subprocess.run(
            [
                sys.executable,
                "train.py",
                f"--job.config_file=train_configs/{recipe}.toml",
                "--job.dry_run",
                "--checkpoint.initial_load_path=none",
            ],  # fmt: skip
            cwd=ROOT,
            env={**TRAIN_ENV, "WORLD_SIZE": "64"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        for gpu in ("h100-80gb", "gh200-96gb", "h200-141gb"):
            line = next(x for x in result.stdout.splitlines() if f"memory plan for {gpu}" in x)
            assert "world 64" in line and "blocks: " in line, line
        assert "activations kept (all blocks)" in result.stdout
    assert os.environ.get("WORLD_SIZE") is None  # the tests' own environment is untouched


def _dry_run(*overrides: str, world: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in TRAIN_ENV.items() if k != "WORLD_SIZE"}
    return subprocess.run(
        [sys.executable, "train.py", "--job.dry_run", *overrides],
        cwd=ROOT,
        env=env if world is None else {**env, "WORLD_SIZE": world},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_dry_run_plans_as_a_start_there_would():
    """A GPU named in plan_for gets the run's parameter dtype and memory_limit_gib; this
    machine's plan that cannot fit under `auto` is refused as a start is; the world size
    comes from a valid WORLD_SIZE."""
    recipe = "--job.config_file=train_configs/primate_8b_131k.toml"

    def plan(*overrides: str) -> str:
        result = _dry_run(recipe, "--job.plan_for=h100-80gb", *overrides, world="8")
        assert result.returncode == 0, result.stderr
        return next(x for x in result.stdout.splitlines() if "memory plan for h100-80gb" in x)

    bf16, fp32 = plan(), plan("--training.mixed_precision_param=float32")
    total = re.compile(r": ([\d.]+) GiB estimated of ([\d.]+) GiB usable \(([\d.]+) GiB total")
    (b_est, b_usable, b_total), (f_est, _, _) = (total.search(x).groups() for x in (bf16, fp32))
    assert float(f_est) > float(b_est) and float(b_total) > 79
    limited = total.search(plan("--activation_checkpoint.memory_limit_gib=10")).groups()
    assert float(limited[2]) == 10.0

    debug = "--job.config_file=train_configs/debug_model.toml"
    tiny = ("--activation_checkpoint.mode=auto", "--activation_checkpoint.memory_limit_gib=0.08")
    for result, words in [
        (_dry_run(debug, *tiny), "needs about"),
        (_dry_run(debug, world="abc"), "WORLD_SIZE = 'abc': must be a positive integer"),
        (_dry_run(debug, world="0"), "WORLD_SIZE = '0': must be a positive integer"),
        (
            _dry_run(debug, "--training.data_parallel_replicate_degree=2"),
            "needs the world size: run the dry run as WORLD_SIZE=N",
        ),
    ]:
        assert_refused(result, words)


def test_memory_limit_caps_the_device_and_cpu_ranks_share_the_ram():
    def capacity(limit: float, local_ranks: int) -> int:
        cfg = load_config(
            [
                "--job.config_file=train_configs/debug_model.toml",
                f"--activation_checkpoint.memory_limit_gib={limit}",
            ]
        )
        return device_capacity(cfg, torch.device("cpu"), local_ranks)

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert capacity(0, 1) == ram and capacity(0, 2) == ram // 2
    assert capacity(0.5, 2) == GiB // 2
    assert capacity(10 * ram / GiB, 2) == ram // 2  # never more than there is


def _debug_plan(capacity: int, **training):
    """activation_checkpoint overrides -> the debug model's plan on one CPU rank of
    `capacity` bytes, with `training` overridden."""
    cfg = load_config(["--job.config_file=train_configs/debug_model.toml"])
    cfg.training = dataclasses.replace(cfg.training, **training)
    args = build_model_args("debugmodel", 256, cfg.training.seq_len)
    return lambda **ac: plan_memory(
        dataclasses.replace(
            cfg, activation_checkpoint=dataclasses.replace(cfg.activation_checkpoint, **ac)
        ),
        args,
        ParallelDims.from_config(cfg, 1, "cpu"),
        capacity,
        torch.float32,
    )


def test_advice_for_a_huge_batch_comes_at_once_and_keeps_the_global_batch(monkeypatch):
    """The largest micro-batch that fits is found by bisection, not by trying each, and the
    advice keeps the sequences per optimizer step: it names a divisor of them."""
    from titan import memory

    calls = Counter()

    def counted(*args, **kwargs):
        calls["plans"] += 1
        if calls["plans"] > 200:  # trying batch sizes one by one would take ~10**9
            raise AssertionError("the advice tries batch sizes one by one")
        return plan_memory(*args, **kwargs)

    monkeypatch.setattr(memory, "plan_memory", counted)
    for global_batch in (-1, 10**9):
        plan = _debug_plan(2 * GiB, batch_size=10**9, global_batch_size=global_batch)
        advice = plan(mode="auto").advice
        fitting = int(re.search(r"training.batch_size = (\d+)", advice).group(1))
        assert 10**9 % fitting == 0, advice
        assert ("training.global_batch_size = 1000000000" in advice) == (global_batch == -1)
        bigger = min(d for d in range(fitting + 1, 10**6) if 10**9 % d == 0)
        assert _debug_plan(2 * GiB, batch_size=fitting)(mode="auto").fits
        assert not _debug_plan(2 * GiB, batch_size=bigger)(mode="auto").fits
        calls.clear()


def test_advice_names_auto_for_an_explicit_mode_and_a_shorter_sequence_last():
    """An explicit policy that does not fit where `auto` would is told to use `auto`; when
    not even one sequence fits, the advice is one shorter sequence."""
    plan = _debug_plan(GiB, seq_len=8192, batch_size=1)
    need = plan(mode="none", memory_headroom=0).total
    plan = _debug_plan(need - 1, seq_len=8192, batch_size=1)
    none = plan(mode="none", memory_headroom=0)
    assert not none.fits and plan(mode="auto", memory_headroom=0).fits
    assert none.advice.startswith('would fit with: activation_checkpoint.mode = "auto" (blocks: ')
    assert (
        "does not fit with these policies; would fit with: activation_checkpoint.mode"
        in format_plan(none, "this CPU")
    )

    plan = _debug_plan(GiB, seq_len=4096, batch_size=1)
    need = plan(mode="full", memory_headroom=0).total
    plan = _debug_plan(need, seq_len=8192, batch_size=2)
    full = plan(mode="full", memory_headroom=0)
    assert not full.fits and full.advice.startswith(
        'would fit with: activation_checkpoint.mode = "auto" and training.batch_size = 1, '
        "training.seq_len = 4096"
    ), full.advice
    assert "does not fit even with full recomputation" in format_plan(full, "this CPU")
    # Where nothing smaller would fit, the advice does not pretend to name a fit.
    tiny = _debug_plan(GiB // 1024, seq_len=8192, batch_size=2)(mode="auto")
    assert tiny.advice == (
        "nothing smaller would fit (micro-batch 1, sequences down to 1,024 tokens, up to 4,096 "
        "ranks per replica): it needs a device with more memory"
    )


def test_an_evaluation_is_planned_without_gradients_or_optimizer_state():
    """Forward passes only: where training needs more memory than there is, evaluating
    the same model may fit, with no block checkpointed; and its advice never names the
    activation policy or a shorter sequence (what it measures)."""
    cfg = load_config(["--job.config_file=train_configs/debug_model.toml"])
    args = build_model_args("debugmodel", 256, cfg.training.seq_len)
    dims = ParallelDims.from_config(cfg, 1, "cpu")

    def plan(capacity: int, training: bool) -> MemoryPlan:
        return plan_memory(cfg, args, dims, capacity, torch.float32, training=training)

    evaluation = plan(GiB, training=False)
    assert list(evaluation.components) == [
        "parameters (fp32, sharded)",
        "FSDP buffers",
        "forward working set (largest)",
    ]
    assert evaluation.policies == ["none"] * args.n_layers
    between = int(evaluation.total / (1 - cfg.activation_checkpoint.memory_headroom)) + 1
    assert plan(between, training=False).fits and not plan(between, training=True).fits
    assert "forward only (evaluation)" in format_plan(evaluation, "this CPU")
    one = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, batch_size=1))
    need = plan_memory(one, args, dims, GiB, torch.float32, training=False).total
    refused = plan(int(need / (1 - cfg.activation_checkpoint.memory_headroom)) + 1, False)
    assert not refused.fits and refused.advice.startswith("would fit with: eval.batch_size = "), (
        refused.advice
    )
    assert "activation_checkpoint" not in refused.advice and "seq_len" not in refused.advice


def test_plan_for_takes_known_gpus_and_sizes_once():
    assert load_config(["--job.plan_for=h100-80gb,75gib"]).job.plan_for == ["h100-80gb", "75gib"]
    for wrong in ("h100-80gb,a100-40gb", "h200-141gb,H200-141GB", "0gib", "80gb"):
        with pytest.raises(ConfigError, match=r"^job.plan_for = .*: must be distinct GPU names"):
            load_config([f"--job.plan_for={wrong}"])


def test_auto_plan_that_cannot_fit_stops_with_one_line(tmp_path, synthetic_dir):
    result = run_train(
        [
            "--job.config_file=train_configs/debug_model.toml",
            f"--job.dump_folder={tmp_path}",
            f"--training.dataset_path={synthetic_dir}",
            "--activation_checkpoint.mode=auto",
            "--activation_checkpoint.memory_limit_gib=0.08",
        ],
        timeout=120,
    )
    err = assert_refused(result, "would fit with: training.batch_size = ")
    assert err.startswith("error: training.seq_len = 512 with batch_size 4 needs about")
