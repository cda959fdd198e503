"""Exponential moving average of the model weights, updated every ``every`` optimizer steps.

The reference updates its EMA copy only every N steps (an EMA update of a 1.2B model each step costs
as much memory bandwidth as the optimizer); between updates the EMA copy is untouched, so ``decay`` is
per update, not per step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, every: int, device: str | torch.device | None = None):
        """``model`` the unwrapped module (not the DDP wrapper); ``device`` None keeps the EMA copy beside
        the model, "cpu" moves it off the GPU."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema.decay must be in [0, 1], got {decay}")
        if every < 1:
            raise ValueError(f"ema.every must be >= 1, got {every}")
        self.decay, self.every = decay, every
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        if device is not None:
            self.model.to(device)

    @torch.no_grad()
    def maybe_update(self, model: nn.Module, step: int) -> bool:
        """After optimizer step ``step`` (1-based): move the EMA towards ``model`` when step % every == 0."""
        if step % self.every:
            return False
        ema_params = list(self.model.parameters())
        params = [p.detach().to(e.device, e.dtype) for p, e in zip(model.parameters(), ema_params)]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
