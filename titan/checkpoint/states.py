"""What a checkpoint holds, as `Stateful` objects DCP can save and load in place: the
model and optimizer (full parameter names, sharded as in training), the progress
counters, and each rank's RNG states."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful


class ModelState(Stateful):
    """The model's full-name state dict (DTensor shards under FSDP)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=False))


class OptimizerState(Stateful):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


@dataclass
class TrainState(Stateful):
    """Progress counters, and the layout they were saved under. Loading restores the
    counters only: the layout fields describe the current run."""

    step: int = 0
    """Optimizer steps taken (skipped non-finite ones included)."""
    tokens_seen: int = 0
    """Tokens of all ranks' batches so far."""
    dp_degree: int = 1
    """Data-parallel ranks (each reads its own rows)."""
    world_size: int = 1
    """Ranks in all."""
    seq_len: int = 0
    """Tokens per sequence."""
    global_batch: int = 0
    """Sequences per optimizer step."""

    def state_dict(self) -> dict[str, Any]:
        return {k: torch.tensor(v) for k, v in dataclasses.asdict(self).items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.tokens_seen = int(state_dict["tokens_seen"])


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
