"""The rectified-flow objective: x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0, MSE.

t = 0 is data and t = 1 is noise (samplers integrate from 1 to 0). Timesteps come from a logit-normal
(SD3's default, m=0, s=1) or a uniform distribution, optionally shifted towards noise for larger images
(SD3's resolution-dependent shift). CFG dropout zeroes each condition independently per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


def sample_t(batch: int, generator: torch.Generator | None = None, kind: Literal["logit_normal", "uniform"] = "logit_normal",
             m: float = 0.0, s: float = 1.0, device=None) -> torch.Tensor:
    """(batch,) timesteps in (0, 1). logit_normal: sigmoid(N(m, s^2)), which spends more steps at mid t."""
    device = device if device is not None else (generator.device if generator is not None else None)
    if kind == "logit_normal":
        return torch.sigmoid(m + s * torch.randn(batch, generator=generator, device=device))
    if kind == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    raise ValueError(f"unknown timestep distribution {kind!r}; use 'logit_normal' or 'uniform'")


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift t' = shift t / (1 + (shift - 1) t); shift > 1 moves t towards noise."""
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(height: int, width: int, base: int = 256 * 256) -> float:
    """SD3's shift for an image of height x width pixels trained with a base of `base` pixels:
    sqrt(m / n), the factor that keeps the signal-to-noise ratio per unit area the same."""
    return math.sqrt(height * width / base)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


@dataclass(frozen=True)
class CFGDropout:
    """Per-sample, independent drop probabilities: the pooled vector and each sequence encoder. The
    reference's 0.316 per encoder drops both (all text) about 10% of the time (0.316^2 = 0.1)."""

    pooled: float = 0.1
    text: tuple[float, ...] = (0.316, 0.316)

    def __post_init__(self):
        for p in (self.pooled, *self.text):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"CFG dropout probabilities must be in [0, 1], got {p}")

    def sample(self, batch: int, generator: torch.Generator | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> drop_text (batch, num_text_encoders) bool, drop_pooled (batch,) bool."""
        device = device if device is not None else (generator.device if generator is not None else None)
        probs_text = torch.tensor(self.text, device=device)
        drop_text = torch.rand(batch, len(self.text), generator=generator, device=device) < probs_text
        drop_pooled = torch.rand(batch, generator=generator, device=device) < self.pooled
        return drop_text, drop_pooled


def flow_loss(model, x0: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, generator: torch.Generator | None = None,
              drop: CFGDropout | None = None, t_kind: Literal["logit_normal", "uniform"] = "logit_normal",
              m: float = 0.0, s: float = 1.0, shift: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One rectified-flow training loss on a batch of clean latents x0.

    Returns (loss, parts): loss the scalar MSE to backpropagate; parts holds "t" (B,) and
    "loss_per_sample" (B,), detached, for logging loss against t.
    `generator` must live on x0's device; it drives t, the noise and the dropout masks.
    """
    batch = x0.shape[0]
    t = shift_t(sample_t(batch, generator, t_kind, m, s, device=x0.device), shift)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    drop_text, drop_pooled = drop.sample(batch, generator, device=x0.device) if drop is not None else (None, None)
    v = model(add_noise(x0, noise, t), t, text, pooled, drop_text=drop_text, drop_pooled=drop_pooled)
    per_sample = F.mse_loss(v.float(), velocity_target(x0, noise).float(), reduction="none").flatten(1).mean(1)
    return per_sample.mean(), {"t": t.detach(), "loss_per_sample": per_sample.detach()}
