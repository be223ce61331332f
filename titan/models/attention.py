"""Causal grouped-query attention kernels behind one interface the model calls.

`attention_fn(impl)` returns `fn(q, k, v) -> out` with q (batch, n_heads, seq, head_dim),
k and v (batch, n_kv_heads, seq, head_dim) and out (batch, n_heads, seq, head_dim). GQA
is native everywhere: K/V heads are never repeated.

- "sdpa": `torch.nn.functional.scaled_dot_product_attention`, backend chosen by torch
  (always available, CPU too); "sdpa_cudnn" / "sdpa_flash": SDPA restricted to its cuDNN
  or FlashAttention-2 backend.
- "flash4": FlashAttention-4 (`flash_attn.cute`, `pip install 'flash-attn-4>=4.0.0b10'`);
  "flash3": FlashAttention-3 (`flash_attn_interface`, built from source on Hopper);
  "flash2": FlashAttention-2 (`flash_attn` >= 2.7, `pip install flash-attn`).

The FlashAttention kernels run inside one torch custom op, `titan::flash_attention`
(with `titan::flash_attention_backward`), whose outputs are the attention output and the
softmax log-sum-exp. So `torch.compile` keeps a block in one graph (a custom op is opaque
to it, and a Python call into the libraries would break the graph), and selective
activation checkpointing can keep the op's outputs like any aten op's. The libraries are
imported only when asked for, so CPU runs never touch them. Choosing among the kernels
("auto") is `titan.kernel_choice`'s job.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

IMPLS = ("sdpa", "sdpa_cudnn", "sdpa_flash", "flash4", "flash3", "flash2")
"""Kernels a run can use (model.attn_impl also takes "auto")."""
FLASH_MODULES = {
    "flash4": "flash_attn.cute",
    "flash3": "flash_attn_interface",
    "flash2": "flash_attn",
}
# FlashAttention-4 is published as pre-releases (its one final release, 0.0.1, is yanked,
# which keeps pip from falling back to them): a bare `pip install flash-attn-4` finds no
# matching distribution, a pre-release bound lets pip take one. 4.0.0b10 is the first with
# the `cu13` extra (its CUTLASS DSL libraries for CUDA 13), which a CUDA 13 torch wants.
_CU13 = (torch.version.cuda or "").startswith("13.")
INSTALL = {
    "flash4": f"pip install 'flash-attn-4{'[cu13]' * _CU13}>=4.0.0b10' "
    f"(or pip install -e '.[hopper{'-cu13' * _CU13}]')",
    "flash3": "build FlashAttention-3 from source: git clone https://github.com/Dao-AILab/"
    "flash-attention && cd flash-attention/hopper && python setup.py install",
    "flash2": "pip install 'flash-attn>=2.7' --no-build-isolation",
}
_SDPA_BACKENDS = {
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
}

# The aten ops SDPA runs its kernels as; activation checkpointing policies keep their outputs.
SDPA_OPS = (
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
)


# ----------------------------------------------------------------------------- SDPA


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _sdpa_restricted(backend: SDPBackend) -> AttentionFn:
    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return _sdpa(q, k, v)

    return fn


# ----------------------------------------------------------------------------- FlashAttention


@dataclass(frozen=True)
class FlashKernel:
    """A FlashAttention library's forward and backward on (batch, seq, heads, head_dim):
    forward(q, k, v, scale) -> (out, lse (batch, heads, seq) float32) and
    backward(dout, q, k, v, out, lse, scale) -> (dq, dk, dv), causal."""

    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


_KERNELS: dict[str, FlashKernel] = {}


def register_flash_kernel(name: str, kernel: FlashKernel) -> None:
    """Make `kernel` callable through the custom op as `name` (done on first use for the
    libraries; tests register a plain-PyTorch kernel to exercise the op on CPU)."""
    _KERNELS[name] = kernel


def _require_call(fn: Callable, positional: int, keywords: set[str]) -> None:
    """ImportError when the library function `fn` cannot take the call made below with
    `positional` arguments and `keywords` (an internal function of another version)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no Python signature to check: the call will tell
        return
    try:
        signature.bind(*range(positional), **dict.fromkeys(keywords))
    except TypeError as e:
        raise ImportError(
            f"its {fn.__name__} takes other arguments ({e}): a version titan cannot call"
        ) from None


def _flash4() -> FlashKernel:
    m = importlib.import_module("flash_attn.cute.interface")
    _require_call(m._flash_attn_fwd, 3, {"softmax_scale", "causal", "return_lse"})
    _require_call(m._flash_attn_bwd, 6, {"softmax_scale", "causal"})

    def forward(q, k, v, scale):
        result = m._flash_attn_fwd(q, k, v, softmax_scale=scale, causal=True, return_lse=True)
        return result[0], result[1]  # later versions also return two optional tensors

    def backward(dout, q, k, v, out, lse, scale):
        dq, dk, dv, *_ = m._flash_attn_bwd(
            q, k, v, out, dout, lse, softmax_scale=scale, causal=True
        )
        return dq, dk, dv

    return FlashKernel(forward, backward)


