"""Causal attention kernels behind one interface the model calls.

`attention_fn(impl)` returns `fn(q, k, v) -> out` with q (batch, n_heads, seq, head_dim),
k and v (batch, n_kv_heads, seq, head_dim) and out (batch, n_heads, seq, head_dim):

- "sdpa": `torch.nn.functional.scaled_dot_product_attention` (always available, CPU too);
- "flash3": FlashAttention-3 (`flash_attn_interface`, built from source on Hopper);
- "flash2": FlashAttention-2 (`flash_attn`, `pip install flash-attn`).

The FlashAttention modules are imported only when asked for, so CPU runs never touch
them. `resolve_attn_impl("auto", device)` picks the best kernel available.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_MODULES = {"flash3": "flash_attn_interface", "flash2": "flash_attn"}
_INSTALL = {
    "flash3": "build FlashAttention-3 from source: git clone https://github.com/Dao-AILab/"
    "flash-attention && cd flash-attention/hopper && python setup.py install",
    "flash2": "pip install flash-attn --no-build-isolation",
}
IMPLS = ("sdpa", "flash3", "flash2")


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # GQA without materializing repeated K/V heads.
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _flash(module_name: str) -> AttentionFn:
    flash_attn_func = importlib.import_module(module_name).flash_attn_func

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = flash_attn_func(
            q.transpose(1, 2),  # (batch, seq, heads, head_dim)
            k.transpose(1, 2),  # (batch, seq, kv_heads, head_dim)
            v.transpose(1, 2),  # (batch, seq, kv_heads, head_dim)
            causal=True,
        )
        if isinstance(out, tuple):  # some FA3 builds also return the softmax LSE
            out = out[0]
        return out.transpose(1, 2)  # (batch, heads, seq, head_dim)

    return fn


def attention_fn(impl: str) -> AttentionFn:
    """The causal GQA attention function for a resolved kernel name (see module docstring)."""
    if impl == "sdpa":
        return _sdpa
    if impl in _MODULES:
        _check_importable(impl)
        return _flash(_MODULES[impl])
    raise ValueError(
        f"attention impl {impl!r} is not one of {', '.join(IMPLS)} "
        "(resolve 'auto' with resolve_attn_impl first)"
    )


def _importable(impl: str) -> bool:
    try:
        importlib.import_module(_MODULES[impl])
    except ImportError:
        return False
    return True


def _check_importable(impl: str) -> None:
    if not _importable(impl):
        raise ValueError(
            f"attention impl {impl!r} needs the {_MODULES[impl]!r} module, which is not "
            f"installed; {_INSTALL[impl]} (or use 'sdpa')"
        )


def resolve_attn_impl(requested: str, device: torch.device) -> str:
    """'auto' -> 'flash3' if on CUDA and importable, else 'flash2' likewise, else 'sdpa'.
    An explicit FlashAttention request raises ValueError if it cannot run here."""
    device = torch.device(device)
    if requested == "auto":
        if device.type == "cuda":
            for impl in ("flash3", "flash2"):
                if _importable(impl):
                    return impl
        return "sdpa"
    if requested == "sdpa":
        return "sdpa"
    if requested not in _MODULES:
        raise ValueError(f"attention impl {requested!r} is not one of auto, {', '.join(IMPLS)}")
    if device.type != "cuda":
        raise ValueError(
            f"attention impl {requested!r} needs a CUDA device, got {device}; use 'sdpa' or 'auto'"
        )
    _check_importable(requested)
    return requested
