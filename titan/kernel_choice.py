"""Which attention kernel a run uses.

An explicit `model.attn_impl` is checked (one line with the install command when it
cannot run). "auto" on CPU is SDPA. "auto" on CUDA is decided by measurement, because
the fastest kernel depends on the GPU, the library versions and the shapes: each
candidate (flash4, flash3, SDPA restricted to cuDNN, SDPA restricted to flash, flash2,
then plain SDPA for where none of those runs, e.g. float32) that imports is first checked
against a float32 reference on a small slice, then timed forward + backward at the run's
own shapes (micro-batch, seq_len, heads, head_dim, dtype: warm-up, then the median of a
few CUDA-event-timed runs). Rank 0 decides and broadcasts, so every rank runs the same
kernel. The choice and every candidate's time or reason for exclusion are logged and
shown in the start-up table. An explicit kernel on CUDA gets the same check on the small
slice before training, so one that cannot run (dtype, GPU generation, head size, library
version) stops the start with one line.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from titan.models.attention import AttentionFn, attention_fn, check_available, unavailable_reason

CUDA_CANDIDATES = ("flash4", "flash3", "sdpa_cudnn", "sdpa_flash", "flash2", "sdpa")
"""Candidates of "auto" on CUDA, in the order they are tried (ties go to the first); plain
SDPA is last, for runs none of the others can serve (float32: the others take 16-bit only)."""


@dataclass(frozen=True)
class AttnShape:
    """The shapes and dtype one attention call of the run has."""

    batch: int
    seq: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype


@dataclass(frozen=True)
class Trial:
    """One candidate's outcome: its median time, or why it was excluded."""

    impl: str
    ms: float | None = None
    excluded: str | None = None

    def describe(self) -> str:
        if self.ms is not None:
            return f"{self.impl} {self.ms:.2f} ms"
        return f"{self.impl}: {self.excluded}"


@dataclass(frozen=True)
class KernelChoice:
    impl: str
    requested: str
    trials: tuple[Trial, ...] = field(default=())
    note: str = ""

    def summary(self) -> str:
        """`flash4 (auto, fwd+bwd at 1 x 131,072: flash4 812.10 ms, sdpa_cudnn ...)`."""
        if self.requested != "auto":
            return f"{self.impl} (model.attn_impl = {self.requested})"
        detail = "; ".join(t.describe() for t in self.trials) or self.note
        return f"{self.impl} (auto: {detail})"


def _inputs(shape: AttnShape, device: torch.device, generator: torch.Generator):
    """q (batch, seq, heads, head_dim), k and v (batch, seq, kv_heads, head_dim), and dout
    (as q), contiguous: the layout the model holds them in. Like the model, pass them to a
    kernel as `.transpose(1, 2)` views (heads first), so each kernel is checked and timed
    with the copies it makes (or avoids) in training."""

    def rand(heads: int) -> torch.Tensor:
        size = (shape.batch, shape.seq, heads, shape.head_dim)
        x = torch.randn(size, generator=generator, device=device)
        return x.to(shape.dtype)

    return rand(shape.n_heads), rand(shape.n_kv_heads), rand(shape.n_kv_heads), rand(shape.n_heads)


def _heads_first(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.transpose(1, 2) for t in tensors]


def numerical_problem(fn: AttentionFn, shape: AttnShape, device: torch.device) -> str | None:
    """Compare output and gradients with float32 SDPA on a slice of up to 512 tokens;
    the problem in a few words, or None. Relative error bound: 2e-2 for 16-bit dtypes."""
    generator = torch.Generator(device=device).manual_seed(0)
    one = dataclasses.replace(shape, batch=1, seq=min(shape.seq, 512))
    q, k, v, dout = _inputs(one, device, generator)
    results = []
    for f, dtype in ((fn, shape.dtype), (_reference, torch.float32)):
        # new leaves for each pass (`.to` alone returns the tensor itself for its own dtype)
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = f(*_heads_first(*leaves))
        out.backward(*_heads_first(dout.to(dtype)))
        results.append([out.float(), *(t.grad.float() for t in leaves)])
    bound = 1e-4 if shape.dtype == torch.float32 else 2e-2
    for name, got, want in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        if not error <= bound:  # also catches NaN
            return f"{name} differs from float32 SDPA (relative error {error:.2g} > {bound:g})"
    return None


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def time_forward_backward(
    fn: AttentionFn, shape: AttnShape, device: torch.device, warmup: int = 1, iters: int = 3
) -> float:
    """Median milliseconds of forward + backward at `shape` (CUDA events on GPU)."""
    generator = torch.Generator(device=device).manual_seed(1)
    q, k, v, dout = _inputs(shape, device, generator)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    (dout,) = _heads_first(dout)
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*_heads_first(q, k, v)).backward(dout)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            begin = time.perf_counter()
            fn(*_heads_first(q, k, v)).backward(dout)
            ms = 1e3 * (time.perf_counter() - begin)
        q.grad = k.grad = v.grad = None
        if i >= warmup:
            times.append(ms)
    return statistics.median(times)


