"""AdamW and the warmup-then-decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from titan.config import JobConfig
from titan.logging import logger


def build_optimizer(model: nn.Module, cfg: JobConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; fused on CUDA when asked (one kernel for
    all parameters instead of several per tensor)."""
    o = cfg.optimizer
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = o.fused and device.type == "cuda"
    return torch.optim.AdamW(
        groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused, foreach=not fused
    )


def lr_factor(step: int, warmup: int, total: int, decay_type: str, floor: float) -> float:
    """Multiplier of the peak LR before optimizer step `step` (0-based): linear warmup
    over `warmup` steps, then cosine/linear decay to `floor` at the last step."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if decay_type == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay_type == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: JobConfig) -> LambdaLR:
    s, t = cfg.lr_scheduler, cfg.training
    return LambdaLR(
        optimizer,
        lambda step: lr_factor(step, t.warmup_steps, t.steps, s.decay_type, s.min_lr_ratio),
    )


def warn_about_the_schedule(cfg: JobConfig) -> None:
    """Say so when the warmup covers the whole run (a short test run, or a typo)."""
    s, t = cfg.lr_scheduler, cfg.training
    if t.warmup_steps >= t.steps:  # the last step's rate is the highest
        last = lr_factor(t.steps - 1, t.warmup_steps, t.steps, s.decay_type, s.min_lr_ratio)
        peak = cfg.optimizer.lr * last
        logger.warning(
            f"training.warmup_steps = {t.warmup_steps} covers all {t.steps} training.steps: the "
            f"learning rate peaks at {peak:.3g}, never at optimizer.lr = {cfg.optimizer.lr:g}, "
            "and never decays; lower warmup_steps for a full schedule"
        )
