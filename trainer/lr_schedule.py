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
    first update already moves; then 1 (constant) or a half cosine from 1 down to min_lr / lr at
    total_steps."""

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
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                    kind: str) -> torch.optim.lr_scheduler.LambdaLR:
    min_factor = min_lr / lr if lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(warmup_steps, total_steps, kind, min_factor))
