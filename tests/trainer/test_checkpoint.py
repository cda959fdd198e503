import json

import pytest
import torch

from trainer.checkpoint import (
    CheckpointNotFoundError,
    atomic_step_folder,
    load_encoders_config,
    load_model,
    read_json,
    resolve_checkpoint,
    save_weights,
    step_folder,
)
from trainer.encoders import EncodersConfig
from trainer.model import MMDiT


def random_tiny_mmdit(seed: int) -> MMDiT:
    """A tiny MMDiT with every weight random (its init zeroes some layers, which would hide mix-ups)."""
    torch.manual_seed(seed)
    model = MMDiT.from_preset("tiny", num_blocks=2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def models():
    return random_tiny_mmdit(0), random_tiny_mmdit(1)


def test_a_model_trained_with_flash_attention_samples_without_it(models, tmp_path):
    model, _ = models
    flash = MMDiT.from_preset("tiny", num_blocks=2, attention="flash")
    flash.load_state_dict(model.state_dict())
    save_weights(step_folder(tmp_path, 1), flash, None, EncodersConfig(preset="tiny"), {"step": 1})
    loaded = load_model(tmp_path)
    assert loaded.mmdit_config.attention == "auto"
    cfg = loaded.mmdit_config
    x, t = torch.randn(1, cfg.in_channels, 8, 8), torch.rand(1)
    text, pooled = torch.randn(1, 2 * cfg.text_len_per_encoder, cfg.text_dim), torch.randn(1, cfg.pooled_dim)
    assert_same_weights(loaded, model)
    with torch.no_grad():
        expected = model.eval()(x, t, text, pooled)  # large values (random weights): equal up to rounding
        torch.testing.assert_close(loaded(x, t, text, pooled), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_round_trip_is_bit_exact_and_prefers_ema(models, tmp_path):
    model, ema = models
    encoders = EncodersConfig(preset="tiny", seed=3)
    meta = {"step": 1200, "loss": 0.25, "dataset_version": "abc123"}
    step_dir = save_weights(step_folder(tmp_path, 1200), model, ema, encoders, meta)

    assert step_dir == tmp_path / "step_0001200"
    assert (tmp_path / "latest").read_text().strip() == "step_0001200"
    files = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()}
    assert {"model/diffusion_pytorch_model.safetensors", "ema/diffusion_pytorch_model.safetensors", "encoders.json", "meta.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pth"))]

    assert_same_weights(load_model(tmp_path), ema)  # the checkpoint folder resolves through `latest`
    assert_same_weights(load_model(step_dir, prefer_ema=False), model)
    assert load_model(step_dir).mmdit_config == model.mmdit_config
    assert load_encoders_config(tmp_path) == encoders
    assert read_json(step_dir, "meta.json") == meta


def test_without_ema_the_model_weights_load(models, tmp_path):
    model, _ = models
    save_weights(step_folder(tmp_path, 1), model, None, EncodersConfig(preset="tiny"), {"step": 1})
    assert not (tmp_path / "step_0000001" / "ema").exists()
    loaded = load_model(tmp_path, prefer_ema=True, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and not loaded.training
    assert torch.equal(loaded.patch_embed.weight, model.patch_embed.weight.to(torch.bfloat16))


def test_latest_follows_the_newest_save_and_a_step_can_be_rewritten(models, tmp_path):
    model, ema = models
    config = EncodersConfig(preset="tiny")
    save_weights(step_folder(tmp_path, 10), model, None, config, {"step": 10})
    save_weights(step_folder(tmp_path, 20), ema, None, config, {"step": 20})
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_0000020"
    save_weights(step_folder(tmp_path, 10), ema, None, config, {"step": 10, "rewritten": True})
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_0000010"
    assert read_json(tmp_path, "meta.json")["rewritten"] is True
    assert_same_weights(load_model(tmp_path), ema)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000010", "step_0000020"]


def test_a_failed_save_leaves_the_previous_checkpoint_untouched(models, tmp_path):
    model, _ = models
    config = EncodersConfig(preset="tiny")
    save_weights(step_folder(tmp_path, 1), model, None, config, {"step": 1})
    with pytest.raises(TypeError):
        save_weights(step_folder(tmp_path, 2), model, None, config, {"step": 2, "not json": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000001"]
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_0000001"

    with pytest.raises(RuntimeError, match="crash"):
        with atomic_step_folder(step_folder(tmp_path, 3)) as tmp:
            (tmp / "partial.bin").write_bytes(b"\0" * 10)
            raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000001"]


def test_missing_checkpoints_are_clear_errors(models, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint in"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "latest").write_text("step_0000099\n")
    with pytest.raises(CheckpointNotFoundError, match="names step_0000099"):
        resolve_checkpoint(tmp_path)


def test_without_latest_the_newest_complete_step_folder_is_used(models, tmp_path):
    model, _ = models
    config = EncodersConfig(preset="tiny")
    for step in (5, 40):
        save_weights(step_folder(tmp_path, step), model, None, config, {"step": step})
    (tmp_path / "latest").unlink()
    (tmp_path / "step_0000090").mkdir()  # no model/: not a checkpoint
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_0000040"
    assert json.loads((tmp_path / "step_0000040" / "meta.json").read_text())["step"] == 40
    # A `latest` naming a folder that is gone: the newest complete one, never a fresh start over the run.
    (tmp_path / "latest").write_text("step_0000099\n")
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_0000040"
