"""What the validation loss costs, in the same process:

1. The held-out split at start-up: ``trainer.validation.key_hashes`` (numpy, one pass per byte position)
   against hashlib's blake2b in a Python loop over the keys (the obvious way), per million keys.
2. One validation pass (``log.val_images`` images at ``log.val_timesteps`` t, training and EMA weights) of
   the demo model, in training steps of the demo config (batch 8 per model rank, one thread per rank).

    .venv/bin/python benchmarks/validation_cost.py
    .venv/bin/python benchmarks/validation_cost.py --keys 25000000 --val-images 256
"""

from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np
import pyarrow as pa
import torch

from trainer.model import MMDiT
from trainer.validation import ValidationSet, evenly_spaced_t, key_hashes

DEMO_MODEL = {"max_res": 64, "max_res_orig": 64, "patch_size": 1, "text_len_per_encoder": 16}  # configs/train/demo.yaml


def seconds(fn, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def hashlib_loop(keys: list[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys],
                    dtype=np.uint64)


def random_batch(model: MMDiT, count: int, latent: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    cfg = model.mmdit_config
    return {"latents": torch.randn(count, cfg.in_channels, latent, latent, generator=generator),
            "text": torch.randn(count, cfg.text_len, cfg.text_dim, generator=generator),
            "pooled": torch.randn(count, cfg.pooled_dim, generator=generator)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=2_000_000)
    parser.add_argument("--val-images", type=int, default=256)
    parser.add_argument("--val-timesteps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)

    keys = [f"laion-{i:012d}" for i in range(args.keys)]
    array = pa.array(keys)
    ours, loop = seconds(lambda: key_hashes(array)), seconds(lambda: hashlib_loop(keys))
    per_million = 1e6 / args.keys
    print(f"held-out split of {args.keys:,} keys: key_hashes {ours * per_million:.2f} s per million, "
          f"hashlib loop {loop * per_million:.2f} s per million: {loop / ours:.1f}x")

    model = MMDiT.from_preset("tiny", **DEMO_MODEL)
    generator = torch.Generator().manual_seed(0)
    batch = random_batch(model, args.batch_size, 8, generator)  # 64 px images: 8x8 latents
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def train_step():
        t = torch.rand(args.batch_size, generator=generator)
        v = model(batch["latents"], t, batch["text"], batch["pooled"])
        v.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_step()
    step = seconds(train_step, repeats=10)
    sizes = [min(args.batch_size, args.val_images - i) for i in range(0, args.val_images, args.batch_size)]
    batches = [random_batch(model, n, 8, generator) for n in sizes]
    hashes = [np.arange(n, dtype=np.uint64) + np.uint64(1000 * i) for i, n in enumerate(sizes)]
    validation = ValidationSet(batches, hashes, evenly_spaced_t(args.val_timesteps))
    ema = MMDiT.from_preset("tiny", **DEMO_MODEL)
    one_pass = seconds(lambda: [validation.loss_sums(m, torch.device("cpu"), None) for m in (model, ema)])
    print(f"validation pass, {args.val_images} images x {args.val_timesteps} t x (training + EMA weights), demo model "
          f"on one thread: {one_pass:.2f} s = {one_pass / step:.1f} training steps of {args.batch_size} images "
          f"({step * 1e3:.0f} ms each); a model rank scores 1/N of the images")


if __name__ == "__main__":
    main()
