"""Attention kernels and how a run chooses one.

- On CPU, "auto" is SDPA; an explicit FlashAttention choice that cannot run stops with one
  line naming the install command (also through train.py), and so does a FlashAttention-3
  build whose internal functions take other arguments than titan's calls.
- The FlashAttention custom op (`titan::flash_attention` and its backward) with a
  plain-PyTorch kernel registered in it gives SDPA's output and gradients, and a compiled
  function calling it is one graph (opt-in compile test).
- "auto" by measurement, with fake candidates: the fastest wins; a candidate that fails
  the float32 check or raises is excluded with its reason in the log line; on two ranks,
  rank 0 decides and both run the same kernel.
- The float32 check compares the output and each gradient, in float32 and bfloat16 runs
  (a kernel with a wrong dq is caught in both), and the check and the timing hand kernels
  the layout the model does: heads-first views of (batch, seq, heads, head_dim) tensors.
- On a GPU (skipped elsewhere): every available kernel matches SDPA.
"""

from __future__ import annotations

import re
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_train
from dist_utils import run_ranks
from packaging.requirements import Requirement

from titan.config.loading import tomllib
from titan.kernel_choice import (
    AttnShape,
    choose_attention,
    decide_on_rank0,
    measure,
    numerical_problem,
    time_forward_backward,
)
from titan.models.attention import (
    IMPLS,
    INSTALL,
    FlashKernel,
    attention_fn,
    flash_attention,
    register_flash_kernel,
    unavailable_reason,
)

CPU = torch.device("cpu")


def _qkv(seq: int = 24, generator_seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(generator_seed)
    q = torch.randn(2, 4, seq, 16, generator=g, dtype=dtype)  # (batch, heads, seq, head_dim)
    k = torch.randn(2, 2, seq, 16, generator=g, dtype=dtype)  # (batch, kv_heads, seq, head_dim)
    v = torch.randn(2, 2, seq, 16, generator=g, dtype=dtype)
    return q, k, v


def _sdpa_reference(q, k, v):
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    )


def test_auto_is_sdpa_on_cpu_and_explicit_flash_needs_its_module():
    shape = AttnShape(1, 64, 4, 2, 16, torch.float32)
    choice = choose_attention("auto", CPU, shape)
    assert choice.impl == "sdpa" and "SDPA on cpu" in choice.summary()
    assert choose_attention("sdpa", CPU, shape).impl == "sdpa"
    for impl in ("flash4", "flash3", "flash2"):
        with pytest.raises(ValueError) as e:
            choose_attention(impl, CPU, shape)
        assert "pip install" in str(e.value) or "setup.py install" in str(e.value)
        assert "\n" not in str(e.value)
    for impl in ("sdpa_cudnn", "sdpa_flash"):
        assert "needs a CUDA device" in unavailable_reason(impl, CPU)
    with pytest.raises(ValueError, match="not one of"):
        choose_attention("flex", CPU, shape)
    with pytest.raises(ValueError, match="resolve 'auto'"):
        attention_fn("auto")
    q, k, v = _qkv()
    assert torch.allclose(attention_fn("sdpa")(q, k, v), _sdpa_reference(q, k, v), atol=1e-6)


def _old_forward(q, k, v, k_new, v_new, out, softmax_scale=None, causal=False):
    raise AssertionError("never called")


def _new_forward(q, k, v, k_new=None, v_new=None, softmax_scale=None, causal=False):
    raise AssertionError("never called")


def _backward(dout, q, k, v, out, lse, dq=None, dk=None, dv=None, softmax_scale=None,
              is_causal=False):  # fmt: skip
    raise AssertionError("never called")


