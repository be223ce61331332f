"""Llama-3.1 decoder in plain PyTorch, with Meta's parameter names.

The model knows nothing about distribution: FSDP2, activation checkpointing and compile
are applied from outside. It is meant to be built on the meta device, sharded, moved to
the real device with `to_empty` and then initialized with `init_weights`, which also
recomputes the (non-persistent) RoPE table.

`state_dict()` keys are Meta's checkpoint names (`tok_embeddings.weight`,
`layers.{i}.attention.wq.weight`, ...), so Meta checkpoints load as they are and
`titan/models/keymap.py` maps them to and from Hugging Face's names.

Generation passes a `KVCache` (preallocated keys and values per layer) and the position of
the first token to `Transformer.forward`; without one, the forward is the training one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from titan.models.attention import attention_fn


@dataclass
class ModelArgs:
    """The architecture (a flavor in `FLAVORS`) and the run-time choices the model needs."""

    dim: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    n_heads: int = 8
    """Query heads; head_dim = dim // n_heads."""
    n_kv_heads: int = 4
    """Key/value heads, shared by n_heads // n_kv_heads query heads each (GQA)."""
    multiple_of: int = 64
    ffn_dim_multiplier: float | None = None
    """With multiple_of, sets the SwiGLU width (`ffn_hidden_dim`)."""
    vocab_size: int = 256
    """Spike data needs 256: counts 0..254 and the separator 255."""
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = True
    """Llama-3.1 frequency scaling, with the four rope_* settings below."""
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    max_seq_len: int = 2048
    """Positions of the RoPE table (the training seq_len, or a generation's length)."""
    attn_impl: str = "sdpa"
    """Attention kernel, one of `attention.IMPLS` (a run resolves "auto" to one of them)."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


FLAVORS: dict[str, ModelArgs] = {
    "debugmodel": ModelArgs(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=4, multiple_of=64, ffn_dim_multiplier=None
    ),
    "1B": ModelArgs(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3
    ),
    "8B": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3
    ),
    "70B": ModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3
    ),
}


def build_model_args(
    flavor: str, vocab_size: int, seq_len: int, attn_impl: str = "sdpa"
) -> ModelArgs:
    """A copy of `FLAVORS[flavor]` for a given vocabulary, context length and kernel."""
    if flavor not in FLAVORS:
        raise ValueError(f"unknown model flavor {flavor!r}; flavors are: {', '.join(FLAVORS)}")
    return dataclasses.replace(
        FLAVORS[flavor], vocab_size=vocab_size, max_seq_len=seq_len, attn_impl=attn_impl
    )


# ----------------------------------------------------------------------------- RoPE


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in float32, with Llama-3.1 scaling if enabled.

    Wavelengths longer than original_context / low_freq_factor are divided by the scale
    factor, those shorter than original_context / high_freq_factor are kept, and the
    ones in between are interpolated smoothly (Meta's `apply_scaling`).
    """
    d = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    if not args.use_scaled_rope:
        return freqs
    factor, ctx = args.rope_scale_factor, args.rope_original_context
    low, high = args.rope_low_freq_factor, args.rope_high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (ctx / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > ctx / low, freqs / factor, interpolated)
    return torch.where(wavelen < ctx / high, freqs, scaled)


