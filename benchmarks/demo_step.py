"""Where a step of the CPU demo's training goes (configs/train/demo.yaml: 1 loader feeding 3 model ranks,
batch 8 each, 64 px): FLOPs and CPU seconds of the loader's demo VAE encoder and text encoders against a
model rank's forward + backward + fused AdamW, then a model rank's step time at cheaper settings as a ratio
to the committed one, all on 1 thread in one process.

    .venv/bin/python benchmarks/demo_step.py
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import load_train_config
from trainer.encoders import Encoders
from trainer.loop import images_per_step
from trainer.model import PRESETS, MMDiT

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "demo.yaml"
ROUNDS, REPEATS = 3, 10


def best_seconds(fn) -> float:
    """Best of ROUNDS rounds of REPEATS calls, after two warm-up calls."""
    fn(), fn()
    rounds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(REPEATS):
            fn()
        rounds.append((time.perf_counter() - start) / REPEATS)
    return min(rounds)


def gflop(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def model_step(cfg, latent_side: int, batch: int, **overrides):
    """A model rank's training step on random inputs of the demo's shapes; -> (step fn, fwd+bwd fn)."""
    settings = cfg.model.overrides | overrides
    model = MMDiT.from_preset(cfg.model.preset, **settings)
    x, t = torch.randn(batch, model.mmdit_config.in_channels, latent_side, latent_side), torch.rand(batch)
    text = torch.randn(batch, model.mmdit_config.text_len, model.mmdit_config.text_dim)
    pooled = torch.randn(batch, model.mmdit_config.pooled_dim)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)

    def forward_backward():
        model(x, t, text, pooled).square().mean().backward()

    def step():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad()

    return step, forward_backward


def main() -> None:
    torch.set_num_threads(1)
    cfg = load_train_config(DEMO_CONFIG)
    ranks = len(next(iter(cfg.topology.loader_to_model.values())))
    images = images_per_step(cfg, ranks)
    encoders = Encoders(cfg.encoders)
    pixels = torch.rand(images, 3, cfg.data.resolution, cfg.data.resolution) * 2 - 1
    captions = ["a red circle on a white background"] * images

    def encode_images():
        with torch.no_grad():
            encoders.encode_images(pixels)

    def encode_text():
        with torch.no_grad():
            encoders.encode_text(captions)

    latent_side = cfg.data.resolution // encoders.downsampling
    step, forward_backward = model_step(cfg, latent_side, cfg.train.batch_size)
    vae_gflop, model_gflop = gflop(encode_images), gflop(forward_backward)
    rows = [(f"loader: VAE encoder, {images} images at {cfg.data.resolution} px", vae_gflop, best_seconds(encode_images)),
            (f"loader: text encoders, {images} captions", None, best_seconds(encode_text)),
            (f"each of {ranks} model ranks: fwd+bwd + AdamW, batch {cfg.train.batch_size}", model_gflop, best_seconds(step))]
    print("| per training step | GFLOP | CPU s | GFLOP/s |\n| --- | ---: | ---: | ---: |")
    for name, flops, seconds in rows:
        figures = f"{flops:.1f} | {seconds:.3f} | {flops / seconds:.0f}" if flops else f"- | {seconds:.3f} | -"
        print(f"| {name} | {figures} |")
    print(f"VAE share of the step's FLOPs: {vae_gflop / (vae_gflop + ranks * model_gflop):.0%}\n")

    text_len = cfg.model.overrides["text_len_per_encoder"]
    variants = [("committed", cfg.train.batch_size, {}),
                (f"{text_len - 4} text tokens per encoder", cfg.train.batch_size, {"text_len_per_encoder": text_len - 4}),
                (f"batch {cfg.train.batch_size - 2}", cfg.train.batch_size - 2, {}),
                ("one block fewer", cfg.train.batch_size, {"num_blocks": PRESETS[cfg.model.preset].num_blocks - 1}),
                ("dim 96", cfg.train.batch_size, {"dim": 96})]
    print("| model rank step | ms | vs committed |\n| --- | ---: | ---: |")
    baseline = None
    for name, batch, overrides in variants:
        seconds = best_seconds(model_step(cfg, latent_side, batch, **overrides)[0])
        baseline = baseline or seconds
        print(f"| {name} | {seconds * 1000:.1f} | {seconds / baseline:.2f}x |")


if __name__ == "__main__":
    main()
