"""VAE encode and decode on the CPU: the default NCHW layout vs channels_last (NHWC), in the same process.

The demo VAE (the loader of `make demo` and of the demo-learning test) at the demo's 64 px and at 128 px,
and the FLUX VAE's architecture (random weights, 16 latent channels, channels 128-512) at 256 px.

    .venv/bin/python benchmarks/vae_layout.py
    .venv/bin/python benchmarks/vae_layout.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import AutoencoderKL

from trainer.encoders import DEMO_VAE_DIR, TINY_VAE_CONFIG

FLUX_LIKE = {**TINY_VAE_CONFIG, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}


def seconds(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


@torch.no_grad()
def compare(vae: AutoencoderKL, batch: int, size: int, reps: int) -> dict[str, float]:
    x = torch.rand(batch, 3, size, size) * 2 - 1
    z = vae.encode(x).latent_dist.mode()
    times = {"encode": seconds(lambda: vae.encode(x), reps), "decode": seconds(lambda: vae.decode(z), reps)}
    nhwc = vae.to(memory_format=torch.channels_last)
    x_nhwc, z_nhwc = x.contiguous(memory_format=torch.channels_last), z.contiguous(memory_format=torch.channels_last)
    times["encode_nhwc"] = seconds(lambda: nhwc.encode(x_nhwc), reps)
    times["decode_nhwc"] = seconds(lambda: nhwc.decode(z_nhwc), reps)
    same = (nhwc.encode(x_nhwc).latent_dist.mode() - z).abs().max().item()
    vae.to(memory_format=torch.contiguous_format)
    return {**times, "max_abs_diff": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="1: a loader rank under torchrun's OMP_NUM_THREADS=1")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = [("demo VAE", AutoencoderKL.from_pretrained(DEMO_VAE_DIR), 24, 64),
             ("demo VAE", AutoencoderKL.from_pretrained(DEMO_VAE_DIR), 24, 128),
             ("FLUX-like VAE", AutoencoderKL(**FLUX_LIKE), 2, 256)]
    print(f"{args.threads} thread(s); ms per call, NCHW -> channels_last")
    print(f"{'VAE':16}{'batch x px':>12}{'encode':>22}{'decode':>22}{'max |dz|':>10}")
    for name, vae, batch, size in cases:
        r = compare(vae.eval(), batch, size, args.reps)
        enc = f"{r['encode'] * 1e3:.0f} -> {r['encode_nhwc'] * 1e3:.0f} ({r['encode'] / r['encode_nhwc']:.2f}x)"
        dec = f"{r['decode'] * 1e3:.0f} -> {r['decode_nhwc'] * 1e3:.0f} ({r['decode'] / r['decode_nhwc']:.2f}x)"
        print(f"{name:16}{f'{batch} x {size}':>12}{enc:>22}{dec:>22}{r['max_abs_diff']:>10.1e}")


if __name__ == "__main__":
    main()