def rope_table(args: ModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """(max_seq_len, head_dim // 2, 2) float32 table of (cos, sin) of position * frequency."""
    freqs = rope_frequencies(args).to(device)
    positions = torch.arange(args.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, freqs)  # (seq, head_dim // 2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)  # (seq, head_dim // 2, 2)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (batch, seq, heads, head_dim), Meta's
    convention, in float32; `rope` is the (seq, head_dim // 2, 2) slice for these positions."""
    b, s, h, d = x.shape
    pairs = x.float().reshape(b, s, h, d // 2, 2)  # (batch, seq, heads, head_dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]  # (batch, seq, heads, head_dim // 2)
    cos = rope[:, None, :, 0]  # (seq, 1, head_dim // 2)
    sin = rope[:, None, :, 1]  # (seq, 1, head_dim // 2)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(3).type_as(x)  # (batch, seq, heads, head_dim)


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as Meta's and HF's Llama do."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE; the kernel comes from attention.py."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.attn = attention_fn(args.attn_impl)

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, slot: KVSlot | None = None
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)  # (batch, seq, heads, head_dim)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)  # (batch, seq, kv, head_dim)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)  # (batch, seq, kv, head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if slot is not None:  # generation: this layer's part of a KVCache
            return self.wo(_cached_attention(q, k, v, slot))
        out = self.attn(
            q.transpose(1, 2),  # (batch, heads, seq, head_dim)
            k.transpose(1, 2),  # (batch, kv_heads, seq, head_dim)
            v.transpose(1, 2),  # (batch, kv_heads, seq, head_dim)
        )  # (batch, heads, seq, head_dim)
        out = out.transpose(1, 2).reshape(b, s, -1)  # (batch, seq, heads * head_dim)
        return self.wo(out)


def _cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: KVSlot
) -> torch.Tensor:
    """Store k, v (batch, seq, kv_heads, head_dim) at positions slot.start.. of the cache
    and attend from q (batch, seq, heads, head_dim) to every cached position; returns
    (batch, seq, heads * head_dim)."""
    b, s, _, _ = q.shape
    start_pos = slot.start
    end = start_pos + s
    k_cache, v_cache = slot.k, slot.v  # (batch, kv_heads, max_len, head_dim) each
    k_cache[:, :, start_pos:end] = k.transpose(1, 2)  # (batch, kv_heads, seq, head_dim)
    v_cache[:, :, start_pos:end] = v.transpose(1, 2)  # (batch, kv_heads, seq, head_dim)
    # One new token sees every cached position. A chunk also sees itself causally (query i
    # sees keys 0 .. start_pos + i): from position 0 that is plain causal attention, which
    # needs no (seq, seq) mask, so a long prompt's prefill costs no quadratic memory.
    mask = None
    if s > 1 and start_pos > 0:
        mask = torch.ones(s, end, dtype=torch.bool, device=q.device).tril(diagonal=start_pos)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # (batch, heads, seq, head_dim)
        k_cache[:, :, :end],  # (batch, kv_heads, start_pos + seq, head_dim)
        v_cache[:, :, :end],  # (batch, kv_heads, start_pos + seq, head_dim)
        attn_mask=mask,
        is_causal=s > 1 and start_pos == 0,
        enable_gqa=True,
    )  # (batch, heads, seq, head_dim)
    return out.transpose(1, 2).reshape(b, s, -1)  # (batch, seq, heads * head_dim)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then h + feed_forward(norm(h))."""

    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, slot: KVSlot | None = None
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, slot)
        return h + self.feed_forward(self.ffn_norm(h))


@dataclass(frozen=True)
class KVSlot:
    """One layer's cached keys and values (batch, n_kv_heads, max_len, head_dim) each, and
    the position where this forward's tokens go."""

    k: torch.Tensor
    v: torch.Tensor
    start: int


class KVCache:
    """Keys and values of every layer for autoregressive generation (gpt-fast style),
    preallocated for `max_len` positions: `layers[i]` is layer i's (k, v), each
    (batch, n_kv_heads, max_len, head_dim). `Transformer.forward(tokens, cache, start_pos)`
    writes positions start_pos.. into it and attends over positions 0.. of it; without a
    cache the forward is the training one."""

    def __init__(
        self,
        args: ModelArgs,
        batch: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch, args.n_kv_heads, max_len, args.head_dim)
        self.max_len = max_len
        self.layers = [
            (
                torch.zeros(shape, device=device, dtype=dtype),
                torch.zeros(shape, device=device, dtype=dtype),
            )
            for _ in range(args.n_layers)
        ]

    def slot(self, layer: int, start: int) -> KVSlot:
        return KVSlot(*self.layers[layer], start)

    def first(self, n: int) -> KVCache:
        """A view of the first `n` sequences: what a forward writes there lands here."""
        view = object.__new__(KVCache)
        view.max_len = self.max_len
        view.layers = [(k[:n], v[:n]) for k, v in self.layers]
        return view

    def share_first(self, length: int) -> None:
        """Give every sequence the first one's keys and values at positions 0..length-1
        (a prompt they all continue)."""
        for k, v in self.layers:
            k[1:, :, :length] = k[:1, :, :length]
            v[1:, :, :length] = v[:1, :, :length]


# Wrapper modules (activation checkpointing, torch.compile, DDP) insert these name parts.
_WRAPPER_PARTS = re.compile(r"(^|\.)(_checkpoint_wrapped_module|_orig_mod|module)(?=\.)")


