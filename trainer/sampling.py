"""Samplers for the rectified flow and classifier-free guidance.

A sampler integrates dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data) on a grid of `steps` intervals,
optionally shifted towards noise with SD3's shift. `velocity_fn(x, t)` takes x (B, C, H, W) and t (B,)
and returns v; `cfg_velocity` turns a conditional model into one.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from trainer.flow import shift_t

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[torch.Tensor], None]


def _velocity(velocity_fn: VelocityFn, x: torch.Tensor, t: float) -> torch.Tensor:
    return velocity_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32))


def euler(velocity_fn: VelocityFn, x: torch.Tensor, times: list[float], generator, callback: Callback | None) -> torch.Tensor:
    for t, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t) * _velocity(velocity_fn, x, t)
        if callback is not None:
            callback(x)
    return x


def euler_stochastic(velocity_fn: VelocityFn, x: torch.Tensor, times: list[float], generator, callback: Callback | None) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE with the reference's noise level sigma(t) = t(1-t)/(1-t+0.008)
    (zero at both ends, largest mid-way) and noise scaled by sqrt(dt).

    The reference added the noise to the plain Euler step, which inflates the variance of the samples;
    here the drift carries the matching score term so every sigma keeps the flow's marginals:
    dx = [v + sigma^2 / (2t) (x + (1-t) v)] dt + sigma dW, using score(x, t) = -(x + (1-t) v) / t.
    """
    for t, t_next in zip(times[:-1], times[1:]):
        dt = t_next - t
        v = _velocity(velocity_fn, x, t)
        sigma = t * (1 - t) / (1 - t + 0.008)
        drift = v + sigma**2 / (2 * t) * (x + (1 - t) * v)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + dt * drift + sigma * math.sqrt(-dt) * noise
        if callback is not None:
            callback(x)
    return x


def heun(velocity_fn: VelocityFn, x: torch.Tensor, times: list[float], generator, callback: Callback | None) -> torch.Tensor:
    """Second order: average the slope at t and at the Euler prediction's t_next; the last step, which
    ends at t = 0, stays a plain Euler step so the model is never evaluated at t = 0 (2 * steps - 1 calls)."""
    for t, t_next in zip(times[:-1], times[1:]):
        dt = t_next - t
        v = _velocity(velocity_fn, x, t)
        x_euler = x + dt * v
        x = x_euler if t_next == 0 else x + dt * (v + _velocity(velocity_fn, x_euler, t_next)) / 2
        if callback is not None:
            callback(x)
    return x


SAMPLERS = {"euler": euler, "euler_stochastic": euler_stochastic, "heun": heun}


def check_sampling(steps: int, sampler: str, shift: float) -> None:
    """Raises ValueError on settings ``sample`` refuses: callers check before minutes of text encoding."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not shift > 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")


@torch.no_grad()
def sample(velocity_fn: VelocityFn, noise: torch.Tensor, steps: int, sampler: str = "euler",
           generator: torch.Generator | None = None, shift: float = 1.0, callback: Callback | None = None) -> torch.Tensor:
    """Integrate from `noise` at t = 1 to t = 0 in `steps` steps; returns x0. `generator` (on noise's
    device) drives euler_stochastic's noise; `callback(x)` receives every intermediate x."""
    check_sampling(steps, sampler, shift)
    # Python floats: stepping never waits on the device to read a time back
    times = shift_t(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).tolist()
    return SAMPLERS[sampler](velocity_fn, noise, times, generator, callback)


def cfg_velocity(model, text: torch.Tensor, pooled: torch.Tensor, scale: float) -> VelocityFn:
    """Classifier-free guidance as in the reference run: v = (1 + scale) v_c - scale v_u
    = v_c + scale (v_c - v_u), where v_u drops every text encoder and the pooled vector.

    scale = 0 is the plain conditional model (evaluated alone); the reference's useful range, 5-7,
    means the same here. Otherwise both halves run as ONE batch of 2B. text and pooled have the batch
    size of the x the sampler passes.
    """
    if scale == 0:
        return lambda x, t: model(x, t, text, pooled)
    batch, num_encoders = text.shape[0], model.mmdit_config.num_text_encoders
    text2, pooled2 = torch.cat([text, text]), torch.cat([pooled, pooled])
    uncond = torch.arange(2 * batch, device=text.device) >= batch
    drop_text = uncond[:, None].expand(-1, num_encoders)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), text2, pooled2,
                                 drop_text=drop_text, drop_pooled=uncond).chunk(2)
        return v_cond + scale * (v_cond - v_uncond)

    return velocity
