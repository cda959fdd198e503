"""Train the demo's small AutoencoderKL on the demo domain (coloured shapes) and save it for the "demo" preset.

A random-weight VAE cannot decode, so the demo ships this one: 16 latent channels and 8x downsampling like
the FLUX VAE, small enough to commit (about 2.5 MB of float16 safetensors). Training is deterministic from ``--seed``
and runs on CPU: images are drawn in memory with ``etl.demo_source.draw_shape`` at the sizes the demo's
bucketing produces, the loss is MSE plus a tiny KL term, and PSNR on a fixed held-out set is printed as it
trains. At the end the latent statistics of the training distribution set ``shift_factor`` and
``scaling_factor`` so scaled latents have zero mean and unit variance, as FLUX's do.

    .venv/bin/python scripts/train_demo_vae.py   # about 10 min on a quiet 2-core box; writes trainer/assets/demo_vae/
"""

from __future__ import annotations

import argparse
import io
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

from etl.demo_source import BACKGROUNDS, COLOURS, JITTER_FRACTION, MAX_ASPECT, SHAPE_FRACTION, SHAPES, draw_shape

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "trainer" / "assets" / "demo_vae"

SAVED_DTYPE = torch.float16
DEMO_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    # Four block levels -> three 2x downsamplings -> 8x, as in the FLUX VAE.
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=1,
    norm_num_groups=16,
    latent_channels=16,
    sample_size=128,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def random_demo_image(rng: random.Random, resolution: int, multiple: int = 16) -> Image.Image:
    """A demo image as the pipeline delivers it: a bucket of about ``resolution**2`` pixels, sides a multiple
    of ``multiple``, shape and jitter in the demo source's proportions, JPEG-compressed half the time
    (the source serves half its images as JPEG)."""
    aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))
    width = max(multiple, round(resolution * math.sqrt(aspect) / multiple) * multiple)
    height = max(multiple, round(resolution / math.sqrt(aspect) / multiple) * multiple)
    short = min(width, height)
    extent = short * rng.uniform(*SHAPE_FRACTION)
    offset = (rng.uniform(-1, 1) * JITTER_FRACTION * short, rng.uniform(-1, 1) * JITTER_FRACTION * short)
    image = draw_shape(width, height, rng.choice(COLOURS), rng.choice(SHAPES), rng.choice(BACKGROUNDS), extent, offset)
    if rng.random() < 0.5:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=92)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def random_crop(image: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    _, height, width = image.shape
    top, left = rng.randint(0, height - size), rng.randint(0, width - size)
    return image[:, top : top + size, left : left + size]


def make_pool(n: int, resolution: int, seed: int) -> list[torch.Tensor]:
    rng = random.Random(seed)
    return [to_tensor(random_demo_image(rng, resolution)) for _ in range(n)]


def crop_side(resolution: int, largest: int) -> int:
    """The largest multiple of 8, at most ``largest``, that fits inside every bucket of ``resolution`` (the
    shortest bucket side is resolution / sqrt(MAX_ASPECT))."""
    return min(largest, int(resolution / math.sqrt(MAX_ASPECT)) // 8 * 8)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """Mean PSNR in dB over the batch of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((reconstruction.clamp(-1, 1) - target) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-12))).mean().item()


@torch.no_grad()
def evaluate(vae: AutoencoderKL, images: list[torch.Tensor]) -> float:
    """PSNR of mode (posterior mean) reconstructions, image by image (sizes differ)."""
    vae.eval()
    scores = [psnr(vae(x[None], sample_posterior=False).sample, x[None]) for x in images]
    vae.train()
    return sum(scores) / len(scores)


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, images: list[torch.Tensor], generator: torch.Generator) -> tuple[float, float]:
    """(mean, std) over every element of posterior samples of ``images``: the shift and 1/scale that make
    the scaled latents zero-mean, unit-variance."""
    vae.eval()
    samples = [vae.encode(x[None]).latent_dist.sample(generator).flatten() for x in images]
    flat = torch.cat(samples)
    return flat.mean().item(), flat.std().item()


def train(args: argparse.Namespace) -> AutoencoderKL:
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    vae = AutoencoderKL(**DEMO_VAE_CONFIG)
    vae.train()
    print(f"params: {sum(p.numel() for p in vae.parameters()):,}", flush=True)
    # Pools are drawn once: drawing with 4x supersampling costs more than a training step's share. One pool
    # per bucket resolution: at 64 px a shape spans two or three latent pixels, at 128 px five or more, and a
    # VAE that only saw one scale blurs the other's corners (squares and triangles decode as circles).
    pools = {r: make_pool(args.pool // len(args.resolutions), r, args.seed + 1 + 10 * i)
             for i, r in enumerate(args.resolutions)}
    held_out = {r: make_pool(args.eval_images, r, args.seed + 2 + 10 * i) for i, r in enumerate(args.resolutions)}
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps)),
    )
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        resolution = args.resolutions[step % len(args.resolutions)]
        pool, crop = pools[resolution], crop_side(resolution, args.crop)
        batch = torch.stack([random_crop(pool[rng.randrange(len(pool))], crop, rng) for _ in range(args.batch_size)])
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        mse = F.mse_loss(reconstruction, batch)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = mse + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.log_every == 0 or step == args.steps:
            line = f"step {step}/{args.steps}  mse {mse.item():.5f}  kl {kl.item():.3f}  {time.perf_counter() - start:.0f}s"
            if step % args.eval_every == 0 or step == args.steps:
                line += "  held-out PSNR " + ", ".join(f"{evaluate(vae, held_out[r]):.2f} dB @ {r}" for r in held_out)
            print(line, flush=True)

    per_pool = args.stat_images // len(pools)
    mean, std = latent_statistics(vae, [x for pool in pools.values() for x in pool[:per_pool]], generator)
    vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    # Shipped in float16 to halve the committed file; rounding here makes the final PSNR the shipped VAE's.
    vae = vae.to(SAVED_DTYPE).float().eval()
    print(f"latent mean {mean:.4f} std {std:.4f} -> shift_factor {mean:.4f} scaling_factor {1 / std:.4f}")
    scores = ", ".join(f"{evaluate(vae, held_out[r]):.2f} dB @ {r}" for r in held_out)
    print(f"final held-out PSNR {scores}  ({time.perf_counter() - start:.0f}s)", flush=True)
    return vae


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=64,
                        help="largest training crop side (a multiple of 8); smaller where a bucket side is shorter")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128],
                        help="bucket resolutions the images are drawn at, batches alternating between them")
    parser.add_argument("--pool", type=int, default=2000, help="training images drawn up front")
    parser.add_argument("--eval-images", type=int, default=16)
    parser.add_argument("--stat-images", type=int, default=256, help="images whose latents set shift/scale")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-4)
    # One thread: on the shared 2-core box two OpenMP threads ran slower than one. The count changes the
    # float summation order, so the committed weights reproduce bit for bit only with the default.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=250)
    args = parser.parse_args(argv)
    if args.crop % 8 or min(crop_side(r, args.crop) for r in args.resolutions) < 16:
        parser.error("--crop must be a multiple of 8 and every resolution's shortest bucket side at least 16 px")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        vae = train(args)
    finally:  # the tests run main() in their own process, whose later tests must keep their thread count
        torch.set_num_threads(threads)
    vae.to(SAVED_DTYPE).save_pretrained(args.out, safe_serialization=True)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