class Transformer(nn.Module):
    """Llama-3.1 decoder: tokens (batch, seq) int64 -> logits (batch, seq, vocab)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, args) for i in range(args.n_layers)}
        )
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Not saved in checkpoints: recomputed by init_rope (also after to_empty).
        self.register_buffer("rope_cache", rope_table(args), persistent=False)

    def forward(
        self, tokens: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0
    ) -> torch.Tensor:
        """Logits of `tokens` (batch, seq). With a `cache` (generation), the tokens are
        positions start_pos.. of sequences whose earlier positions the cache holds."""
        seq = tokens.shape[1]
        end = start_pos + seq
        if end > self.args.max_seq_len:
            raise ValueError(
                f"sequence of {end} tokens exceeds max_seq_len = {self.args.max_seq_len}"
            )
        if cache is not None and end > cache.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the cache's {cache.max_len}")
        rope = self.rope_cache[start_pos:end]  # (seq, head_dim // 2, 2)
        h = self.tok_embeddings(tokens)  # (batch, seq, dim)
        for i, layer in enumerate(self.layers.values()):
            h = layer(h, rope) if cache is None else layer(h, rope, cache.slot(i, start_pos))
        return self.output(self.norm(h))  # (batch, seq, vocab)

    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE table on `device` (default: where the buffer is now)."""
        device = self.rope_cache.device if device is None else device
        self.rope_cache = rope_table(self.args, device)

    def init_param(
        self, name: str, tensor: torch.Tensor, generator: torch.Generator | None
    ) -> None:
        """Fill one full, plain tensor for the parameter called `name`, in place.

        A pure function of (name, shape, generator state), so a sharded model can
        generate each full tensor from the same generator and keep its shard:
        - norm weights: 1;
        - tok_embeddings: normal, std 1;
        - wq, wk, wv, w1: normal, std 0.02, truncated at +-3 std;
        - wo, w2, w3: torchtitan's depth init, std 0.02 / sqrt(2 * (layer_id + 1)),
          truncated at +-3 std;
        - output: normal, std dim ** -0.5, truncated at +-3 std.
        Wrapper name parts (`_checkpoint_wrapped_module.`, `_orig_mod.`, `module.`) are
        ignored.
        """
        name = _WRAPPER_PARTS.sub("", name).lstrip(".")
        with torch.no_grad():
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
            elif name == "tok_embeddings.weight":
                nn.init.normal_(tensor, mean=0.0, std=1.0, generator=generator)
            elif name == "output.weight":
                _trunc_normal(tensor, self.args.dim**-0.5, generator)
            elif m := re.fullmatch(r"layers\.(\d+)\.\w+\.(w\w+)\.weight", name):
                layer_id, proj = int(m.group(1)), m.group(2)
                if proj in ("wo", "w2", "w3"):
                    std = 0.02 / math.sqrt(2 * (layer_id + 1))
                else:
                    std = 0.02
                _trunc_normal(tensor, std, generator)
            else:
                raise ValueError(f"init_param: no initialization rule for parameter {name!r}")

    def init_weights(self, seed: int | None = None) -> None:
        """Recompute RoPE, then initialize every parameter in `named_parameters()` order
        from one generator seeded once (`seed`, or torch.initial_seed() when None)."""
        device = self.tok_embeddings.weight.device
        if device.type == "meta":
            raise RuntimeError(
                "init_weights on a meta-device model: call to_empty(device=...) first"
            )
        self.init_rope(device)
        generator = torch.Generator(device=device)
        generator.manual_seed(torch.initial_seed() if seed is None else seed)
        for name, param in self.named_parameters():
            self.init_param(name, param.data, generator)


def _trunc_normal(tensor: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)


# ----------------------------------------------------------------------------- counting


def num_params(model: nn.Module, exclude_embedding: bool = False) -> int:
    """Parameters of a model (global sizes for sharded DTensor parameters)."""
    total = sum(p.numel() for p in model.parameters())
    if exclude_embedding:
        total -= model.tok_embeddings.weight.numel()
    return total


def param_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Our parameter name -> shape for Transformer(args), in model order (state-dict order)."""
    # The kernel does not change any shape, and "auto" or an absent flash-attn would refuse.
    return dict(_param_shapes(dataclasses.astuple(dataclasses.replace(args, attn_impl="sdpa"))))


@functools.lru_cache(maxsize=16)
def _param_shapes(fields: tuple) -> tuple[tuple[str, tuple[int, ...]], ...]:
    # Built on the meta device: shapes without memory, read from the model itself.
    with torch.device("meta"):
        model = Transformer(ModelArgs(*fields))
    return tuple((name, tuple(t.shape)) for name, t in model.state_dict().items())


def num_params_from_args(args: ModelArgs, exclude_embedding: bool = False) -> int:
    """The parameter count `Transformer(args)` has, without allocating it."""
    shapes = param_shapes(args)
    if exclude_embedding:
        del shapes["tok_embeddings.weight"]
    return sum(math.prod(shape) for shape in shapes.values())


def token_loss_sum(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed token cross-entropy of a micro-batch, in float32. No reference to the
    logits (batch, seq, vocab) outlives it, so the backward holds only the float32
    log-softmax and its gradients (12 bytes per logit), as the memory plan counts."""
    return F.cross_entropy(model(inputs).flatten(0, 1).float(), labels.flatten(), reduction="sum")


def flops_per_token(args: ModelArgs, seq_len: int, causal: bool = False) -> float:
    """Training FLOPs per token, torchtitan's convention (so MFU compares with its numbers):
    6 * N_non_embedding + 12 * layers * heads * head_dim * seq_len. With causal=True the
    attention term counts only the causal half (6 instead of 12)."""
    attention = (6 if causal else 12) * args.n_layers * args.n_heads * args.head_dim * seq_len
    return 6 * num_params_from_args(args, exclude_embedding=True) + attention
