"""FID and CLIP score of images generated from a checkpoint, against a reference set of real images.

    evaluator = Evaluator(read_prompts("prompts.txt", "--prompts"), "buckets/256", inception="weights/weights-inception-2015-12-05-6726825d.pth")
    report = evaluator.evaluate(Pipeline.from_checkpoint("demo_data/runs/demo"))  # {"fid": ..., ...}

FID is torchmetrics' ``FrechetInceptionDistance``: the FID Inception-v3 of torch-fidelity with weights
read from a local file (``weights-inception-2015-12-05-6726825d.pth``, the file torch-fidelity, and so
torchmetrics, downloads from torch-fidelity's releases; nothing is downloaded here), or any feature module
given in code. The reference features come from at most ``reference_images`` images (10,000 by default)
spread over the set, computed once per ``Evaluator`` and kept, so evaluating every N training steps only
pays for the generated images. The CLIP score (100 x the cosine of image and prompt embeddings, each
pair floored at 0 as the CLIPScore paper defines it; torchmetrics floors the mean) needs a local
transformers CLIP folder (model + processor).

Reference sets: a folder of image files, or bucketed parquet (a shard, or a folder of shards) with an
``image`` column of encoded bytes. An image that cannot be decoded is counted with its reason, never
dropped silently.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from etl.images import ImageRejected, decode, open_image, to_rgb
from etl.storage import VERIFY, CorruptShardError
from trainer.pipeline import resolve_seed

INCEPTION_SIZE = 299  # the FID Inception's input side
INCEPTION_FEATURES = 2048  # its pool3 features, the standard FID layer
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
FEATURE_BATCH = 32
# Prompts generated at a time: all of FID-10k's at once would hold their text embeddings on the GPU (7 GB
# in bf16 at the reference's 154 x 2304) and their images in host memory (8 GB at 512 px).
GENERATE_PROMPTS = 256
# Reference images an evaluation reads at most, spread over the set: FID-10k's size. A whole bucketed
# dataset would take hours to decode, and in training the other ranks wait (topology.timeout_s).
DEFAULT_REFERENCE_IMAGES = 10_000


class EvalSetupError(ValueError):
    """A setting that makes the evaluation impossible; the message names the setting."""


@dataclass(frozen=True)
class GenerationSettings:
    """What ``Pipeline.generate`` gets; a fixed seed by default so two evaluations compare like with like."""

    steps: int = 50
    cfg: float = 5.0
    sampler: str = "euler"
    width: int = 512
    height: int = 512
    seed: int = 0
    batch_size: int = 1  # images per prompt
    shift: float = 1.0


def read_prompts(path: str | os.PathLike, setting: str) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise EvalSetupError(f"{setting}: prompts file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise EvalSetupError(f"{setting}: {path} holds no prompt (one per line)")
    return prompts


def _decoded(data: bytes | None) -> Image.Image | ImageRejected:
    if data is None:
        return ImageRejected("undecodable", "null image")
    try:
        return to_rgb(decode(open_image(data)))
    except ImageRejected as rejected:
        return rejected


def _shard_row_groups(path: Path) -> list[int]:
    """Rows per row group of a reference shard, from its footer alone (the file is not kept open)."""
    try:
        metadata = pq.read_metadata(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise CorruptShardError(f"cannot read parquet file {path}: {err}") from err
    names = metadata.schema.to_arrow_schema().names
    if "image" not in names:
        raise EvalSetupError(f"{path}: no 'image' column (columns: {', '.join(names)})")
    return [metadata.row_group(group).num_rows for group in range(metadata.num_row_groups)]


def _row_group_images(path: Path, group: int) -> Iterator[Image.Image | ImageRejected]:
    try:
        with pq.ParquetFile(path, **VERIFY) as shard:
            for batch in shard.iter_batches(columns=["image"], batch_size=FEATURE_BATCH, row_groups=[group]):
                for data in batch.column("image").to_pylist():
                    yield _decoded(data)
    except (pa.ArrowInvalid, OSError) as err:
        raise CorruptShardError(f"cannot read parquet file {path}: {err}") from err


def spread(count: int, wanted: int) -> list[int]:
    """``wanted`` indices of range(count) evenly apart (all of them when there are no more)."""
    if count <= wanted:
        return list(range(count))
    return [i * count // wanted for i in range(wanted)]


def _parquet_images(shards: list[Path], limit: int | None) -> Iterator[Image.Image | ImageRejected]:
    # Whole row groups, spread over every shard: bucketed shards are sorted by bucket, so the first groups
    # would all be one aspect ratio, and a row here and there would read a whole group (~8 MiB) per image.
    # Footers only up front: a dataset's thousands of shards would otherwise all be open at once.
    groups = [(path, group, rows) for path in shards for group, rows in enumerate(_shard_row_groups(path))]
    total = sum(rows for *_, rows in groups)
    if limit is not None and total > limit:
        groups = [groups[i] for i in spread(len(groups), -(-limit * len(groups) // total))]
    for path, group, _ in groups:
        yield from _row_group_images(path, group)


def iter_reference(source: str | os.PathLike, setting: str = "--reference",
                   limit: int | None = None) -> Iterator[Image.Image | ImageRejected]:
    """The reference images as RGB, or the rejection of one that cannot be used, in a stable order. With
    ``limit``, about that many spread evenly over the set (whole row groups of parquet shards); the
    caller stops at ``limit`` usable ones."""
    source = Path(source)
    if source.is_file() and source.suffix == ".parquet":
        yield from _parquet_images([source], limit)
        return
    if not source.is_dir():
        raise EvalSetupError(f"{setting}: {source} is neither a folder nor a .parquet file")
    shards = sorted(source.rglob("*.parquet"))
    if shards:
        yield from _parquet_images(shards, limit)
        return
    image_suffixes = set(Image.registered_extensions())
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in image_suffixes)
    if not files:
        raise EvalSetupError(f"{setting}: {source} holds no parquet shard and no image file")
    for i in spread(len(files), limit if limit is not None else len(files)):
        yield _decoded(files[i].read_bytes())


def _centre_square(image: Image.Image) -> Image.Image:
    # Cropped before resizing: ImageOps.fit resizes from a box and so blends in pixels outside the square.
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def to_batch(images: list[Image.Image], size: int) -> torch.Tensor:
    """(N, 3, size, size) uint8: each image's centre square, resized with PIL's bicubic filter. Feature
    networks take one square size. Cropping rather than squashing, as text-to-image FID on COCO does, keeps
    the shapes of the buckets' wide and tall images; a square generated image is only resized."""
    pixels = np.stack([np.asarray(_centre_square(im).convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
                       for im in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def build_fid(inception: str | os.PathLike | None, setting: str, feature_extractor: torch.nn.Module | None = None):
    """torchmetrics' FID that keeps the reference features across ``reset()``. Without ``feature_extractor``
    the FID Inception is loaded from the local file ``inception``; a missing file is an error naming
    ``setting``. A custom extractor takes uint8 (N, 3, S, S) and returns (N, features)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ModuleNotFoundError as err:  # torch-fidelity installed without a torchvision that imports
        raise EvalSetupError(f"cannot import torchmetrics' FID ({err}): torch-fidelity needs a torchvision "
                             "built for this torch; install it or uninstall torch-fidelity") from err
    # One process holds every feature it scores. torchmetrics would otherwise gather its states over the
    # WORLD group at compute(): in training only model rank 0 evaluates, so it would wait on ranks that never
    # join, until the collective timeout.
    local = {"reset_real_features": False, "sync_on_compute": False}
    if feature_extractor is not None:
        return FrechetInceptionDistance(feature=feature_extractor, **local)
    if inception is None:
        raise EvalSetupError(
            f"{setting}: FID needs the FID Inception-v3 weights as a local file ({INCEPTION_FILE}, which "
            "torch-fidelity downloads); nothing is downloaded here"
        )
    path = Path(inception)
    if not path.is_file():
        raise EvalSetupError(f"{setting}: Inception weights file {path} does not exist (expected {INCEPTION_FILE})")
    # torch-fidelity unpickles the file without restriction; reading it here first with
    # weights_only=True refuses any file that holds more than tensors before that unrestricted load runs.
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises anything from UnpicklingError to RuntimeError on a bad file
        raise EvalSetupError(f"{setting}: {path} is not a plain tensor state dict: {err}") from err
    try:
        return FrechetInceptionDistance(feature=INCEPTION_FEATURES, feature_extractor_weights_path=str(path), **local)
    except ModuleNotFoundError as err:
        raise EvalSetupError(
            f"{setting}: the FID Inception needs torch-fidelity with a torchvision built for this torch "
            f"({err}); install both, or evaluate on a machine that has them"
        ) from err


class ClipScorer:
    """CLIP score of images against their prompts with a local transformers CLIP folder.

    Written here rather than torchmetrics' CLIPScore: torchmetrics 1.9 expects ``get_image_features`` to
    return a tensor, and transformers 5 returns a model output there."""

    def __init__(self, path: str | os.PathLike, setting: str, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        path = Path(path)
        if not path.is_dir():
            raise EvalSetupError(f"{setting}: CLIP folder {path} does not exist")
        try:
            self.model = CLIPModel.from_pretrained(path).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise EvalSetupError(f"{setting}: cannot load a CLIP model and processor from {path}: {err}") from err
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def scores(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True,
                                max_length=self.max_tokens)
        out = self.model(**inputs.to(self.model.device))
        cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
        # Each pair floored at 0, as the CLIPScore paper defines it (torchmetrics floors the mean instead).
        return 100 * cosine.clamp(min=0).cpu()


class Evaluator:
    """Loads the feature networks and checks the settings once; ``evaluate(pipeline)`` any number of times.

    ``setting_prefix`` is how errors name the settings: ``--`` for the command line (``--inception``),
    ``log.eval_`` for the training config (``log.eval_inception``)."""

    def __init__(
        self,
        prompts: list[str],
        reference: str | os.PathLike,
        inception: str | os.PathLike | None = None,
        clip: str | os.PathLike | None = None,
        settings: GenerationSettings = GenerationSettings(),
        device: str | torch.device = "cpu",
        feature_extractor: torch.nn.Module | None = None,
        feature_size: int = INCEPTION_SIZE,
        setting_prefix: str = "--",
        reference_images: int | None = DEFAULT_REFERENCE_IMAGES,
    ):
        if not prompts:
            raise EvalSetupError("give at least one prompt")
        if len(prompts) * settings.batch_size < 2:
            raise EvalSetupError(f"FID needs at least 2 generated images: give two prompts or a batch size of 2 "
                                 f"(got {len(prompts)} prompt(s) x batch size {settings.batch_size})")
        self.prompts, self.settings, self.device = list(prompts), settings, torch.device(device)
        self.reference, self.setting_prefix = Path(reference), setting_prefix
        if not self.reference.exists():
            raise EvalSetupError(f"{setting_prefix}reference: {self.reference} does not exist")
        if reference_images is not None and reference_images < 2:
            raise EvalSetupError(f"{setting_prefix}reference_images: FID needs at least 2, got {reference_images}")
        self.feature_size, self.reference_images = feature_size, reference_images
        self.fid = build_fid(inception, f"{setting_prefix}inception", feature_extractor).to(self.device)
        self.feature_name = "custom" if feature_extractor is not None else f"inception-v3 ({Path(inception).name})"
        self.clip = ClipScorer(clip, f"{setting_prefix}clip", self.device) if clip is not None else None
        self.clip_name = None if clip is None else str(clip)
        self.reference_counts: dict | None = None

    def _add_reference(self) -> None:
        self._drop_reference()  # what an earlier, failed pass added
        rejected, used, batch = Counter(), 0, []
        limit = self.reference_images
        for item in iter_reference(self.reference, f"{self.setting_prefix}reference", limit):
            if isinstance(item, ImageRejected):
                rejected[item.reason] += 1
                continue
            batch.append(item)
            if len(batch) == FEATURE_BATCH:
                used += self._update(batch, real=True)
                batch = []
            if limit is not None and used + len(batch) == limit:
                break
        if batch:
            used += self._update(batch, real=True)
        if used < 2:
            raise EvalSetupError(f"{self.setting_prefix}reference: FID needs at least 2 usable reference images, "
                                 f"{self.reference} gave {used} (rejected: {dict(rejected) or 'none'})")
        self.reference_counts = {"used": used, "rejected": dict(rejected), "limit": limit}

    def _drop_reference(self) -> None:
        self.fid.reset_real_features = True
        self.fid.reset()
        self.fid.reset_real_features = False

    @torch.no_grad()
    def _update(self, images: list[Image.Image], real: bool) -> int:
        self.fid.update(to_batch(images, self.feature_size).to(self.device), real=real)
        return len(images)

    def evaluate(self, pipeline) -> dict:
        """Generate the prompts' images with ``pipeline`` (a ``trainer.pipeline.Pipeline``) and score them."""
        if self.reference_counts is None:
            self._add_reference()
        settings = asdict(self.settings)
        settings["seed"] = resolve_seed(settings["seed"])  # one seed for the whole set, as one generate() call
        self.fid.reset()  # drops the previous generated features only
        generated, scores = 0, []
        for first in range(0, len(self.prompts), GENERATE_PROMPTS):
            # Prompt i is seeded seed + i, chunk or not: the images are those of one call.
            images = pipeline.generate(self.prompts[first : first + GENERATE_PROMPTS],
                                       **settings | {"seed": settings["seed"] + first})
            for start in range(0, len(images), FEATURE_BATCH):
                batch = images[start : start + FEATURE_BATCH]
                self._update(batch, real=False)
                if self.clip is not None:
                    scores.append(self.clip.scores(batch, [image.info["prompt"] for image in batch]))
            generated += len(images)
        return {
            "fid": float(self.fid.compute()),
            "clip_score": float(torch.cat(scores).mean()) if scores else None,
            "generated": generated,
            "prompts": len(self.prompts),
            "reference": {"source": str(self.reference), **self.reference_counts},
            "features": self.feature_name,
            "clip_model": self.clip_name,
            "settings": settings,
        }
