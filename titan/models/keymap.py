"""The one map between our parameter names (Meta's Llama names) and Hugging Face's.

Used by both converter scripts and the tests. Besides renaming, the rows of wq and wk
are permuted per head: Meta's RoPE rotates interleaved pairs (x[2i], x[2i+1]) while HF
rotates halves (x[i], x[i + head_dim/2]). Also here: `config.json` (HF) and
`params.json` (Meta) to and from `ModelArgs`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch

from titan.models.llama import ModelArgs

# (our name pattern, HF name pattern); {i} is the layer index.
_LAYER_KEYS = [
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
]
_TOP_KEYS = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
]
_TOP_TO_HF = dict(_TOP_KEYS)
_TOP_FROM_HF = {hf: ours for ours, hf in _TOP_KEYS}
_LAYER_TO_HF = dict(_LAYER_KEYS)
_LAYER_FROM_HF = {hf: ours for ours, hf in _LAYER_KEYS}
_OUR_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def to_hf_key(name: str) -> str:
    """Our (Meta) parameter name -> HF name; KeyError for a name with no counterpart."""
    if name in _TOP_TO_HF:
        return _TOP_TO_HF[name]
    m = _OUR_LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_TO_HF:
        return f"model.layers.{m.group(1)}.{_LAYER_TO_HF[m.group(2)]}"
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def from_hf_key(name: str) -> str:
    """HF parameter name -> our (Meta) name; KeyError for a name with no counterpart."""
    if name in _TOP_FROM_HF:
        return _TOP_FROM_HF[name]
    m = _HF_LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_FROM_HF:
        return f"layers.{m.group(1)}.{_LAYER_FROM_HF[m.group(2)]}"
    raise KeyError(f"no Llama name for Hugging Face parameter {name!r}")


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of Meta's wq/wk (interleaved RoPE pairs) -> HF's order (rotate-half)."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return (
        w.view(n_heads, head_dim // 2, 2, cols)  # (heads, pairs, 2, in)
        .transpose(1, 2)  # (heads, 2, pairs, in)
        .reshape(rows, cols)
    )


def unpermute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_for_hf`: HF's wq/wk rows -> Meta's interleaved order."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return (
        w.view(n_heads, 2, head_dim // 2, cols)  # (heads, 2, pairs, in)
        .transpose(1, 2)  # (heads, pairs, 2, in)
        .reshape(rows, cols)
    )


def _rope_heads(name: str, args: ModelArgs) -> int | None:
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def to_hf_tensor(name: str, tensor: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """One of our tensors -> (HF name, HF tensor), permuting wq/wk rows."""
    heads = _rope_heads(name, args)
    return to_hf_key(name), tensor if heads is None else permute_for_hf(tensor, heads)


def from_hf_tensor(hf_name: str, tensor: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """One HF tensor -> (our name, our tensor), undoing the wq/wk row permutation."""
    name = from_hf_key(hf_name)
    heads = _rope_heads(name, args)
    return name, tensor if heads is None else unpermute_from_hf(tensor, heads)


def hf_state_dict_to_ours(
    sd: Mapping[str, torch.Tensor], args: ModelArgs
) -> dict[str, torch.Tensor]:
    """A whole HF state dict -> ours (rotary `inv_freq` buffers, if any, are skipped)."""
    out = dict(from_hf_tensor(k, v, args) for k, v in sd.items() if not k.endswith("inv_freq"))
    if "output.weight" not in out and "tok_embeddings.weight" in out:  # tied embeddings
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def ours_to_hf_state_dict(
    sd: Mapping[str, torch.Tensor], args: ModelArgs
) -> dict[str, torch.Tensor]:
    """A whole state dict of ours -> HF names and layout."""
    return dict(to_hf_tensor(k, v, args) for k, v in sd.items())


# ----------------------------------------------------------------------------- configs

_DEFAULT_ROPE = ModelArgs()  # Llama-3.1's RoPE scaling: the defaults of ModelArgs


def ffn_params_for_hidden(dim: int, hidden: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that give FFN width `hidden` for `dim` under the
    Llama formula; Meta's own choices first, then an exact fallback."""
    candidates: list[tuple[int, float | None]] = [
        (m, f)
        for m in (1024, 4096, 256, 512, 128, 64, 32, 2048, 8192)
        for f in (None, 1.3, 1.5, 1.0, 1.2, 1.4)
    ]
    base = int(2 * 4 * dim / 3)
    candidates += [(hidden, None), (1, (hidden + 0.5) / base)]
    for multiple_of, mult in candidates:
        args = ModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=mult)
        if args.ffn_hidden_dim == hidden:
            return multiple_of, mult
    raise ValueError(f"no (multiple_of, ffn_dim_multiplier) gives FFN width {hidden} at dim {dim}")


