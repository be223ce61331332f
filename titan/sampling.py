"""Autoregressive sampling of spike-count tokens with a KV cache.

Every time bin opens with the separator 255, which is forced (every n_neurons + 1 tokens)
and never sampled anywhere else: counts are drawn from the model's distribution over
0..254 only, with temperature, top-k and top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from titan.data.tokenizer import SEPARATOR
from titan.models.llama import KVCache, Transformer


@dataclass(frozen=True)
class Sampling:
    """How each count is drawn from the model's distribution over counts 0..254."""

    temperature: float = 1.0
    """Softmax temperature; 0 = greedy (the most likely count)."""
    top_k: int = 0
    """Keep only the k most likely counts (0 = all; 1 = greedy)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely counts whose probability reaches top_p."""

    @property
    def greedy(self) -> bool:
        """Always the most likely count: temperature 0 (or below float32's smallest normal
        number, which GPUs may flush to 0) or top_k = 1."""
        return self.temperature < torch.finfo(torch.float32).tiny or self.top_k == 1


class NonFiniteLogits(RuntimeError):
    """The model gave NaN or infinite logits (a diverged checkpoint?)."""


def sample_generators(seed: int, num_samples: int, device: torch.device) -> list[torch.Generator]:
    """One generator per sample, sample i's seeded from (seed, i) alone through numpy's
    `SeedSequence`: independent streams that do not depend on how many samples are drawn
    beside it (not seed + i, which would make seed 1's sample 0 seed 0's sample 1). A CPU
    generator keeps 32 bits of its seed, a CUDA one all 64."""
    entropy = seed % 2**64  # the command takes any 64-bit seed, negative ones included
    return [
        torch.Generator(device=device).manual_seed(
            int(np.random.SeedSequence(entropy, spawn_key=(i,)).generate_state(1, np.uint64)[0])
        )
        for i in range(num_samples)
    ]


class RaceNoise:
    """Exp(1) noise per sample and count, each sample's from its own generator, drawn
    `block` tokens at a time: one call per sample per block, not per token."""

    def __init__(self, generators: list[torch.Generator], device: torch.device, block: int = 256):
        self.generators, self.device, self.block = generators, device, block
        self.noise = torch.empty(0)
        self.used = block

    def next(self) -> torch.Tensor:
        """The next token's noise (samples, 255)."""
        if self.used == self.block:
            draws = [
                torch.empty(self.block, SEPARATOR, device=self.device).exponential_(generator=g)
                for g in self.generators
            ]
            # never 0: p / 0 would be inf for a count of probability p > 0, NaN for p = 0
            self.noise = torch.stack(draws).clamp_min_(torch.finfo(torch.float32).tiny)
            self.used = 0
        self.used += 1
        return self.noise[:, self.used - 1]  # (samples, 255)


def sample_counts(
    logits: torch.Tensor, sampling: Sampling, noise: torch.Tensor | None
) -> torch.Tensor:
    """The next count token (batch,) in 0..254 from logits (batch, vocab): the separator
    (and any token above it) is never drawn. Unless greedy, count c is drawn with
    probability p_c as argmax_c p_c / E_c over `noise` E (batch, 255) of independent Exp(1)
    draws (the first of independent exponential clocks of rates p_c to ring): an exact
    draw, in one batched operation whatever the number of samples."""
    logits = logits[:, :SEPARATOR].float()  # (batch, 255): counts only
    if sampling.greedy:
        return logits.argmax(dim=-1)
    assert noise is not None, "sampling needs noise (RaceNoise.next())"
    # the most likely count at 0, so no temperature, however small, overflows to inf/NaN
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        # exactly k counts stay, also when others tie with the k-th (bf16 logits often do)
        kept, index = torch.topk(logits, sampling.top_k, dim=-1)  # (batch, k) each
        logits = torch.full_like(logits, -torch.inf).scatter_(-1, index, kept)
    if sampling.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)  # (batch, 255) each
        probs = ordered.softmax(dim=-1)
        # drop a count once the more likely ones already reach top_p (the first always stays)
        ordered = ordered.masked_fill(probs.cumsum(dim=-1) - probs >= sampling.top_p, -torch.inf)
        logits = torch.empty_like(logits).scatter_(-1, order, ordered)
    probs = logits.softmax(dim=-1)  # (batch, 255); a dropped count has 0 and is never drawn
    return (probs / noise).argmax(dim=-1)  # (batch,)


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompt: torch.Tensor,
    n_neurons: int,
    n_bins: int,
    num_samples: int,
    sampling: Sampling,
    seed: int = 0,
    use_cache: bool = True,
) -> torch.Tensor:
    """Tokens (num_samples, prompt_bins * (n_neurons + 1) + n_bins * (n_neurons + 1)): the
    prompt, then `n_bins` sampled time bins, sample i drawing its noise from (seed, i)
    alone (see `sample_generators`). `prompt` (1-D) is whole time bins followed by the
    separator that opens the first generated bin. Without `use_cache`, every step
    recomputes the whole sequence (the reference the cached path is tested against).
    NonFiniteLogits when the model's logits are NaN or infinite (checked once per bin)."""
    period = n_neurons + 1
    start = prompt.numel()
    assert start % period == 1, "the prompt must be whole time bins plus one separator"
    total = start - 1 + n_bins * period
    device = model.tok_embeddings.weight.device
    tokens = torch.empty(num_samples, total, dtype=torch.long, device=device)
    tokens[:, :start] = prompt.to(device)
    noise = RaceNoise(sample_generators(seed, num_samples, device), device)
    cache = None
    if use_cache:
        cache = KVCache(model.args, num_samples, total, device, model.tok_embeddings.weight.dtype)
        # the samples share the prompt: one pass over it, its keys and values copied
        logits = model(tokens[:1, :start], cache.first(1))[:, -1]  # (1, vocab)
        logits = logits.expand(num_samples, -1)  # (samples, vocab)
        cache.share_first(start)
    else:
        logits = model(tokens[:, :start])[:, -1]  # (samples, vocab)
    finite = torch.ones((), dtype=torch.bool, device=device)  # read once per bin: no sync
    for pos in range(start, total):
        finite &= torch.isfinite(logits).all()
        if pos % period == 0:
            if not finite:
                raise NonFiniteLogits(f"NaN or infinite logits by position {pos}")
            tokens[:, pos] = SEPARATOR  # every time bin opens with the separator
        else:
            draws = None if sampling.greedy else noise.next()
            tokens[:, pos] = sample_counts(logits, sampling, draws)
        if pos + 1 < total:
            if use_cache:
                logits = model(tokens[:, pos : pos + 1], cache, pos)[:, -1]
            else:
                logits = model(tokens[:, : pos + 1])[:, -1]
    if not finite:
        raise NonFiniteLogits("NaN or infinite logits in the last time bin")
    return tokens


def tokens_to_counts(tokens: np.ndarray, n_neurons: int) -> np.ndarray:
    """Whole time bins of tokens (samples, bins * (n_neurons + 1)) -> counts
    (samples, n_neurons, bins) uint8; the inverse of `tokenize_row` per sample."""
    samples = tokens.shape[0]
    bins = tokens.reshape(samples, -1, n_neurons + 1)  # (samples, bins, 1 + neurons)
    assert (bins[:, :, 0] == SEPARATOR).all() and (bins[:, :, 1:] < SEPARATOR).all()
    return bins[:, :, 1:].transpose(0, 2, 1).astype(np.uint8)  # (samples, neurons, bins)
