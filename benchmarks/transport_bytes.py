"""Bytes a loader rank sends per sample: shapes-first transport vs the reference's padding to max resolution.

The reference sent every latent as (16, R/8, R/8), filling the part outside the image with inf, so that
the receiver never needed the shape, and its text as 2 x 77 rows x 2304 whatever the captions.
trainer/transport.py sends a header with the shapes, then each tensor at its real size, the text
without its zero rows and columns (``pack_batch``). Both are measured on real tensors built for every
bucket of a realistic histogram: image sizes drawn from common photo aspect ratios (1:2 .. 2:1, most of
them 4:3, 1:1, 3:2) and log-normal long sides (median --median-long-side px, as web images), bucketed by
etl.buckets. The text is laid out as ``Encoders.encode_text`` lays it out: Gemma's 2304-wide rows then
ModernBERT-large's 1024-wide ones zero-padded to 2304, rows past a caption's token count zero, for a
loader batch of half detailed (cut at 77 tokens) and half short captions
(``benchmarks.text_encode.loader_captions``, counted by the project tokenizer). The pooled (768)
embedding travels alike in both. With --transfer-batches N two gloo processes also time N real sends of
one batch of the most common bucket both ways (loopback TCP).

    .venv/bin/python benchmarks/transport_bytes.py                       # bytes, under a minute
    .venv/bin/python benchmarks/transport_bytes.py --samples 200000 --transfer-batches 20
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.text_encode import loader_captions
from etl.buckets import bucket_size
from trainer.tokenizer import build_tokenizer
from trainer.transport import HEADER_LEN, pack_batch, recv_batch, send_batch

# Share of web photos per aspect ratio (width:height); the rest of the range comes from the jitter.
ASPECTS = {(1, 1): 0.22, (4, 3): 0.24, (3, 4): 0.10, (3, 2): 0.16, (2, 3): 0.07, (16, 9): 0.10,
           (9, 16): 0.03, (2, 1): 0.05, (1, 2): 0.03}
BATCH_SIZE = {256: 140, 512: 40, 1024: 15}  # the reference's per-GPU batch sizes
TEXT_LEN, TEXT_DIM, BERT_WIDTH, POOLED_DIM, LATENT_CHANNELS = 77, 2304, 1024, 768, 16
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def image_sizes(n: int, median_long_side: float, seed: int) -> list[tuple[int, int]]:
    """(height, width) of ``n`` made-up web images."""
    rng = np.random.default_rng(seed)
    ratios = np.array([w / h for w, h in ASPECTS])
    picks = rng.choice(len(ratios), n, p=np.array(list(ASPECTS.values())))
    ratio = np.clip(ratios[picks] * np.exp(rng.normal(0, 0.03, n)), 0.5, 2.0)
    long = np.exp(rng.normal(math.log(median_long_side), 0.5, n))
    # ratio = width / height; the long side is the width of a landscape image and the height of a portrait one
    return [
        (max(1, round(side / r)), round(side)) if r >= 1 else (round(side), max(1, round(side * r)))
        for side, r in zip(long, ratio)
    ]


def histogram(sizes: list[tuple[int, int]], resolution: int) -> Counter:
    return Counter(b for b in (bucket_size(h, w, resolution) for h, w in sizes) if b is not None)


def loader_text(b: int, dtype, seed: int) -> torch.Tensor:
    """(b, 2 x 77, 2304) text laid out as encode_text makes it, for ``b`` captions of a loader batch."""
    counts = [len(ids) for ids in build_tokenizer()(loader_captions(b, seed), truncation=True, max_length=TEXT_LEN)["input_ids"]]
    text = torch.randn(b, 2 * TEXT_LEN, TEXT_DIM).to(dtype)
    for row, count in enumerate(counts):
        text[row, count:TEXT_LEN] = 0
        text[row, TEXT_LEN + count :] = 0
    text[:, TEXT_LEN:, BERT_WIDTH:] = 0
    return text


def ours_batch(b: int, height: int, width: int, dtype, text: torch.Tensor, make=torch.randn) -> dict[str, torch.Tensor]:
    """A loader's batch for one bucket, as it goes over the wire; ``make=torch.empty`` when only the sizes matter."""
    return pack_batch({
        "latents": make(b, LATENT_CHANNELS, height // 8, width // 8, dtype=dtype),
        "text": text,
        "pooled": make(b, POOLED_DIM, dtype=dtype),
    }, text_blocks=2)


def reference_batch(batch: dict[str, torch.Tensor], text: torch.Tensor, resolution: int,
                    padded: torch.Tensor | None = None) -> dict:
    """The reference's layout: latents inf-padded to the maximum resolution, the whole ``text``.

    ``padded``: a (b, 16, R/8, R/8) buffer to fill, reused across buckets of one resolution."""
    latents = batch["latents"]
    side = resolution // 8
    if padded is None:
        padded = torch.empty((latents.shape[0], LATENT_CHANNELS, side, side), dtype=latents.dtype)
    padded.fill_(float("inf"))
    padded[:, :, : latents.shape[2], : latents.shape[3]] = latents
    return {"latents": padded, "text": text, "pooled": batch["pooled"]}


def bytes_per_sample(batch: dict[str, torch.Tensor], header: bool) -> tuple[float, float]:
    """(latent bytes, all bytes) per sample of ``batch`` as it goes over the wire."""
    b = batch["latents"].shape[0]
    total = sum(t.nbytes for t in batch.values()) + (HEADER_LEN * 8 if header else 0)
    return batch["latents"].nbytes / b, total / b


def _transfer_worker(rank, init, batches, repeats, timings):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=120))
    totals = dict.fromkeys((name for name, _ in batches), 0.0)
    # Round 0 warms the connection up and is not counted; ours and the reference alternate so that load
    # from other processes on the machine falls on both alike.
    for round_number in range(repeats + 1):
        for name, batch in batches:
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:
                for work in send_batch(batch, dst=1):
                    work.wait()
            else:
                recv_batch(0, timeout_s=120)
                if round_number:
                    totals[name] += time.perf_counter() - start
    if rank == 1:
        timings.update({name: total / repeats for name, total in totals.items()})
    dist.destroy_process_group()


