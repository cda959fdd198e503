"""AdamW step on the CPU: torch's default (a Python loop over the parameters) vs ``fused=True`` (one kernel),
in the same process, for the model ranks of the CPU demo and of the tests.

    .venv/bin/python benchmarks/adamw_cpu.py
    .venv/bin/python benchmarks/adamw_cpu.py --models demo mid-300m --steps 5
"""

from __future__ import annotations

import argparse
import time

import torch

from trainer.model import MMDiT

# The demo's model (configs/train/demo.yaml) and the tests' (two blocks).
MODELS = {
    "demo": ("tiny", {"max_res": 64, "max_res_orig": 64, "patch_size": 1, "text_len_per_encoder": 16}),
    "tests": ("tiny", {"num_blocks": 2, "max_res": 64, "max_res_orig": 64}),
    "mid-300m": ("mid-300m", {}),
}


def step_ms(model: torch.nn.Module, steps: int, **options) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, **options)
    for _ in range(3):  # the first steps allocate the moments
        optimizer.step()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo", "tests"], choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="one per rank, as torchrun's OMP_NUM_THREADS=1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'model':10}{'params':>12}{'tensors':>9}{'default ms':>12}{'fused ms':>10}{'ratio':>8}")
    for name in args.models:
        preset, overrides = MODELS[name]
        model = MMDiT.from_preset(preset, **overrides)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        default, fused = step_ms(model, args.steps), step_ms(model, args.steps, fused=True)
        print(f"{name:10}{sum(p.numel() for p in model.parameters()):>12,}{len(list(model.parameters())):>9}"
              f"{default:>12.2f}{fused:>10.2f}{default / fused:>7.2f}x")


if __name__ == "__main__":
    main()
