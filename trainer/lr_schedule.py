"""Linear warmup, then a constant or a cosine-decaying learning rate, as a LambdaLR factor.

A LambdaLR over a small callable (rather than SequentialLR(LinearLR, CosineAnnealingLR)) because torch's
LinearLR cannot start from 0 and SequentialLR's chained state is harder to resume exactly; LambdaLR
stores the callable's fields in its state_dict, all plain numbers that load with weights_only=True.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

SCHEDULES = ("constant", "cosine")


@dataclass
class WarmupSchedule:
    """lr factor for optimizer step ``step`` (0-based): (step + 1) / warmup_steps during warmup, so the
    first update already moves and update warmup_steps has the full lr; then 1 (constant) or a half cosine
    down to min_lr / lr at the last update (step total_steps - 1)."""

    warmup_steps: int
    total_steps: int
    kind: Literal["constant", "cosine"] = "constant"
    min_factor: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"train.lr_schedule must be one of {list(SCHEDULES)}, got {self.kind!r}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(f"warmup_steps must be >= 0 and total_steps >= 1, got {self.warmup_steps}, {self.total_steps}")
        if not 0.0 <= self.min_factor <= 1.0:
            raise ValueError(f"min_lr must be between 0 and lr (factor {self.min_factor})")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        # The update after ``step`` updates: the last one (step total_steps - 1) is at min_lr.
        progress = min(1.0, (step + 1 - self.warmup_steps) / decay_steps)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _schedule(lr: float, min_lr: float, warmup_steps: int, total_steps: int, kind: str) -> WarmupSchedule:
    return WarmupSchedule(warmup_steps, total_steps, kind, min_lr / lr if lr > 0 else 0.0)


def build_scheduler(optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                    kind: str) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(lr, min_lr, warmup_steps, total_steps, kind))


def continue_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float, min_lr: float, warmup_steps: int,
                      total_steps: int, kind: str) -> list[str]:
    """A loaded ``build_scheduler`` schedule going on under these settings from the step it reached (its
    state holds the saved run's); returns what changed, described. Unchanged settings leave every lr as
    it was, to the bit (the same product LambdaLR computes)."""
    old, new = scheduler.lr_lambdas[0], _schedule(lr, min_lr, warmup_steps, total_steps, kind)
    changes = [f"lr {scheduler.base_lrs[0]:g} -> {lr:g}"] if scheduler.base_lrs[0] != lr else []
    changes += [f"{name} {getattr(old, name)} -> {getattr(new, name)}" for name in ("warmup_steps", "total_steps", "kind")
                if getattr(old, name) != getattr(new, name)]
    if not math.isclose(old.min_factor * scheduler.base_lrs[0], min_lr, rel_tol=1e-9, abs_tol=1e-30):
        changes.append(f"min_lr {old.min_factor * scheduler.base_lrs[0]:g} -> {min_lr:g}")
    groups = scheduler.optimizer.param_groups
    scheduler.lr_lambdas = [new] * len(groups)
    scheduler.base_lrs = [lr] * len(groups)
    for group in groups:
        group["initial_lr"] = lr
        group["lr"] = lr * new(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
    return changes


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, betas: tuple[float, float],
                             weight_decay: float) -> list[str]:
    """The config's betas and weight decay on a loaded optimizer (its state holds the saved run's); returns
    what changed, described."""
    changes = set()
    for group in optimizer.param_groups:
        for name, value in (("betas", tuple(betas)), ("weight_decay", weight_decay)):
            old = tuple(group[name]) if name == "betas" else group[name]
            if old != value:
                changes.add(f"{name} {old} -> {value}")
            group[name] = value
    return sorted(changes)
