"""Model tests: flavor FFN widths; logits equal to `transformers.LlamaForCausalLM` (GQA,
Llama-3.1 RoPE scaling, positions past the original context) through the shared key map,
both directions; config.json / params.json round trips; meta-device build + `to_empty`
+ `init_weights` equal to a plain CPU build (RoPE buffer included); seeded init is
deterministic; FLOP and parameter counts; attention kernel resolution on CPU."""

import dataclasses
import re

import pytest
import torch
from conftest import tiny_hf_config

from titan.models import keymap
from titan.models.llama import (
    FLAVORS,
    ModelArgs,
    Transformer,
    build_model_args,
    flops_per_token,
    num_params,
    num_params_from_args,
    param_shapes,
    rope_frequencies,
)

transformers = pytest.importorskip("transformers")

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=128)


def test_flavor_ffn_hidden_sizes():
    assert FLAVORS["1B"].ffn_hidden_dim == 7168
    assert FLAVORS["8B"].ffn_hidden_dim == 14336
    assert FLAVORS["70B"].ffn_hidden_dim == 28672
    debug = FLAVORS["debugmodel"]
    assert debug.n_kv_heads < debug.n_heads  # exercises GQA
    args = build_model_args("8B", vocab_size=256, seq_len=131072)
    assert (args.vocab_size, args.max_seq_len, args.dim) == (256, 131072, 4096)
    assert FLAVORS["8B"].vocab_size == 256  # the flavor table itself is not modified
    with pytest.raises(ValueError, match="flavors are"):
        build_model_args("9B", 256, 128)


def _tiny_hf_model(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_hf_config()).float().eval()


def test_logits_match_transformers_both_directions():
    hf = _tiny_hf_model()
    args = keymap.args_from_hf_config(hf.config.to_dict())
    assert (args.n_heads, args.n_kv_heads, args.ffn_hidden_dim) == (4, 2, 192)
    assert args.rope_original_context == 16 and args.max_seq_len == 128
    model = Transformer(args).eval()
    model.load_state_dict(keymap.hf_state_dict_to_ours(hf.state_dict(), args), strict=True)

    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        ours = model(tokens)
    assert (ours - expected).abs().max() < 1e-4

    # The comparison is sensitive: forgetting the q/k permutation breaks it.
    unpermuted = {keymap.from_hf_key(k): v for k, v in hf.state_dict().items()}
    wrong = Transformer(args).eval()
    wrong.load_state_dict(unpermuted, strict=True)
    with torch.no_grad():
        assert (wrong(tokens) - expected).abs().max() > 1e-3

    # Reverse: ours -> HF names and layout, loaded into a fresh LlamaForCausalLM.
    back = keymap.ours_to_hf_state_dict(model.state_dict(), args)
    assert set(back) == set(hf.state_dict())
    for name, tensor in back.items():
        assert torch.equal(tensor, hf.state_dict()[name]), name
    hf2 = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**keymap.hf_config_from_args(args, "float32"))
    ).eval()
    hf2.load_state_dict(back, strict=True)
    with torch.no_grad():
        assert (hf2(tokens).logits - expected).abs().max() < 1e-4


def test_forward_shorter_sequence_uses_table_prefix():
    model = Transformer(TINY).eval()
    model.init_weights(seed=0)
    tokens = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        full = model(tokens)
        prefix = model(tokens[:, :10])
    assert prefix.shape == (1, 10, 256)
    assert torch.allclose(full[:, :10], prefix, atol=1e-5)  # causal
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_key_map_round_trip_and_unknown_keys():
    for name in param_shapes(dataclasses.replace(TINY, n_layers=3)):
        assert keymap.from_hf_key(keymap.to_hf_key(name)) == name
    assert (
        keymap.to_hf_key("layers.2.feed_forward.w3.weight") == "model.layers.2.mlp.up_proj.weight"
    )
    w = torch.randn(4 * 16, 64)
    assert torch.equal(keymap.unpermute_from_hf(keymap.permute_for_hf(w, 4), 4), w)
    for bad in ("ffn_norm.weight", "layers.0.attention.wz.weight", "rope_cache"):
        with pytest.raises(KeyError):
            keymap.to_hf_key(bad)
    with pytest.raises(KeyError):
        keymap.from_hf_key("model.layers.0.self_attn.rotary_emb.inv_freq")