def _llama3_rope(args: ModelArgs) -> dict | None:
    if not args.use_scaled_rope:
        return None
    return {
        "rope_type": "llama3",
        "factor": args.rope_scale_factor,
        "low_freq_factor": args.rope_low_freq_factor,
        "high_freq_factor": args.rope_high_freq_factor,
        "original_max_position_embeddings": args.rope_original_context,
    }


def above_rope_original_context(args: ModelArgs) -> ModelArgs:
    """`args` with a context transformers accepts: it warns on every load of a config
    whose max_position_embeddings is not above scaled RoPE's original context (8192 for
    Llama-3.1), and a run's seq_len (256 for the debug recipe) often is not. Such a context
    becomes the one the scaling extends the original context to (factor x original)."""
    if args.use_scaled_rope and args.max_seq_len <= args.rope_original_context:
        extended = int(args.rope_scale_factor * args.rope_original_context)
        return dataclasses.replace(args, max_seq_len=extended)
    return args


TRAINED_SEQ_LEN_KEY = "titan_training_seq_len"
"""The `config.json` key of an export that names its run's training.seq_len (transformers
keeps unknown keys as config attributes), so that generation past it can be warned of."""


def hf_config_from_args(args: ModelArgs, dtype: str = "bfloat16") -> dict:
    """`config.json` for `LlamaForCausalLM`. Both RoPE spellings are written: `rope_theta` +
    `rope_scaling` (transformers < 5, the Hub's Llama-3.1 repos) and `rope_parameters`."""
    rope = _llama3_rope(args)
    llama3_vocab = args.vocab_size == 128256
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 128000 if llama3_vocab else None,
        "eos_token_id": 128001 if llama3_vocab else None,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope,
        "rope_parameters": {"rope_theta": args.rope_theta, **(rope or {"rope_type": "default"})},
        "torch_dtype": dtype,
    }


def _checked(args: ModelArgs, file: str) -> ModelArgs:
    """`args` if every field read from `file` has a usable type and value; else ValueError
    naming the first one that does not."""
    counts = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of")
    for field in (*counts, "max_seq_len", "rope_original_context"):
        value = getattr(args, field)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{file}: {field} is {value!r}; a positive integer is needed")
    reals = ("norm_eps", "rope_theta", "rope_scale_factor", "rope_low_freq_factor")
    for field in (*reals, "rope_high_freq_factor", "ffn_dim_multiplier"):
        value = getattr(args, field)
        if field == "ffn_dim_multiplier" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{file}: {field} is {value!r}; a positive number is needed")
    if not isinstance(args.use_scaled_rope, bool):
        value = args.use_scaled_rope
        raise ValueError(f"{file}: use_scaled_rope is {value!r}; true or false is needed")
    if args.dim % args.n_heads or args.n_heads % args.n_kv_heads:
        raise ValueError(
            f"{file}: {args.n_heads} heads ({args.n_kv_heads} kv) do not divide dim {args.dim} "
            "(or the kv heads do not divide the heads)"
        )
    if args.head_dim % 2:
        raise ValueError(
            f"{file}: the head dimension dim / heads = {args.dim} / {args.n_heads} = "
            f"{args.head_dim} is odd; RoPE rotates pairs of features and needs it even"
        )
    return args