def time_transfers(batches: list[tuple[str, dict]], repeats: int) -> dict[str, float]:
    timings = mp.Manager().dict()
    init = f"file://{tempfile.mkdtemp()}/rendezvous"
    mp.spawn(_transfer_worker, args=(init, batches, repeats, timings), nprocs=2)
    return dict(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50_000, help="made-up images in the histogram")
    parser.add_argument("--median-long-side", type=float, default=1000.0)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="what the loader's encoders output")
    parser.add_argument("--transfer-batches", type=int, default=0, help="timed gloo sends per way (0: bytes only)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    sizes = image_sizes(args.samples, args.median_long_side, args.seed)

    print(f"{args.samples} images, median long side {args.median_long_side:g} px, {args.dtype}")
    print(f"{'res':>5} {'buckets':>7} {'latent B/sample ours':>21} {'reference':>10} {'ratio':>6} "
          f"{'all B/sample ours':>18} {'reference':>10} {'ratio':>6}")
    transfers = []
    for resolution in args.resolutions:
        counts = histogram(sizes, resolution)
        b = BATCH_SIZE.get(resolution, 16)
        totals = np.zeros(4)
        padded = torch.empty((b, LATENT_CHANNELS, resolution // 8, resolution // 8), dtype=dtype)
        text = loader_text(b, dtype, args.seed + resolution)
        for (height, width), n in counts.items():
            batch = ours_batch(b, height, width, dtype, text, make=torch.empty)
            ours_latent, ours_all = bytes_per_sample(batch, header=True)
            ref_latent, ref_all = bytes_per_sample(reference_batch(batch, text, resolution, padded), header=False)
            totals += n * np.array([ours_latent, ref_latent, ours_all, ref_all])
        ours_latent, ref_latent, ours_all, ref_all = totals / sum(counts.values())
        print(
            f"{resolution:>5} {len(counts):>7} {ours_latent:>21,.0f} {ref_latent:>10,.0f} "
            f"{ref_latent / ours_latent:>5.2f}x {ours_all:>18,.0f} {ref_all:>10,.0f} {ref_all / ours_all:>5.2f}x"
        )
        common = counts.most_common(1)[0][0]
        batch = ours_batch(b, *common, dtype, text)
        transfers += [(f"{resolution} ours {common[0]}x{common[1]}", batch),
                      (f"{resolution} reference {common[0]}x{common[1]}", reference_batch(batch, text, resolution))]

    if args.transfer_batches:
        timings = time_transfers(transfers, args.transfer_batches)
        print(f"\ngloo loopback, one batch of the most common bucket ({args.transfer_batches} sends each):")
        for ours_name, ref_name in zip(transfers[::2], transfers[1::2]):
            ours_s, ref_s = timings[ours_name[0]], timings[ref_name[0]]
            print(
                f"  {ours_name[0]:<28} {ours_s * 1e3:8.1f} ms   reference {ref_s * 1e3:8.1f} ms   "
                f"{ref_s / ours_s:5.2f}x"
            )


if __name__ == "__main__":
    main()
