r"""`sd3 eval`: FID (and a CLIP score) of a checkpoint's images for a prompt list, against reference images.

    sd3 eval --checkpoint demo_data/runs/demo --prompts prompts.txt --reference data/buckets/256 \
        --inception weights/weights-inception-2015-12-05-6726825d.pth --clip weights/clip-vit-base-patch32 \
        --out report.json

--prompts: one prompt per line. --reference: a folder of images, or a bucketed parquet shard or folder
of shards (an `image` column). --inception: the FID Inception-v3 weights file (needs torch-fidelity);
nothing is downloaded. --clip: a local transformers CLIP folder (model + processor), optional.
The report (JSON) holds fid, clip_score, image counts, reference rejections and the settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.sample_cli import DTYPES, add_generation_arguments, pick_device

DEFAULT_REFERENCE_IMAGES = 10_000  # trainer.evaluation's, restated: importing it would load torch for `sd3 --help`


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval", help="FID / CLIP score of a checkpoint against reference images", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="a step folder, or a checkpoint folder with 'latest'")
    parser.add_argument("--prompts", required=True, type=Path, help="text file, one prompt per line")
    parser.add_argument("--reference", required=True, type=Path, help="image folder, parquet shard or folder of shards")
    parser.add_argument("--out", required=True, type=Path, help="report JSON")
    parser.add_argument("--inception", type=Path, help="FID Inception-v3 weights: torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    parser.add_argument("--clip", type=Path, help="local CLIP folder for the CLIP score (skipped when absent)")
    parser.add_argument("--reference-images", type=int, default=DEFAULT_REFERENCE_IMAGES,
                        help="read at most this many reference images, spread over the set")
    add_generation_arguments(parser, seed=0, seed_help="fixed by default so reports compare; -1 draws one")
    parser.add_argument("--batch-size", type=int, default=1, help="images per prompt")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    # torch and the models load here, not at import, so the rest of `sd3` starts fast.
    from etl.config import ConfigError
    from etl.storage import CorruptShardError
    from trainer.checkpoint import CheckpointNotFoundError, resolve_checkpoint, write_text_atomic
    from trainer.evaluation import Evaluator, GenerationSettings, read_prompts
    from trainer.pipeline import Pipeline, check_size
    from trainer.sampling import check_sampling

    settings = GenerationSettings(steps=args.steps, cfg=args.cfg, sampler=args.sampler, width=args.width,
                                  height=args.height, seed=args.seed, batch_size=args.batch_size, shift=args.shift)
    try:
        # Settings first, then the feature networks, then the generator: a bad flag fails in seconds.
        device, dtype = pick_device(args.device, args.dtype)
        check_size(args.width, args.height, 16)
        check_sampling(args.steps, args.sampler, args.shift)
        if args.batch_size < 1:
            raise ValueError("--batch-size must be positive")
        step_dir = resolve_checkpoint(args.checkpoint)
        evaluator = Evaluator(read_prompts(args.prompts, "--prompts"), args.reference, inception=args.inception,
                              clip=args.clip, settings=settings, device=device, reference_images=args.reference_images)
        pipeline = Pipeline.from_checkpoint(step_dir, device=device, dtype=dtype, prefer_ema=not args.no_ema)
        report = {"checkpoint": str(step_dir), **evaluator.evaluate(pipeline)}
    except (CheckpointNotFoundError, ConfigError, CorruptShardError, ValueError, OSError) as err:
        print(f"sd3 eval: {err}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
    clip = "" if report["clip_score"] is None else f", CLIP score {report['clip_score']:.2f}"
    print(f"FID {report['fid']:.3f}{clip} over {report['generated']} images; wrote {args.out}")
    return 0
