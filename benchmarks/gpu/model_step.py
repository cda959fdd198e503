"""Training-step throughput and MFU of the reference-1.2b MMDiT on one GPU (bf16 autocast, fused AdamW).

For 256 and 512 px images it times full training steps (rectified-flow loss with CFG dropout, backward,
optimizer step) for each variant: attention through SDPA as PyTorch picks it, SDPA held to cuDNN's
kernel, or flash-attn (when installed), activation checkpointing on/off, torch.compile (per block, with
dynamic shapes as the trainer does, or static) on/off, batch sizes, and prints a markdown table of
images/s, tokens/s, TFLOP/s and MFU. One row is also profiled: device time by category (matmul,
attention, fused elementwise, optimizer, other), the top kernels, and how much of the wall time the GPU
computed at all -- where the missing MFU goes. A variant that fails (out of memory, no flash-attn, a
compile error) is reported and the script goes on; it always exits 0. Model FLOPs are counted explicitly
(matmuls and attention, the formula is printed); MFU = model FLOPs per second / the GPU's dense bf16
peak, with recomputation not counted as useful work.

    python benchmarks/gpu/model_step.py --deadline-s 210   # H100/H200, the default rows that fit in 210 s
    python benchmarks/gpu/model_step.py --runs 512:48:sdpa+compile 512:48:cudnn+compile --profile 512:48:cudnn+compile
    python benchmarks/gpu/model_step.py --smoke            # CPU, tiny preset, 2 steps: checks the script runs
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without installing

from trainer.flow import CFGDropout, flow_loss  # noqa: E402
from trainer.model import MMDiT, MMDiTConfig, flash_attn_func  # noqa: E402

VAE_DOWNSAMPLE = 8
# Dense bf16 spec peaks; the first name contained in the device's name wins, so the PCIe and NVL parts
# (lower clocks) come before the SXM name they contain.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H800 PCIe": 756.0, "H200 NVL": 835.0, "H100": 989.0,
                    "H800": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}
# A row needs about this long at least (compiling its graphs, or the eager steps): one with less time left
# before --deadline-s is listed as skipped instead of being cut off by the caller's timeout.
MIN_ROW_S = {"compiled": 40.0, "eager": 10.0}

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


ATTENTIONS = ("sdpa", "cudnn", "flash")  # SDPA as PyTorch picks it, SDPA held to cuDNN's kernel, flash-attn


@dataclass(frozen=True)
class Run:
    """One table row, written RESOLUTION:BATCH:VARIANT, the variant an attention with optional +ckpt
    (activation checkpointing of attention and MLP), +compile (the trainer's torch.compile per block, with
    dynamic shapes) and +static (compiled for the one size instead): "512:32:sdpa+compile",
    "256:64:cudnn+ckpt+compile", "512:32:sdpa+compile+static"."""

    resolution: int
    batch: int
    attention: str
    checkpointing: bool
    compiled: bool
    static: bool = False

    @classmethod
    def parse(cls, spec: str) -> Run:
        try:
            resolution, batch, variant = spec.split(":")
            attention, *flags = variant.split("+")
            run = cls(int(resolution), int(batch), attention, "ckpt" in flags, "compile" in flags, "static" in flags)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{spec!r}: expected RESOLUTION:BATCH:ATTENTION[+ckpt][+compile[+static]]") from None
        if attention not in ATTENTIONS or set(flags) - {"ckpt", "compile", "static"}:
            raise argparse.ArgumentTypeError(f"{spec!r}: attention is one of {ATTENTIONS}, flags ckpt, compile, static")
        if run.static and not run.compiled:
            raise argparse.ArgumentTypeError(f"{spec!r}: static is a way to compile: it needs +compile")
        return run

    @property
    def name(self) -> str:
        return f"{self.attention}{' + ckpt' if self.checkpointing else ''}{' + compile' if self.compiled else ''}" \
               f"{' (static)' if self.static else ''}"

    @property
    def spec(self) -> str:
        return f"{self.resolution}:{self.batch}:{self.attention}{'+ckpt' if self.checkpointing else ''}" \
               f"{'+compile' if self.compiled else ''}{'+static' if self.static else ''}"


def default_runs(flash_installed: bool) -> list[Run]:
    """Eager baselines first (quick), then the compiled rows, the one closest to the MFU goal first, so a run
    cut short by its time limit still has the rows that matter."""
    specs = ["512:16:sdpa", "256:64:sdpa", "512:32:sdpa+compile", "512:32:sdpa+compile+static", "512:32:cudnn+compile"]
    specs += ["512:32:flash+compile"] if flash_installed else []
    specs += ["512:16:sdpa+compile", "512:32:sdpa+ckpt+compile", "256:64:sdpa+compile"]
    return [Run.parse(spec) for spec in specs]


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Kernel (or, on a CPU, operator) names -> what they compute; the first match wins.
KERNEL_CATEGORIES = (
    ("attention", re.compile(r"flash|fmha|sdpa|attention", re.I)),
    ("matmul", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|aten::(mm|addmm|bmm|baddbmm)$", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor", re.I)),
    ("fused by inductor", re.compile(r"^triton_")),
)


def kernel_breakdown(step, device: torch.device, steps: int = 3) -> str:
    """Where the time of `steps` training steps goes: device time per category and the top kernels, and on a
    GPU the share of wall time the GPU computed at all (the rest is launch overhead and waiting)."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    sync(device)
    start = time.perf_counter()
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            step()
        sync(device)
    wall_us = (time.perf_counter() - start) * 1e6
    events = [e for e in prof.key_averages() if (e.device_type == torch.autograd.DeviceType.CUDA) == (device.type == "cuda")]
    times = {e.key: (e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total, e.count) for e in events}
    total = sum(t for t, _ in times.values()) or 1.0
    by_category: dict[str, float] = {}
    for key, (t, _) in times.items():
        category = next((name for name, pattern in KERNEL_CATEGORIES if pattern.search(key)), "other")
        by_category[category] = by_category.get(category, 0.0) + t
    busy = f", device busy {100 * total / wall_us:.0f}% of the wall time" if device.type == "cuda" else ""
    lines = [f"Profile of {steps} steps: {total / steps / 1e3:.1f} ms of {'kernel' if device.type == 'cuda' else 'operator'} "
             f"time per step{busy}", "", "| category | share |", "|---|---:|"]
    lines += [f"| {name} | {100 * t / total:.1f}% |" for name, t in sorted(by_category.items(), key=lambda kv: -kv[1])]
    lines += ["", "| top kernels | calls per step | ms per step | share |", "|---|---:|---:|---:|"]
    for key, (t, count) in sorted(times.items(), key=lambda kv: -kv[1][0])[:12]:
        lines.append(f"| `{key[:90]}` | {count / steps:g} | {t / steps / 1e3:.2f} | {100 * t / total:.1f}% |")
    return "\n".join(lines)