def _failed(e: Exception) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"failed ({type(e).__name__}: {first})"


def checked(fn: AttentionFn, shape: AttnShape, device: torch.device) -> str | None:
    """`numerical_problem`, or how the kernel failed to run at all (in a few words)."""
    try:
        return numerical_problem(fn, shape, device)
    except Exception as e:  # noqa: BLE001 - a kernel that cannot run here, for any reason
        return _failed(e)


def measure(
    candidates: dict[str, AttentionFn | str], shape: AttnShape, device: torch.device
) -> KernelChoice:
    """Check, then time, each candidate (a function, or the reason it cannot run); the
    fastest that passes wins. RuntimeError when none does."""
    trials = []
    for impl, fn in candidates.items():
        if isinstance(fn, str):
            trials.append(Trial(impl, excluded=fn))
            continue
        problem = checked(fn, shape, device)
        if problem is not None:
            trials.append(Trial(impl, excluded=problem))
            continue
        try:
            trials.append(Trial(impl, ms=time_forward_backward(fn, shape, device)))
        except Exception as e:  # noqa: BLE001 - any failure excludes the candidate
            trials.append(Trial(impl, excluded=_failed(e)))
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    timed = [t for t in trials if t.ms is not None]
    if not timed:
        raise RuntimeError("no attention kernel passed: " + "; ".join(t.describe() for t in trials))
    best = min(timed, key=lambda t: t.ms)
    return KernelChoice(best.impl, "auto", tuple(trials))


def decide_on_rank0(decide: Callable[[], KernelChoice]) -> KernelChoice:
    """Run `decide` on rank 0 only and hand its result to every rank (one broadcast)."""
    if not (dist.is_available() and dist.is_initialized()):
        return decide()
    holder: list = [None]
    if dist.get_rank() == 0:
        try:
            holder[0] = decide()
        except RuntimeError as e:
            holder[0] = str(e)
    dist.broadcast_object_list(holder, src=0)
    if isinstance(holder[0], str):
        raise RuntimeError(holder[0])
    return holder[0]


def choose_attention(
    requested: str, device: torch.device, shape: AttnShape, *, measure_auto: bool = True
) -> KernelChoice:
    """The kernel for `requested` (model.attn_impl) on `device`; ValueError (one line)
    when an explicit choice cannot run. With measure_auto=False (a dry run), "auto" on
    CUDA names the candidates instead of timing them and picks the first available."""
    device = torch.device(device)
    if requested != "auto":
        check_available(requested, device)
        if device.type == "cuda" and measure_auto:  # (a dry run imports, runs nothing)
            problem = checked(attention_fn(requested), shape, device)
            if problem is not None:
                raise ValueError(
                    f"{requested} cannot run here at the run's dtype and head size: {problem}; "
                    "use 'auto' to pick one that can"
                )
        return KernelChoice(requested, requested)
    if device.type != "cuda":
        return KernelChoice("sdpa", "auto", note=f"SDPA on {device.type}, no timing")
    candidates: dict[str, AttentionFn | str] = {}
    for impl in CUDA_CANDIDATES:
        reason = unavailable_reason(impl, device)
        candidates[impl] = reason if reason is not None else attention_fn(impl)
    if not measure_auto:
        usable = [i for i, fn in candidates.items() if not isinstance(fn, str)]
        return KernelChoice(
            usable[0], "auto", note="measured at start-up among " + ", ".join(usable)
        )
    return decide_on_rank0(lambda: measure(candidates, shape, device))
