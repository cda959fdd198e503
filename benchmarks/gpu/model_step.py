"""Training-step throughput and MFU of the reference-1.2b MMDiT on one GPU (bf16 autocast, fused AdamW).

For 256 and 512 px images it times full training steps (rectified-flow loss with CFG dropout, backward,
optimizer step) for each variant: SDPA vs flash-attn (when installed), activation checkpointing on/off,
torch.compile (per block) on/off, and prints a markdown table of images/s, tokens/s, TFLOP/s and MFU.
A variant that fails (out of memory, no flash-attn, a compile error) is reported and the script goes on;
it always exits 0. Model FLOPs are counted explicitly (matmuls and attention, the formula is printed);
MFU = model FLOPs per second / the GPU's dense bf16 peak, with recomputation not counted as useful work.

    python benchmarks/gpu/model_step.py                    # H100/H200, under 5 minutes
    python benchmarks/gpu/model_step.py --smoke            # CPU, tiny preset, 2 steps: checks the script runs
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without installing

from trainer.flow import CFGDropout, flow_loss  # noqa: E402
from trainer.model import MMDiT, MMDiTConfig, flash_attn_func  # noqa: E402

VAE_DOWNSAMPLE = 8
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}

FLOPS_FORMULA = """forward FLOPs per image, 2 per multiply-add, matmuls and attention (what torch's FlopCounterMode
counts); N image tokens, T text tokens, d dim, h MLP hidden, m = 3 (SwiGLU) or 2 (GELU) matrices, C channels,
p patch; the adaLN modulations act once per image, the last block's text stream has keys and values only:
  each block but the last   2*(N+T)*(3d*d + d*d + m*d*h) + 4*(N+T)^2*d + 2*(6d*d + 6d*d)
  last block                2*N*(3d*d + d*d + m*d*h) + 2*T*2d*d + 4*N*(N+T)*d + 2*(6d*d + 2d*d)
  embeddings and output     2*N*C*p^2*d + 2*T*text_dim*d + 2*(256*d + d*d) + 2*(pooled*d + d*d) + 2*2d*d + 2*N*d*C*p^2