def run_variant(args, run: Run, device: torch.device, profile_it: bool) -> dict:
    torch._dynamo.reset()  # each row compiles afresh: no recompilation limit reached by earlier rows
    with device:  # built in place: initialising 1.2B parameters on the CPU would take longer than the steps
        model = MMDiT.from_preset(args.preset, attention="flash" if run.attention == "flash" else "sdpa",
                                  checkpoint_attn=run.checkpointing, checkpoint_mlp=run.checkpointing).train()
    if run.compiled:
        model.compile_blocks(dynamic=not run.static)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    cfg = model.mmdit_config
    g = torch.Generator(device).manual_seed(0)
    latent = run.resolution // VAE_DOWNSAMPLE
    x0 = torch.randn(run.batch, cfg.in_channels, latent, latent, generator=g, device=device)
    text = torch.randn(run.batch, cfg.text_len, cfg.text_dim, generator=g, device=device)
    pooled = torch.randn(run.batch, cfg.pooled_dim, generator=g, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # SDPA's backend flags are global and read when a graph is traced, so compiled graphs are traced inside.
    def backends():
        return sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if run.attention == "cudnn" else contextlib.nullcontext()

    def step():
        with backends():
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                loss, _ = flow_loss(model, x0, text, pooled, generator=g, drop=CFGDropout())
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - started  # compilation included: what sizes the next run's time budget
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    tokens = (cfg.text_len + (latent // cfg.patch_size) ** 2) * run.batch
    flops = 3 * forward_flops(cfg, run.resolution, run.resolution) * run.batch
    return {"warmup_s": warmup_s, "step_s": seconds, "images_s": run.batch / seconds, "tokens_s": tokens / seconds,
            "tflops": flops / seconds / 1e12,
            "memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
            "profile": kernel_breakdown(step, device) if profile_it else None}


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
    parser.add_argument("--runs", type=Run.parse, nargs="+", help="rows RESOLUTION:BATCH:ATTENTION[+ckpt][+compile] "
                        "(default: see default_runs)")
    parser.add_argument("--profile", type=Run.parse, default=Run.parse("512:32:sdpa+compile"),
                        help="the row to profile after timing it (kernel time by category, top kernels)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak if the GPU is not known")
    parser.add_argument("--deadline-s", type=float, default=3600,
                        help="list the rows that cannot finish this many seconds after the start as skipped")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.deadline_s
    if args.smoke:
        args.preset, args.steps, args.warmup = "tiny", 2, 1
        args.runs = args.runs or [Run.parse("64:2:sdpa"), Run.parse("64:2:sdpa+ckpt")]
        args.profile = Run.parse("64:2:sdpa")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = peak_tflops(device, args.peak_tflops)
    flash_installed = flash_attn_func is not None and device.type == "cuda"
    runs = args.runs or default_runs(flash_installed)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    with torch.device("meta"):
        params = sum(p.numel() for p in MMDiT.from_preset(args.preset).parameters())
    print(f"# {args.preset} ({params:,} parameters) training step on {device_name}, torch {torch.__version__}, "
          f"flash-attn {'installed' if flash_attn_func is not None else 'not installed'}, "
          f"MFU against {f'{peak:g} TFLOP/s' if peak else 'no known peak (--peak-tflops)'}")
    print(FLOPS_FORMULA)
    if flash_installed:
        try:
            print(f"flash-attn vs SDPA, same weights and inputs, relative max difference: {flash_vs_sdpa_difference(args, device)}")
        except Exception as err:  # report and go on: the table is the point
            print(f"flash-attn vs SDPA comparison failed: {type(err).__name__}: {err}")
    header = ("\n| resolution | batch | variant | step s | images/s | tokens/s | TFLOP/s | MFU | peak memory GiB "
              "| warm-up s |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    print(header, flush=True)
    for run in runs:
        left = deadline - time.monotonic()
        if left < MIN_ROW_S["compiled" if run.compiled else "eager"]:
            print(f"| {run.resolution} | {run.batch} | {run.name} | skipped: {max(left, 0):.0f} s left of --deadline-s "
                  f"{args.deadline_s:g} | | | | | | |", flush=True)
            continue
        try:
            r = run_variant(args, run, device, profile_it=run == args.profile)
            mfu = f"{100 * r['tflops'] / peak:.1f}%" if peak else "n/a"
            print(f"| {run.resolution} | {run.batch} | {run.name} | {r['step_s']:.3f} | {r['images_s']:.1f} | "
                  f"{r['tokens_s']:,.0f} | {r['tflops']:.1f} | {mfu} | {r['memory_gib']:.1f} | {r['warmup_s']:.0f} |",
                  flush=True)
            if r["profile"]:  # printed at once: a run cut short by its time limit keeps it
                print(f"\n{run.spec}: {r['profile']}\n{header}", flush=True)
        except Exception as err:  # an optional variant failing must not hide the others
            reason = "out of memory" if isinstance(err, torch.OutOfMemoryError) else f"{type(err).__name__}: {err}"
            print(f"| {run.resolution} | {run.batch} | {run.name} | failed: {reason.splitlines()[0][:120]} | | | | | | |",
                  flush=True)
            traceback.print_exc(limit=-3, file=sys.stderr)  # where it failed; a full compile traceback runs to pages
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