def test_hf_config_spellings_and_meta_params_round_trip():
    old_style = {  # as in the Hub's meta-llama/Llama-3.1-8B config.json
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "hidden_act": "silu",
    }
    args = keymap.args_from_hf_config(old_style)
    expected = build_model_args("8B", vocab_size=128256, seq_len=131072)
    assert args == expected
    new_style = keymap.hf_config_from_args(args)
    del new_style["rope_scaling"], new_style["rope_theta"]
    assert keymap.args_from_hf_config(new_style) == expected
    no_scaling = dict(old_style, rope_scaling=None)
    assert not keymap.args_from_hf_config(no_scaling).use_scaled_rope
    for spelled in ({"rope_type": "default"}, {"type": "default"}):  # transformers' "none"
        unscaled = dict(old_style, rope_scaling=spelled)
        assert keymap.args_from_hf_config(unscaled) == keymap.args_from_hf_config(no_scaling)
    with pytest.raises(ValueError, match="yarn"):
        keymap.args_from_hf_config(dict(old_style, rope_scaling={"rope_type": "yarn"}))

    params = keymap.meta_params_from_args(expected)
    assert set(params) == {
        "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
        "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope",
    }  # fmt: skip
    assert keymap.args_from_meta_params(params, max_seq_len=131072) == expected
    odd = dataclasses.replace(TINY, rope_original_context=16)
    assert keymap.args_from_meta_params(keymap.meta_params_from_args(odd), max_seq_len=128) == odd
    assert keymap.ffn_params_for_hidden(64, 100) is not None  # any width has an exact spelling
    mult_of, mult = keymap.ffn_params_for_hidden(64, 100)
    assert ModelArgs(dim=64, multiple_of=mult_of, ffn_dim_multiplier=mult).ffn_hidden_dim == 100


def test_meta_init_equals_cpu_init():
    args = FLAVORS["debugmodel"]
    with torch.device("meta"):
        meta_model = Transformer(args)
    assert meta_model.rope_cache.is_meta
    meta_model.to_empty(device="cpu")
    meta_model.init_weights(seed=42)
    cpu_model = Transformer(args)
    cpu_model.init_weights(seed=42)
    pairs = zip(meta_model.named_parameters(), cpu_model.named_parameters(), strict=True)
    for (name, a), (_, b) in pairs:
        assert torch.equal(a, b), name
    assert torch.equal(meta_model.rope_cache, cpu_model.rope_cache)
    assert "rope_cache" not in cpu_model.state_dict()  # recomputed, never saved
    tokens = torch.randint(0, args.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(meta_model(tokens), cpu_model(tokens))


def test_init_is_deterministic_by_seed_and_shard_friendly():
    a, b, c = Transformer(TINY), Transformer(TINY), Transformer(TINY)
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    c.init_weights(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layers.0.attention.wq.weight"], sc["layers.0.attention.wq.weight"])
    # init_param is a pure function of (name, shape, generator state): replaying it on
    # fresh full tensors with wrapper prefixes in the names gives the same weights.
    gen = torch.Generator().manual_seed(3)
    for name, p in a.named_parameters():
        full = torch.empty_like(p)
        wrapped = re.sub(r"^(layers\.\d+)\.", r"\1._checkpoint_wrapped_module._orig_mod.", name)
        a.init_param(wrapped, full, gen)
        assert torch.equal(full, p), name
    # Sane statistics.
    assert torch.equal(sa["norm.weight"], torch.ones(64))
    assert 0.9 < sa["tok_embeddings.weight"].std() < 1.1
    assert abs(sa["layers.0.attention.wq.weight"].std() - 0.02) < 0.003
    wo1 = sa["layers.1.attention.wo.weight"]
    assert wo1.abs().max() <= 3 * 0.02 / 2 + 1e-6  # depth-scaled, truncated at 3 std
    with pytest.raises(ValueError, match="no initialization rule"):
        a.init_param("layers.0.attention.bias", torch.empty(3), gen)


def test_rope_scaling_changes_only_low_frequencies():
    scaled = rope_frequencies(FLAVORS["8B"])
    plain = rope_frequencies(dataclasses.replace(FLAVORS["8B"], use_scaled_rope=False))
    wavelen = 2 * torch.pi / plain
    assert torch.equal(scaled[wavelen < 2048], plain[wavelen < 2048])
    assert torch.allclose(scaled[wavelen > 8192], plain[wavelen > 8192] / 8)


def test_param_and_flop_counts():
    model = Transformer(TINY)
    assert num_params(model) == num_params_from_args(TINY)
    n_emb = TINY.vocab_size * TINY.dim
    assert num_params(model, exclude_embedding=True) == num_params(model) - n_emb
    args = build_model_args("8B", vocab_size=128256, seq_len=8192)
    n = num_params_from_args(args)
    assert 8.0e9 < n < 8.1e9  # Llama-3.1-8B has 8.03B parameters
    attn = 32 * 32 * 128 * 8192
    non_emb = num_params_from_args(args, exclude_embedding=True)
    assert flops_per_token(args, 8192) == 6 * non_emb + 12 * attn
    assert flops_per_token(args, 8192, causal=True) == 6 * non_emb + 6 * attn
