"""Seconds per image at 50 steps: CFG with both halves in one batch (ours) vs two model passes per step.

Same process, same model, same noise; the two give the same images (checked), only the time differs.

    .venv/bin/python benchmarks/sampling.py                       # tiny preset, 256 px, batch 1
    .venv/bin/python benchmarks/sampling.py --batch 4 --size 512 --preset tiny --reps 3
"""

from __future__ import annotations

import argparse
import time

import torch

from trainer.model import MMDiT
from trainer.sampling import cfg_velocity, sample


def two_pass_cfg(model, text, pooled, scale):
    """The baseline: conditional and unconditional velocities from two separate forward passes."""
    no_text = torch.ones(text.shape[0], model.mmdit_config.num_text_encoders, dtype=torch.bool)
    no_pooled = torch.ones(text.shape[0], dtype=torch.bool)

    def velocity(x, t):
        v_cond = model(x, t, text, pooled)
        v_uncond = model(x, t, text, pooled, drop_text=no_text, drop_pooled=no_pooled)
        return v_cond + scale * (v_cond - v_uncond)

    return velocity


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = MMDiT.from_preset(args.preset).eval()
    with torch.no_grad():  # random gates so the output depends on every input, as in a trained model
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = model.mmdit_config
    g = torch.Generator().manual_seed(0)
    text = torch.randn(args.batch, cfg.text_len, cfg.text_dim, generator=g)
    pooled = torch.randn(args.batch, cfg.pooled_dim, generator=g)
    noise = torch.randn(args.batch, cfg.in_channels, args.size // 8, args.size // 8, generator=g)

    variants = {"two passes": two_pass_cfg(model, text, pooled, args.cfg),
                "batched CFG (ours)": cfg_velocity(model, text, pooled, args.cfg)}
    times, images = {name: [] for name in variants}, {}
    with torch.inference_mode():
        for _ in range(args.reps):  # interleaved so machine noise hits both alike
            for name, velocity in variants.items():
                start = time.perf_counter()
                images[name] = sample(velocity, noise, args.steps, args.sampler)
                times[name].append(time.perf_counter() - start)
    difference = (images["two passes"] - images["batched CFG (ours)"]).abs().max().item()

    print(f"{args.preset} preset, {args.size}x{args.size} px ({(args.size // 16) ** 2} image tokens), batch {args.batch}, "
          f"{args.steps} {args.sampler} steps, cfg {args.cfg}, {torch.get_num_threads()} CPU threads, fastest of {args.reps}; "
          f"max |difference| between the two: {difference:.1e}")
    print("| CFG evaluation | s / image | vs two passes |")
    print("|---|---:|---:|")
    base = min(times["two passes"]) / args.batch
    for name in variants:
        per_image = min(times[name]) / args.batch
        print(f"| {name} | {per_image:.2f} | {per_image / base:.2f} |")


if __name__ == "__main__":
    main()