def test_a_flash3_build_with_other_internal_arguments_is_refused(monkeypatch):
    import types

    from titan.models import attention

    monkeypatch.setattr(attention, "_KERNELS", {})  # loaded kernels stay this test's
    for forward, problem in ((_old_forward, "takes other arguments"), (_new_forward, None)):
        module = types.ModuleType("flash_attn_interface")
        module._flash_attn_forward, module._flash_attn_backward = forward, _backward
        monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
        reason = unavailable_reason("flash3", CPU)
        if problem is None:
            assert reason == "needs a CUDA device, not cpu"  # imported and accepted
        else:
            assert problem in reason and "missing a required argument: 'k_new'" in reason
            assert "\n" not in reason


def test_train_py_names_the_install_command(tmp_path):
    result = run_train(
        [
            "--job.config_file=train_configs/debug_model.toml",
            f"--job.dump_folder={tmp_path}",
            "--model.attn_impl=flash4",
            "--job.dry_run",
        ],
        timeout=120,
    )
    assert result.returncode == 2
    err = result.stderr.strip()
    assert err.startswith("error: model.attn_impl = 'flash4': flash4 cannot import")
    assert INSTALL["flash4"] in err and "\n" not in err


def test_flash4_install_commands_let_pip_take_a_prerelease():
    """FlashAttention-4 is published as pre-releases only: for a requirement without a
    pre-release bound pip finds "no matching distribution"."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    hint = re.search(r"pip install '([^']+)'", INSTALL["flash4"]).group(1)
    for text in (*extras["hopper"], *extras["hopper-cu13"], hint):
        requirement = Requirement(text)
        assert requirement.name == "flash-attn-4", text
        assert requirement.specifier.contains("4.0.0b36"), text  # the newest when written
    assert Requirement(extras["hopper-cu13"][0]).extras == {"cu13"}


# ----------------------------------------------------------------------------- custom op


def _reference_kernel() -> FlashKernel:
    """FlashAttention's contract in plain PyTorch, on (batch, seq, heads, head_dim)."""

    def scores(q, k, scale):
        groups = q.shape[2] // k.shape[2]
        kk = k.repeat_interleave(groups, 2)
        s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kk.float()) * scale  # (b, h, q, k)
        causal = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
        return s.masked_fill(~causal, float("-inf")), groups

    def forward(q, k, v, scale):
        s, groups = scores(q, k, scale)
        lse = s.logsumexp(-1)  # (batch, heads, seq)
        p = (s - lse[..., None]).exp()
        out = torch.einsum("bhqk,bkhd->bqhd", p, v.repeat_interleave(groups, 2).float())
        return out.to(q.dtype), lse

    def backward(dout, q, k, v, out, lse, scale):
        s, groups = scores(q, k, scale)
        p = (s - lse[..., None]).exp()  # (batch, heads, q, k)
        vv = v.repeat_interleave(groups, 2).float()
        dv = torch.einsum("bhqk,bqhd->bkhd", p, dout.float())
        dp = torch.einsum("bqhd,bkhd->bhqk", dout.float(), vv)
        delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)  # (batch, heads, seq)
        ds = p * (dp - delta[..., None]) * scale
        dq = torch.einsum("bhqk,bkhd->bqhd", ds, k.repeat_interleave(groups, 2).float())
        dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.float())

        def fold(g):  # sum the query heads that share a KV head
            b, n, h, d = g.shape
            return g.view(b, n, h // groups, groups, d).sum(3)

        return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)

    return FlashKernel(forward, backward)


register_flash_kernel("reference", _reference_kernel())


