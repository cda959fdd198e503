import pytest
import torch

from trainer.flow import CFGDropout, flow_loss
from trainer.model import MMDiT
from trainer.sampling import SAMPLERS, cfg_velocity, sample

MU = torch.tensor([1.5, -0.5, 0.0]).view(1, 3, 1, 1).double()
STD = torch.tensor([0.3, 2.0, 1.0]).view(1, 3, 1, 1).double()


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact rectified-flow velocity E[eps - x0 | x_t] for data x0 ~ N(MU, STD^2): its ODE maps
    noise z at t = 1 to MU + STD z at t = 0 along a curved path, so integrators make real errors."""
    t = t.view(-1, 1, 1, 1).to(x.dtype)
    a = 1 - t
    var = a**2 * STD**2 + t**2
    return (t - a * STD**2) / var * (x - a * MU) - MU


def noise(batch=256, seed=0):
    return torch.randn(batch, 3, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def flow_error(sampler, steps, shift=1.0):
    z = noise()
    return (sample(gaussian_velocity, z, steps, sampler, shift=shift) - (MU + STD * z)).abs().max().item()


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_deterministic_samplers_converge_to_the_exact_flow(sampler, shift):
    errors = [flow_error(sampler, steps, shift) for steps in (5, 20, 80)]
    assert errors[0] > errors[1] > errors[2]
    order = 1 if sampler == "euler" else 2  # 4x the steps cuts the error ~4x (first order) or ~16x
    assert errors[1] / errors[2] > 0.75 * 4**order
    assert errors[2] < (0.15 if sampler == "euler" else 0.01)


@pytest.mark.parametrize("steps", [4, 10, 30])
def test_heun_beats_euler_at_equal_steps(steps):
    assert flow_error("heun", steps) < 0.5 * flow_error("euler", steps)


def test_heun_never_evaluates_the_model_at_t_zero_and_uses_two_calls_per_step_but_the_last():
    times = []

    def recording(x, t):
        times.append(t[0].item())
        return gaussian_velocity(x, t)

    sample(recording, noise(4), 10, "heun")
    assert len(times) == 2 * 10 - 1 and min(times) > 0


def test_euler_stochastic_keeps_the_data_distribution_and_is_random():
    z = torch.randn(10_000, 3, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sample(gaussian_velocity, z, 200, "euler_stochastic", generator=torch.Generator().manual_seed(1))
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True)
    torch.testing.assert_close(mean, MU.expand_as(mean), atol=0.04, rtol=0)
    torch.testing.assert_close(std, STD.expand_as(std), atol=0.04, rtol=0.02)
    deterministic = sample(gaussian_velocity, z, 200, "euler")
    assert (x - deterministic).abs().mean() > 0.01  # it does inject noise along the way
    again = sample(gaussian_velocity, z, 200, "euler_stochastic", generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, again)


def test_callback_sees_every_intermediate_and_unknown_sampler_is_an_error():
    seen = []
    out = sample(gaussian_velocity, noise(2), 7, "euler", callback=seen.append)
    assert len(seen) == 7 and torch.equal(seen[-1], out)
    assert set(SAMPLERS) == {"euler", "euler_stochastic", "heun"}
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(gaussian_velocity, noise(2), 7, "dpm")


def _small_model(**overrides):
    torch.manual_seed(0)
    config = dict(dim=32, num_blocks=2, num_heads=2, in_channels=2, text_dim=8, text_len_per_encoder=2, pooled_dim=4)
    return MMDiT.from_preset("tiny", **{**config, **overrides})


def test_cfg_runs_both_halves_in_one_batch_with_the_documented_formula():
    model = _small_model().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 2, 4, 6, generator=g), torch.rand(3, generator=g)
    text, pooled = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, generator=g)
    batches = []
    model.register_forward_hook(lambda module, args, kwargs_out: batches.append(args[0].shape[0]))

    with torch.no_grad():
        guided = cfg_velocity(model, text, pooled, scale=4.0)(x, t)
        assert batches == [6]
        v_cond = model(x, t, text, pooled)
        v_uncond = model(x, t, torch.zeros_like(text), torch.zeros_like(pooled))
        torch.testing.assert_close(guided, 5.0 * v_cond - 4.0 * v_uncond, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cfg_velocity(model, text, pooled, scale=0.0)(x, t), v_cond)


MODE_A = torch.tensor([0.8, -0.8]).view(2, 1, 1).expand(2, 4, 4)
MODE_B = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(2, 2).expand(2, 4, 4) * 0.8


def toy_batch(batch, g, text_of, pooled_of):
    """Two modes, each with its own prompt (text rows and pooled vector)."""
    labels = torch.randint(0, 2, (batch,), generator=g)
    x0 = torch.where(labels.view(-1, 1, 1, 1).bool(), MODE_B, MODE_A) + 0.05 * torch.randn(batch, 2, 4, 4, generator=g)
    return x0, text_of[labels], pooled_of[labels], labels


def test_a_tiny_model_learns_a_two_mode_toy_set_and_its_samples_land_on_the_prompted_modes():
    model = _small_model(dim=64)
    g = torch.Generator().manual_seed(0)
    text_of, pooled_of = torch.randn(2, 4, 8, generator=g), torch.eye(2, 4) * 2
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(300):
        x0, text, pooled, _ = toy_batch(64, g, text_of, pooled_of)
        loss, _ = flow_loss(model, x0, text, pooled, generator=g, drop=CFGDropout())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < 0.4 * first

    model.eval()
    labels = torch.tensor([0, 1] * 16)
    velocity = cfg_velocity(model, text_of[labels], pooled_of[labels], scale=1.0)
    x = sample(velocity, torch.randn(32, 2, 4, 4, generator=g), 20, "heun")
    distance = torch.stack([(x - mode).square().flatten(1).mean(1).sqrt() for mode in (MODE_A, MODE_B)], dim=1)
    assert torch.equal(distance.argmin(1), labels)  # every sample lands on the mode its prompt asked for
    assert distance.min(1).values.max() < 0.3
