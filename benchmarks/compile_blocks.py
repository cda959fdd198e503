"""torch.compile of the MMDiT: per block with dynamic shapes (``MMDiT.compile_blocks``, what the trainer does
with ``train.compile``) vs the whole model (``torch.compile(model)``, what it did before) and per block with
dynamo's default of static shapes first, on the CPU.

Each case runs in its own process with an empty inductor cache, so every compile is paid in full. A case
trains a few steps over three bucket sizes, then runs a no-grad pass (validation, sampling), as a training
run does: compile seconds (the first pass at each size, minus an eager pass), graphs compiled, whether
dynamo gave up on a function (its recompile limit), and the steady step time against eager.

    .venv/bin/python benchmarks/compile_blocks.py                   # tiny preset, 2 and 8 blocks, ~10 min
    .venv/bin/python benchmarks/compile_blocks.py --depths 4 --batch 4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import torch

from trainer.model import MMDiT

SIZES = [(8, 8), (4, 12), (12, 4)]  # latent (height, width): 64x64, 32x96 and 96x32 px images
METHODS = ("eager", "whole model", "per block, automatic dynamic", "compile_blocks")


def inputs(model: MMDiT, batch: int, height: int, width: int):
    cfg = model.mmdit_config
    g = torch.Generator().manual_seed(height * 100 + width)
    return (torch.randn(batch, cfg.in_channels, height, width, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g), torch.randn(batch, cfg.pooled_dim, generator=g))


def train_pass(model, batch) -> float:
    started = time.perf_counter()
    model(*batch).square().mean().backward()
    return time.perf_counter() - started


class _LimitWarnings(logging.Handler):
    """Counts dynamo's "hit config.recompile_limit" warnings: past that limit it runs the function uncompiled."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.hits += "hit config." in record.getMessage()


def one_case(method: str, depth: int, batch_size: int, steps: int) -> dict:
    limit_warnings = _LimitWarnings()
    logging.getLogger("torch._dynamo").addHandler(limit_warnings)
    torch.manual_seed(0)
    model = MMDiT.from_preset("tiny", num_blocks=depth).train()
    forward = model
    if method == "whole model":
        forward = torch.compile(model)
    elif method == "per block, automatic dynamic":  # dynamo's default: static first, dynamic once a size changes
        for block in model.blocks:
            block.compile()
    elif method == "compile_blocks":
        model.compile_blocks()
    batches = [inputs(model, batch_size, h, w) for h, w in SIZES]
    first = [train_pass(forward, batch) for batch in batches]
    with torch.no_grad():
        started = time.perf_counter()
        forward(*batches[0])
        first.append(time.perf_counter() - started)
    for batch in batches:  # warm: every size once more
        train_pass(forward, batch)
    steady = min(sum(train_pass(forward, batch) for batch in batches) / len(batches) for _ in range(steps))
    return {"first_s": sum(first), "steady_s": steady, "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
            "limit_hit": limit_warnings.hits > 0}


def run_case(method: str, depth: int, batch_size: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="inductor_") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        out = subprocess.run([sys.executable, __file__, "--case", method, str(depth), "--batch", str(batch_size),
                              "--steps", str(steps)], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds over the sizes; the best is kept")
    parser.add_argument("--case", nargs=2, metavar=("METHOD", "DEPTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_case(args.case[0], int(args.case[1]), args.batch, args.steps)))
        return

    print(f"tiny preset, batch {args.batch}, sizes {SIZES} (latents), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")
    print("| blocks | method | compile s | graphs | gave up | step ms | vs eager |")
    print("|---:|---|---:|---:|---|---:|---:|")
    for depth in args.depths:
        results = {method: run_case(method, depth, args.batch, args.steps) for method in METHODS}
        eager = results["eager"]
        for method, r in results.items():
            compile_s = "-" if method == "eager" else f"{r['first_s'] - eager['first_s']:.1f}"
            graphs = "-" if method == "eager" else r["graphs"]
            gave_up = "-" if method == "eager" else ("yes" if r["limit_hit"] else "no")
            print(f"| {depth} | {method} | {compile_s} | {graphs} | {gave_up} | {r['steady_s'] * 1e3:.1f} "
                  f"| {eager['steady_s'] / r['steady_s']:.2f}x |")


if __name__ == "__main__":
    main()