def _flash3() -> FlashKernel:
    m = importlib.import_module("flash_attn_interface")
    params = inspect.signature(m._flash_attn_backward).parameters
    causal = "is_causal" if "is_causal" in params else "causal"  # renamed between versions
    # builds before 2025-08 take k_new, ... positionally (and older ones return other tuples)
    _require_call(m._flash_attn_forward, 3, {"softmax_scale", "causal"})
    _require_call(m._flash_attn_backward, 6, {"dq", "dk", "dv", "softmax_scale", causal})

    def forward(q, k, v, scale):
        result = m._flash_attn_forward(q, k, v, softmax_scale=scale, causal=True)
        return result[0], result[1]

    def backward(dout, q, k, v, out, lse, scale):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        m._flash_attn_backward(
            dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv, softmax_scale=scale, **{causal: True}
        )
        return dq, dk, dv

    return FlashKernel(forward, backward)


def _flash2() -> FlashKernel:
    m = importlib.import_module("flash_attn.flash_attn_interface")
    if not hasattr(torch.ops.flash_attn, "_flash_attn_forward"):
        raise ImportError("flash-attn >= 2.7 is needed (its kernels as torch custom ops)")

    def forward(q, k, v, scale):
        out, lse, _, _ = m._flash_attn_forward(q, k, v, 0.0, scale, True, -1, -1, 0.0, None, False)
        return out, lse

    def backward(dout, q, k, v, out, lse, scale):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        m._flash_attn_backward(
            dout, q, k, v, out, lse, dq, dk, dv, 0.0, scale, True, -1, -1, 0.0, None, False, None
        )
        return dq, dk, dv

    return FlashKernel(forward, backward)


_LOADERS = {"flash4": _flash4, "flash3": _flash3, "flash2": _flash2}


def load_flash_kernel(impl: str) -> None:
    """Import a FlashAttention library and register its kernel (ImportError if absent)."""
    if impl not in _KERNELS:
        register_flash_kernel(impl, _LOADERS[impl]())  # ImportError: not installed


@torch.library.custom_op("titan::flash_attention", mutates_args=())
def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention on (batch, seq, heads, head_dim) -> (out, lse (batch, heads, seq)),
    both contiguous (the fake below promises compile that layout)."""
    out, lse = _KERNELS[impl].forward(q, k, v, scale)
    return out.contiguous(), lse.contiguous()


@flash_attention.register_fake
def _(q, k, v, impl, scale):
    b, s, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, s), dtype=torch.float32)


@torch.library.custom_op("titan::flash_attention_backward", mutates_args=())
def flash_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    impl: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _KERNELS[impl].backward(dout.contiguous(), q, k, v, out, lse, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@flash_attention_backward.register_fake
def _(dout, q, k, v, out, lse, impl, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, impl, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.impl, ctx.scale = impl, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = flash_attention_backward(dout, q, k, v, out, lse, ctx.impl, ctx.scale)
    return dq, dk, dv, None, None


flash_attention.register_autograd(_backward, setup_context=_setup_context)


def _flash(impl: str) -> AttentionFn:
    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, _ = flash_attention(
            q.transpose(1, 2),  # (batch, seq, heads, head_dim)
            k.transpose(1, 2),  # (batch, seq, kv_heads, head_dim)
            v.transpose(1, 2),  # (batch, seq, kv_heads, head_dim)
            impl,
            q.shape[-1] ** -0.5,
        )
        return out.transpose(1, 2)  # (batch, heads, seq, head_dim)

    return fn


# ----------------------------------------------------------------------------- choice


def attention_fn(impl: str) -> AttentionFn:
    """The causal GQA attention function of a resolved kernel name (module docstring)."""
    if impl == "sdpa":
        return _sdpa
    if impl in _SDPA_BACKENDS:
        return _sdpa_restricted(_SDPA_BACKENDS[impl])
    if impl in _LOADERS or impl in _KERNELS:
        load_flash_kernel(impl)
        return _flash(impl)
    raise ValueError(
        f"attention impl {impl!r} is not one of {', '.join(IMPLS)} "
        "(resolve 'auto' with titan.kernel_choice first)"
    )


def unavailable_reason(impl: str, device: torch.device) -> str | None:
    """Why `impl` cannot run on `device`, in a few words (None when it can)."""
    if impl == "sdpa":
        return None
    if impl in _LOADERS:
        try:
            load_flash_kernel(impl)
        except ImportError as e:
            return f"cannot import {FLASH_MODULES[impl]!r} ({e}); install it: {INSTALL[impl]}"
    if torch.device(device).type != "cuda":
        return f"needs a CUDA device, not {torch.device(device).type}"
    return None


def check_available(impl: str, device: torch.device) -> None:
    """ValueError (one line, with the fix) when an explicitly chosen kernel cannot run."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of auto, {', '.join(IMPLS)}")
    reason = unavailable_reason(impl, device)
    if reason is not None:
        raise ValueError(f"{impl} {reason}; or use 'sdpa' / 'auto'")