def test_flash_custom_op_matches_sdpa():
    q, k, v = _qkv()
    results = []
    for fn in (attention_fn("reference"), _sdpa_reference):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(torch.ones_like(out) * torch.linspace(-1, 1, out.shape[-1]))
        results.append([out, *(t.grad for t in leaves)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    out, lse = flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               "reference", 16**-0.5)  # fmt: skip
    assert out.shape == (2, 24, 4, 16) and lse.shape == (2, 4, 24) and lse.dtype == torch.float32


@pytest.mark.compile
def test_compiled_flash_op_is_one_graph():
    fn = torch.compile(attention_fn("reference"), fullgraph=True)  # a graph break raises
    q, k, v = (t.requires_grad_() for t in _qkv())
    out = fn(q, k, v)
    out.sum().backward()
    torch.testing.assert_close(out, _sdpa_reference(q, k, v), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- auto


def _slow(seconds: float):
    def fn(q, k, v):
        time.sleep(seconds)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return fn


def _wrong(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=True)


def _broken(q, k, v):
    raise RuntimeError("no kernel image is available for execution on the device")


SHAPE = AttnShape(1, 128, 4, 2, 16, torch.float32)


def test_auto_picks_the_fastest_that_passes():
    candidates = {
        "slow": _slow(0.02),
        "wrong": _wrong,
        "broken": _broken,
        "absent": "cannot import 'x'; install it",
        "fast": _slow(0.0),
    }
    choice = measure(candidates, SHAPE, CPU)
    assert choice.impl == "fast"
    by_name = {t.impl: t for t in choice.trials}
    assert by_name["slow"].ms > by_name["fast"].ms
    assert "differs from float32 SDPA" in by_name["wrong"].excluded
    assert "RuntimeError: no kernel image" in by_name["broken"].excluded
    summary = choice.summary()
    assert summary.startswith("fast (auto: slow ") and "wrong: out differs" in summary
    assert "absent: cannot import" in summary
    with pytest.raises(RuntimeError, match="no attention kernel passed"):
        measure({"wrong": _wrong, "broken": _broken}, SHAPE, CPU)


class _DoubledGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def _wrong_dq(q, k, v):
    return F.scaled_dot_product_attention(
        _DoubledGradient.apply(q), k, v, is_causal=True, enable_gqa=True
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_check_compares_output_and_each_gradient_with_float32(dtype):
    shape = AttnShape(1, 128, 4, 2, 16, dtype)
    assert numerical_problem(attention_fn("sdpa"), shape, CPU) is None
    assert numerical_problem(_wrong_dq, shape, CPU).startswith("dq differs from float32 SDPA")
    assert measure({"wrong_dq": _wrong_dq, "sdpa": attention_fn("sdpa")}, shape, CPU).impl == "sdpa"


def test_kernels_are_checked_and_timed_in_the_models_layout():
    b, s, h, kv, d = 1, 32, 4, 2, 16
    seen = []

    def recording(q, k, v):
        seen.append([t.stride() for t in (q, k, v)])
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    shape = AttnShape(b, s, h, kv, d, torch.float32)
    assert numerical_problem(recording, shape, CPU) is None
    time_forward_backward(recording, shape, CPU, warmup=0, iters=1)
    model_layout = [  # what the model passes: transposed views of (batch, seq, heads, dim)
        torch.empty(b, s, n, d).transpose(1, 2).stride() for n in (h, kv, kv)
    ]
    assert seen == [model_layout, model_layout]


def _decide_per_rank() -> str:
    """Each rank would pick differently on its own; rank 0's choice must reach both."""
    import torch.distributed as dist

    slow_on_this_rank = "a" if dist.get_rank() == 0 else "b"
    candidates = {name: _slow(0.03 if name == slow_on_this_rank else 0.0) for name in "ab"}
    return decide_on_rank0(lambda: measure(candidates, SHAPE, CPU)).impl


def test_all_ranks_run_rank_0s_choice():
    assert run_ranks(_decide_per_rank, 2) == ["b", "b"]


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "sdpa"])
def test_kernel_matches_sdpa_on_gpu(impl):
    cuda = torch.device("cuda")
    reason = unavailable_reason(impl, cuda)
    if reason is not None:
        pytest.skip(reason)
    from titan.kernel_choice import numerical_problem

    shape = AttnShape(2, 1024, 32, 8, 128, torch.bfloat16)
    assert numerical_problem(attention_fn(impl), shape, cuda) is None
