import pytest
import torch

from trainer.flow import CFGDropout, add_noise, flow_loss, resolution_shift, sample_t, shift_t, velocity_target
from trainer.model import MMDiT


def test_logit_normal_timesteps_have_the_requested_location_and_scale():
    g = torch.Generator().manual_seed(0)
    t = sample_t(200_000, g, "logit_normal", m=0.5, s=0.8)
    assert t.shape == (200_000,) and ((t > 0) & (t < 1)).all()
    logits = torch.logit(t.double())
    assert abs(logits.mean().item() - 0.5) < 0.01
    assert abs(logits.std().item() - 0.8) < 0.01


def test_uniform_timesteps_and_unknown_kind():
    t = sample_t(200_000, torch.Generator().manual_seed(0), "uniform")
    assert abs(t.mean().item() - 0.5) < 0.01 and abs(t.var().item() - 1 / 12) < 0.002
    with pytest.raises(ValueError, match="logit_normal"):
        sample_t(4, kind="beta")


def test_shift_keeps_the_endpoints_and_moves_t_towards_noise():
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift_t(t, 1.0), t)
    shifted = shift_t(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted[1:-1] > t[1:-1]).all() and (shifted.diff() > 0).all()
    assert shifted[5].item() == pytest.approx(0.75)
    assert resolution_shift(512, 512) == pytest.approx(2.0)
    assert resolution_shift(256, 256) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        shift_t(t, 0.0)


def test_interpolation_endpoints_and_velocity_is_its_time_derivative():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64), torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    assert torch.equal(add_noise(x0, noise, torch.zeros(3, dtype=torch.float64)), x0)
    assert torch.equal(add_noise(x0, noise, torch.ones(3, dtype=torch.float64)), noise)
    t, h = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64), 1e-6
    derivative = (add_noise(x0, noise, t + h) - add_noise(x0, noise, t - h)) / (2 * h)
    torch.testing.assert_close(derivative, velocity_target(x0, noise))


def test_cfg_dropout_rates_match_the_reference_defaults_and_are_independent():
    drop_text, drop_pooled = CFGDropout().sample(200_000, torch.Generator().manual_seed(0))
    assert drop_text.shape == (200_000, 2) and drop_text.dtype == torch.bool and drop_pooled.shape == (200_000,)
    rates = drop_text.float().mean(0)
    assert torch.allclose(rates, torch.tensor([0.316, 0.316]), atol=0.005)
    assert abs(drop_pooled.float().mean().item() - 0.1) < 0.005
    assert abs(drop_text.all(1).float().mean().item() - 0.316**2) < 0.005  # both encoders: ~10%
    with pytest.raises(ValueError):
        CFGDropout(pooled=1.5)


def _tiny_model():
    torch.manual_seed(0)
    model = MMDiT.from_preset("tiny", dim=32, num_blocks=1, num_heads=2, in_channels=4, text_len_per_encoder=3,
                              text_dim=8, pooled_dim=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_flow_loss_is_the_mse_to_the_velocity_target_for_the_sampled_t_noise_and_masks():
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    x0, text, pooled = torch.randn(4, 4, 4, 4, generator=g), torch.randn(4, 6, 8, generator=g), torch.randn(4, 8, generator=g)
    drop = CFGDropout(pooled=0.5, text=(0.5, 0.5))
    loss, parts = flow_loss(model, x0, text, pooled, generator=torch.Generator().manual_seed(7), drop=drop, shift=2.0)

    # the same draws, by hand, in the same order: t, noise, masks
    g = torch.Generator().manual_seed(7)
    t = shift_t(sample_t(4, g), 2.0)
    noise = torch.randn(x0.shape, generator=g)
    drop_text, drop_pooled = drop.sample(4, g)
    v = model(add_noise(x0, noise, t), t, text, pooled, drop_text=drop_text, drop_pooled=drop_pooled)
    expected = (v - (noise - x0)).square().flatten(1).mean(1)
    torch.testing.assert_close(parts["t"], t)
    torch.testing.assert_close(parts["loss_per_sample"], expected.detach())
    torch.testing.assert_close(loss, expected.mean())

    loss.backward()
    assert model.final.linear.weight.grad.abs().sum() > 0