def args_from_hf_config(cfg: Mapping) -> ModelArgs:
    """`ModelArgs` from an HF Llama `config.json` (old `rope_scaling` or new
    `rope_parameters` spelling). Raises ValueError for what our model cannot represent."""
    if cfg.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json has model_type {cfg.get('model_type')!r}, not 'llama'")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"config.json has {key} = {cfg[key]!r}; Llama-3 needs {ok!r}")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    for key, value in (("hidden_size", dim), ("num_attention_heads", n_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"config.json: {key} is {value!r}; a positive integer is needed")
    if cfg.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"config.json has head_dim {cfg['head_dim']} != hidden/heads")
    params = cfg.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"config.json: rope_parameters is {params!r}; a mapping is needed")
    if "rope_theta" not in params and "rope_type" not in params:
        params = {}  # per-layer-type dicts are not Llama's
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = params if params.get("rope_type") not in (None, "default") else None
    scaling = scaling or cfg.get("rope_scaling") or None
    if scaling is not None and not isinstance(scaling, Mapping):
        raise ValueError(f"config.json: rope_scaling is {scaling!r}; a mapping is needed")
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None  # transformers' spelling of no scaling
    multiple_of, mult = ffn_params_for_hidden(dim, cfg["intermediate_size"])
    args = ModelArgs(
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        vocab_size=cfg["vocab_size"],
        multiple_of=multiple_of,
        ffn_dim_multiplier=mult,
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=float(theta),
        use_scaled_rope=scaling is not None,
        max_seq_len=cfg.get("max_position_embeddings", 131072),
    )
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise ValueError(f"config.json has RoPE scaling {kind!r}; only 'llama3' is supported")
        args = dataclasses.replace(
            args,
            rope_scale_factor=float(scaling["factor"]),
            rope_low_freq_factor=float(scaling["low_freq_factor"]),
            rope_high_freq_factor=float(scaling["high_freq_factor"]),
            rope_original_context=int(scaling["original_max_position_embeddings"]),
        )
    return _checked(args, "config.json")


# Optional params.json keys for RoPE scaling (written only when not Llama-3.1's values).
_META_ROPE_KEYS = {
    "rope_scaling_factor": "rope_scale_factor",
    "rope_low_freq_factor": "rope_low_freq_factor",
    "rope_high_freq_factor": "rope_high_freq_factor",
    "rope_original_context": "rope_original_context",
}


def meta_params_from_args(args: ModelArgs) -> dict:
    """Meta's `params.json` for these args."""
    params = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "multiple_of": args.multiple_of,
        "ffn_dim_multiplier": args.ffn_dim_multiplier,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "use_scaled_rope": args.use_scaled_rope,
    }
    for key, field in _META_ROPE_KEYS.items():
        if args.use_scaled_rope and getattr(args, field) != getattr(_DEFAULT_ROPE, field):
            params[key] = getattr(args, field)
    return params


def args_from_meta_params(
    params: Mapping, vocab_size: int | None = None, max_seq_len: int = 131072
) -> ModelArgs:
    """`ModelArgs` from Meta's `params.json`; `vocab_size` overrides the file's (Llama 2
    files say -1), `max_seq_len` is used unless the file has one."""
    scaled = params.get("use_scaled_rope")
    args = ModelArgs(
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        vocab_size=vocab_size if vocab_size is not None else params["vocab_size"],
        multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        use_scaled_rope=False if scaled is None else scaled,  # null: absent; _checked
        max_seq_len=params.get("max_seq_len", max_seq_len),
    )
    extras = {f: params[k] for k, f in _META_ROPE_KEYS.items() if params.get(k) is not None}
    return _checked(dataclasses.replace(args, **extras), "params.json")