training step = 3 x forward (backward = 2 x forward); activation recomputation is not counted"""


def forward_flops(cfg: MMDiTConfig, height: int, width: int) -> int:
    """Model FLOPs of one forward pass for one image of height x width pixels (the formula above)."""
    n = (height // (VAE_DOWNSAMPLE * cfg.patch_size)) * (width // (VAE_DOWNSAMPLE * cfg.patch_size))
    t, d = cfg.text_len, cfg.dim
    per_token = 3 * d * d + d * d + (3 if cfg.mlp == "swiglu" else 2) * d * int(cfg.dim * cfg.hidden_scale)
    full_block = 2 * (n + t) * per_token + 4 * (n + t) ** 2 * d + 2 * (6 * d * d + 6 * d * d)
    last_block = 2 * n * per_token + 2 * t * 2 * d * d + 4 * n * (n + t) * d + 2 * (6 * d * d + 2 * d * d)
    patch = cfg.in_channels * cfg.patch_size**2
    embeddings = 2 * n * patch * d + 2 * t * cfg.text_dim * d + 2 * (256 * d + d * d) + 2 * (cfg.pooled_dim * d + d * d)
    output = 2 * 2 * d * d + 2 * n * d * patch
    return (cfg.num_blocks - 1) * full_block + last_block + embeddings + output


@dataclass
class Variant:
    attention: str
    checkpointing: bool
    compiled: bool

    @property
    def name(self) -> str:
        return f"{self.attention}{' + ckpt' if self.checkpointing else ''}{' + compile' if self.compiled else ''}"


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def run_variant(args, variant: Variant, resolution: int, batch: int, device: torch.device) -> dict:
    with device:  # built in place: initialising 1.2B parameters on the CPU would take longer than the steps
        model = MMDiT.from_preset(args.preset, attention=variant.attention, checkpoint_attn=variant.checkpointing,
                                  checkpoint_mlp=variant.checkpointing).train()
    if variant.compiled:
        for block in model.blocks:  # per-block compilation: identical blocks share one compiled graph
            block.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    cfg = model.mmdit_config
    g = torch.Generator(device).manual_seed(0)
    latent = resolution // VAE_DOWNSAMPLE
    x0 = torch.randn(batch, cfg.in_channels, latent, latent, generator=g, device=device)
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g, device=device)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss, _ = flow_loss(model, x0, text, pooled, generator=g, drop=CFGDropout())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    tokens = (cfg.text_len + (latent // cfg.patch_size) ** 2) * batch
    flops = 3 * forward_flops(cfg, resolution, resolution) * batch
    return {"step_s": seconds, "images_s": batch / seconds, "tokens_s": tokens / seconds, "tflops": flops / seconds / 1e12,
            "memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")}


def flash_vs_sdpa_difference(args, device: torch.device) -> str:
    """Max |v_flash - v_sdpa| / max |v_sdpa| for one forward with the same weights and inputs."""
    with device:
        model = MMDiT.from_preset(args.preset, attention="sdpa").eval()
    with torch.no_grad():
        for p in model.parameters():  # random gates: at init the output is exactly 0
            p.add_(0.02 * torch.randn_like(p))
    cfg = model.mmdit_config
    x = torch.randn(2, cfg.in_channels, 32, 32, device=device)
    inputs = (x, torch.rand(2, device=device), torch.randn(2, cfg.text_len, cfg.text_dim, device=device),
              torch.randn(2, cfg.pooled_dim, device=device))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        v_sdpa = model(*inputs).float()
        for block in model.blocks:
            block.attention_backend = "flash"
        v_flash = model(*inputs).float()
    return f"{((v_flash - v_sdpa).abs().max() / v_sdpa.abs().max()).item():.2e}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset, 64 px, 2 steps, no compile")
    parser.add_argument("--preset", default="reference-1.2b")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 16], help="batch per resolution")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak if the GPU is not known")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.resolutions, args.batch, args.steps, args.warmup, args.no_compile = "tiny", [64], [2], 2, 1, True
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = peak_tflops(device, args.peak_tflops)

    attentions = ["sdpa"] + (["flash"] if flash_attn_func is not None and device.type == "cuda" else [])
    eager = [Variant(a, False, False) for a in attentions] + [Variant(attentions[-1], True, False)]
    compiled = [] if args.no_compile else [Variant(a, False, True) for a in attentions] + [Variant(attentions[-1], True, True)]
    # every eager variant first: if compilation is slow and the run is cut short, those rows are in
    runs = [(r, b, v) for group in (eager, compiled) for r, b in zip(args.resolutions, args.batch) for v in group]

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    with torch.device("meta"):
        params = sum(p.numel() for p in MMDiT.from_preset(args.preset).parameters())
    print(f"# {args.preset} ({params:,} parameters) training step on {device_name}, torch {torch.__version__}, "
          f"flash-attn {'installed' if flash_attn_func is not None else 'not installed'}")
    print(FLOPS_FORMULA)
    if "flash" in attentions:
        try:
            print(f"flash-attn vs SDPA, same weights and inputs, relative max difference: {flash_vs_sdpa_difference(args, device)}")
        except Exception as err:  # report and go on: the table is the point
            print(f"flash-attn vs SDPA comparison failed: {type(err).__name__}: {err}")
    print()
    print("| resolution | batch | variant | step s | images/s | tokens/s | TFLOP/s | MFU | peak memory GiB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for resolution, batch, variant in runs:
        try:
            r = run_variant(args, variant, resolution, batch, device)
            mfu = f"{100 * r['tflops'] / peak:.1f}%" if peak else "n/a"
            print(f"| {resolution} | {batch} | {variant.name} | {r['step_s']:.3f} | {r['images_s']:.1f} | "
                  f"{r['tokens_s']:,.0f} | {r['tflops']:.1f} | {mfu} | {r['memory_gib']:.1f} |", flush=True)
        except Exception as err:  # an optional variant failing must not hide the others
            reason = "out of memory" if isinstance(err, torch.OutOfMemoryError) else f"{type(err).__name__}: {err}"
            print(f"| {resolution} | {batch} | {variant.name} | failed: {reason.splitlines()[0][:120]} | | | | | |", flush=True)
            traceback.print_exc(file=sys.stderr)
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
