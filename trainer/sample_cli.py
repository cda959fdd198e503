r"""`sd3 sample`: images (and a GIF of the denoising) from a checkpoint.

    sd3 sample --checkpoint demo_data/runs/demo --prompt "a red circle on a white background" \
        --steps 50 --cfg 5 --width 512 --height 512 --seed -1 --out img.png --gif traj.gif

With --batch-size N > 1 the images go to img_0.png ... img_{N-1}.png (and traj_0.gif ...). Each PNG
records its prompt, seed and sampler settings as text chunks; the seed is also printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The names of trainer.sampling.SAMPLERS (a test keeps them equal): importing it here would load torch
# for every `sd3` command.
SAMPLERS = ("euler", "euler_stochastic", "heun")
DTYPES = ("float32", "bfloat16", "float16")


def add_generation_arguments(parser: argparse.ArgumentParser, seed: int, seed_help: str) -> None:
    """The sampling settings `sd3 sample` and `sd3 eval` share."""
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=5.0, help="guidance w in (1 + w) v_cond - w v_uncond; 0 = none")
    parser.add_argument("--sampler", choices=SAMPLERS, default="euler")
    parser.add_argument("--shift", type=float, default=1.0, help="SD3 timestep shift (1 = none)")
    parser.add_argument("--width", type=int, default=512, help="a multiple of 16")
    parser.add_argument("--height", type=int, default=512, help="a multiple of 16")
    parser.add_argument("--seed", type=int, default=seed, help=seed_help)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sample", help="generate images from a checkpoint", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="a step folder, or a checkpoint folder with 'latest'")
    parser.add_argument("--prompt", required=True)
    add_generation_arguments(parser, seed=-1, seed_help="-1 draws a random seed (printed)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out", required=True, type=Path, help="image path; img.png -> img_0.png ... for a batch")
    parser.add_argument("--gif", type=Path, help="also write the denoising trajectory as a GIF")
    parser.add_argument("--gif-fps", type=float, default=10.0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    parser.set_defaults(func=run)
    return parser


def pick_device(requested: str | None, dtype: str | None):
    """The torch device and dtype to generate on: cuda (bfloat16) when available unless told otherwise."""
    import torch

    try:
        device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise ValueError(f"--device {requested}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested}: this machine has no usable CUDA device (torch {torch.__version__})")
    return device, getattr(torch, dtype or ("bfloat16" if device.type == "cuda" else "float32"))


def numbered(path: Path, count: int) -> list[Path]:
    """``path`` for one output, ``stem_0.ext`` ... ``stem_{count-1}.ext`` for several."""
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(count)]


def _image_format(path: Path, flag: str) -> str:
    from PIL import Image

    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{flag} {path}: unknown image extension (use .png)")
    return fmt


def run(args) -> int:
    # torch and the models load here, not at import, so the rest of `sd3` starts fast.
    from PIL.PngImagePlugin import PngInfo

    from etl.config import ConfigError
    from etl.storage import write_atomic
    from trainer.checkpoint import CheckpointNotFoundError
    from trainer.pipeline import Pipeline, check_size
    from trainer.sampling import check_sampling

    try:
        device, dtype = pick_device(args.device, args.dtype)
        # Fail on a bad setting before spending minutes loading a 2B text encoder.
        check_size(args.width, args.height, 16)
        check_sampling(args.steps, args.sampler, args.shift)
        out_format = _image_format(args.out, "--out")
        if args.gif is not None and _image_format(args.gif, "--gif") != "GIF":
            raise ValueError(f"--gif {args.gif}: the trajectory is a GIF; name it .gif")
        if args.batch_size < 1 or args.gif_fps <= 0:
            raise ValueError("--batch-size and --gif-fps must be positive")
        pipeline = Pipeline.from_checkpoint(args.checkpoint, device=device, dtype=dtype, prefer_ema=not args.no_ema)
        result = pipeline.generate(
            args.prompt, steps=args.steps, cfg=args.cfg, sampler=args.sampler, width=args.width,
            height=args.height, seed=args.seed, batch_size=args.batch_size, trajectory=args.gif is not None,
            shift=args.shift,
        )
    except (CheckpointNotFoundError, ConfigError, ValueError, OSError) as err:
        print(f"sd3 sample: {err}", file=sys.stderr)
        return 1
    images, frames = result if args.gif is not None else (result, [])

    for image, path in zip(images, numbered(args.out, len(images))):
        text = PngInfo()
        for key, value in image.info.items():
            text.add_text(key, str(value))
        write_atomic(path, lambda f: image.save(f, format=out_format, **({"pnginfo": text} if out_format == "PNG" else {})))
        print(f"wrote {path}")
    if args.gif is not None:
        duration = round(1000 / args.gif_fps)
        for image_frames, path in zip(frames, numbered(args.gif, len(frames))):
            write_atomic(path, lambda f: image_frames[0].save(
                f, format="GIF", save_all=True, append_images=image_frames[1:], duration=duration, loop=0
            ))
            print(f"wrote {path} ({len(image_frames)} frames)")
    print(f"seed {images[0].info['seed']}")
    return 0
