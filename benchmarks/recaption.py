"""Recaptioning throughput of the transformers backend on CPU: batched vs one-by-one, same process.

Tiny random-weight LLaVA-NeXT + Llama models (tests/etl/tiny_captioners.py) run through the real
recaption_shard path (decode, downscale, VLM, LLM, post-processing, resume chunks), so the ratio shows what
batching with left padding buys. Captions are junk; the failure counts are printed for the accounting.

    .venv/bin/python benchmarks/recaption.py [--rows 48] [--batch-size 8] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from etl.config import RecaptionConfig  # noqa: E402
from etl.recaption import TransformersCaptioner, recaption_shard  # noqa: E402
from etl.schema import CANONICAL, conform  # noqa: E402
from tests.etl.tiny_captioners import save_tiny_captioners  # noqa: E402

ALT_TEXTS = ["a red dog near the sea", "Blue bus on a bridge", "", "a cat on a bed with a book and a lamp"]


def demo_shard(rows: int) -> pa.Table:
    blobs = []
    for i in range(rows):
        buffer = io.BytesIO()
        Image.new("RGB", (200 + 37 * (i % 9), 300 - 23 * (i % 7)), (17 * i % 256, 90, 160)).save(buffer, "JPEG")
        blobs.append(buffer.getvalue())
    keys = [f"bench-{i:09d}" for i in range(rows)]
    return conform(
        pa.table({"key": keys, "url": keys, "caption": [ALT_TEXTS[i % 4] for i in range(rows)], "image": blobs}),
        CANONICAL,
    )


def timed_run(table: pa.Table, cfg: RecaptionConfig, captioner, work: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    result = recaption_shard(table, cfg, work, captioner=captioner)
    return table.num_rows / (time.perf_counter() - started), result.counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        vlm, llm = save_tiny_captioners(Path(tmp))
        base = dict(backend="transformers", vlm=str(vlm), llm=str(llm), device="cpu",
                    max_new_tokens=args.max_new_tokens, short_max_new_tokens=args.max_new_tokens // 2)
        batched = RecaptionConfig(**base, batch_size=args.batch_size, chunk_rows=args.batch_size * 4)
        single = RecaptionConfig(**base, batch_size=1, chunk_rows=args.batch_size * 4)
        captioner = TransformersCaptioner.from_config(batched)
        table = demo_shard(args.rows)
        timed_run(demo_shard(4), batched, captioner, Path(tmp) / "warmup")

        one_rate, one_counts = timed_run(table, single, captioner, Path(tmp) / "single")
        batch_rate, batch_counts = timed_run(table, batched, captioner, Path(tmp) / "batched")

    print(f"rows={args.rows} max_new_tokens={args.max_new_tokens} threads={args.threads}")
    print(f"{'mode':<22}{'rows/s':>10}{'speed-up':>10}  outcome counts")
    print(f"{'one-by-one':<22}{one_rate:>10.2f}{1.0:>10.2f}  {one_counts}")
    print(f"{f'batched ({args.batch_size})':<22}{batch_rate:>10.2f}{batch_rate / one_rate:>10.2f}  {batch_counts}")


if __name__ == "__main__":
    main()
