"""The model `generate.py` samples from, on one device: weights from a DCP directory (a
training step, full or model-only, or a `llama_to_dcp.py` output; only its `model.*`
tensors are read) or a Hugging Face export, refused before anything is allocated when
they, the KV cache and the prompt's pass cannot fit."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from titan.checkpoint import storage
from titan.checkpoint.resume import integrity_problem
from titan.convert import (
    HFSource,
    read_dcp_model_groups,
    read_dcp_model_metadata,
    step_architecture,
)
from titan.data.tokenizer import SEPARATOR
from titan.logging import logger
from titan.memory import gib
from titan.models.llama import ModelArgs, Transformer, num_params_from_args, param_shapes


class GenerateError(Exception):
    """A bad input (exit status 2); the message is one line."""


@dataclass
class LoadedModel:
    """A model ready for generation and what is known about it."""

    model: Transformer
    origin: str
    """Where the weights and the architecture came from (for the log and the metadata)."""
    trained_seq_len: int | None
    """Context length the model was trained with, when the run's config says."""


def _available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device` (None where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(
    args: ModelArgs,
    max_len: int,
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
    prompt_len: int = 0,
) -> None:
    """Refuse, before allocating, a generation whose weights, KV cache (every layer's keys
    and values for `max_len` positions x `batch` samples), RoPE table and one pass over
    the `prompt_len`-token prompt cannot fit."""
    size = dtype.itemsize
    need = {
        "weights": num_params_from_args(args) * size,
        "KV cache": 2 * args.n_layers * batch * args.n_kv_heads * max_len * args.head_dim * size,
        "RoPE table": 2 * max_len * args.head_dim * 4,  # (with its temporaries)
        # one block's largest activations (the SwiGLU hidden states, a few residual-width
        # tensors) and the prompt's logits
        "prompt pass": prompt_len * ((3 * args.ffn_hidden_dim + 6 * args.dim) * size
                                     + args.vocab_size * 4),
    }  # fmt: skip
    available = _available_bytes(device)
    if available is not None and sum(need.values()) > available:
        parts = ", ".join(f"{k} {gib(v)}" for k, v in need.items())
        raise GenerateError(
            f"{max_len:,} tokens x {batch} samples need about {gib(sum(need.values()))} "
            f"({parts}) but {device} has {gib(available)} available; generate fewer --bins "
            "or --num_samples (or fewer neurons)"
        )


def check_checkpoint(path: Path, flavor: str | None = None) -> None:
    """Refuse, from its small files alone, a --checkpoint that is neither a complete DCP
    directory nor a Hugging Face export (naming a step to pass instead where it can), and
    a --flavor for an export (its config.json gives the architecture)."""
    if path.is_dir() and not (path / ".metadata").is_file() and (path / "config.json").is_file():
        if flavor is not None:
            raise GenerateError(
                f"--flavor {flavor}: {path} is a Hugging Face export, whose config.json gives "
                "the architecture; drop --flavor"
            )
        return
    neither = "neither a DCP directory (.metadata) nor a Hugging Face export (config.json)"
    if problem := storage.step_problem(path, not_a_step=neither):
        raise GenerateError(f"--checkpoint {path}: {problem}")


def load_model(
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    max_len: int,
    flavor: str | None = None,
    batch: int = 1,
    prompt_len: int = 0,
) -> LoadedModel:
    """The model of a DCP directory or a Hugging Face export folder, on `device` in
    `dtype`, with a RoPE table of `max_len` positions (`flavor`: a DCP directory's
    architecture, when neither its params.json nor its run's config.toml says); refused
    when it, a KV cache for `batch` samples and a pass over a `prompt_len`-token prompt
    cannot fit."""
    check_checkpoint(path, flavor)
    if (path / ".metadata").is_file():
        args, groups, origin, trained = _dcp_weights(path, flavor)
    else:
        source = HFSource(path)
        args, origin, trained = source.args, f"{path} (Hugging Face export)", source.trained_seq_len
        groups = ({name: source.load(name)} for name in param_shapes(args))
    if args.vocab_size < SEPARATOR + 1:
        raise GenerateError(
            f"{path}: vocabulary of {args.vocab_size} tokens; spike-count models have 256"
        )
    args = dataclasses.replace(args, max_seq_len=max_len, attn_impl="sdpa")
    check_memory(args, max_len, batch, dtype, device, prompt_len)
    with torch.device("meta"):
        model = Transformer(args)
    model.to(dtype).to_empty(device=device)
    model.init_rope(device)  # float32, whatever the parameters' dtype
    params = dict(model.named_parameters())
    with torch.no_grad():
        for group in groups:
            for name, tensor in group.items():
                params[name].copy_(tensor)
    return LoadedModel(model.eval(), origin, trained)


def _dcp_weights(
    path: Path, flavor: str | None
) -> tuple[ModelArgs, Iterable[dict[str, torch.Tensor]], str, int | None]:
    """(architecture, groups of model tensors read lazily, origin, trained seq_len) of a
    directory `check_checkpoint` accepted; its data files are verified once the
    architecture is known (a missing --flavor is named before they are read)."""
    stored = read_dcp_model_metadata(path)
    if not stored:
        raise GenerateError(f"{path}: no model tensors (keys model.*) in this checkpoint")
    args, origin, job = step_architecture(path, stored, flavor, None, logger.info)
    if problem := integrity_problem(path, "model."):
        raise GenerateError(f"{path} is damaged: {problem}; use another step")
    trained = None
    if not (path / "params.json").is_file():  # a training step: its run's config is its own
        trained = (job or {}).get("training", {}).get("seq_len")
    groups = read_dcp_model_groups(path, list(param_shapes(args)), stored)
    return args, groups, f"{path} (DCP; architecture from {origin})", trained
