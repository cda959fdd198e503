"""Forward+backward time and peak memory of our MMDiT vs diffusers' SD3Transformer2DModel, same process.

Both at matched depth, width, heads, GELU x4 MLP, QK RMS-norm and token counts (image tokens from a
square latent, 2 x text_len text tokens); ours with absolute positions (as diffusers) and with RoPE-2D
(our default). CPU fp32 by default. Peak memory is what the step allocates on top of the weights
(activations + gradients), from the allocation events the torch profiler records.

    .venv/bin/python benchmarks/model_vs_diffusers.py                      # a few minutes on 2 cores
    .venv/bin/python benchmarks/model_vs_diffusers.py --dim 512 --heads 8 --blocks 8 --latent 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from diffusers import SD3Transformer2DModel
from torch.profiler import ProfilerActivity, profile

from trainer.model import MMDiT


def build(args):
    common = dict(patch_size=2, in_channels=16)
    ours = {
        name: MMDiT.from_preset("tiny", dim=args.dim, num_heads=args.heads, num_blocks=args.blocks, hidden_scale=4.0,
                                mlp="gelu", text_dim=args.text_dim, text_len_per_encoder=args.text_len,
                                pooled_dim=args.pooled_dim, positional_encoding=pe, max_res=args.latent * 8,
                                max_res_orig=args.latent * 8, attention="sdpa", **common)
        for name, pe in (("ours (absolute)", "absolute"), ("ours (rope2d)", "rope2d"))
    }
    diffusers_model = SD3Transformer2DModel(
        sample_size=args.latent, num_layers=args.blocks, attention_head_dim=args.dim // args.heads,
        num_attention_heads=args.heads, joint_attention_dim=args.text_dim, caption_projection_dim=args.dim,
        pooled_projection_dim=args.pooled_dim, out_channels=16, pos_embed_max_size=args.latent // 2,
        qk_norm="rms_norm", **common)
    return {"diffusers SD3Transformer2DModel": diffusers_model, **ours}


def step_fn(name, model, args):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 16, args.latent, args.latent, generator=g)
    text = torch.randn(args.batch, 2 * args.text_len, args.text_dim, generator=g)
    pooled = torch.randn(args.batch, args.pooled_dim, generator=g)
    t = torch.rand(args.batch, generator=g)
    if name.startswith("diffusers"):
        forward = lambda: model(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t * 1000, return_dict=False)[0]
    else:
        forward = lambda: model(x, t, text, pooled)

    def step():
        model.zero_grad(set_to_none=True)
        forward().square().mean().backward()

    return step


def peak_step_memory(step) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = json.load(open(trace.name))["traceEvents"]
    # Running sum of this step's allocations and frees: the profiler's own "Total Allocated" counter
    # also carries blocks allocated in earlier profiling sessions (another model's gradients).
    running, peak = 0, 0
    for event in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        running += event["args"]["Bytes"]
        peak = max(peak, running)
    return peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--latent", type=int, default=32, help="latent side (image tokens = (latent/2)^2)")
    parser.add_argument("--text-len", type=int, default=77, help="tokens per text encoder (2 encoders)")
    parser.add_argument("--text-dim", type=int, default=256)
    parser.add_argument("--pooled-dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    models = build(args)
    steps = {name: step_fn(name, model.train(), args) for name, model in models.items()}
    for step in steps.values():  # warm-up: first-call allocations and kernel selection
        step()
    times = {name: [] for name in steps}
    for _ in range(args.reps):  # interleaved so machine noise hits every model alike
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    memory = {name: peak_step_memory(step) for name, step in steps.items()}

    baseline = "diffusers SD3Transformer2DModel"
    # The fastest rep is the least disturbed by other work on the machine; the median is shown too.
    base_time = min(times[baseline])
    print(f"CPU fp32, {torch.get_num_threads()} threads; dim {args.dim}, {args.heads} heads, {args.blocks} blocks, GELU x4; "
          f"batch {args.batch}, {(args.latent // 2) ** 2} image + {2 * args.text_len} text tokens; {args.reps} interleaved reps")
    print("| model | parameters | fwd+bwd s (min) | fwd+bwd s (median) | time vs diffusers | peak step memory MiB | memory vs diffusers |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, model in models.items():
        fastest, median = min(times[name]), statistics.median(times[name])
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {params:,} | {fastest:.3f} | {median:.3f} | {fastest / base_time:.2f} | {memory[name] / 2**20:.0f} | "
              f"{memory[name] / memory[baseline]:.2f} |")


if __name__ == "__main__":
    main()
