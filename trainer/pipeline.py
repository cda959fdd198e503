"""Text-to-image sampling from a checkpoint: load the model and the encoders once, generate many times.

    pipe = Pipeline.from_checkpoint("demo_data/runs/demo")
    images = pipe.generate("a red circle on a white background", steps=50, cfg=5.0, seed=0)
    images, frames = pipe.generate(["a blue square"], trajectory=True)  # frames[i]: image i's GIF frames

Every image carries its generation settings in ``image.info`` (prompt, seed, steps, cfg, sampler,
shift); with ``seed=-1`` a random seed is drawn and recorded there.
"""

from __future__ import annotations

import logging
import os
import secrets

import torch
from PIL import Image

from trainer.checkpoint import load_encoders_config, load_model, resolve_checkpoint
from trainer.encoders import Encoders
from trainer.model import MMDiT
from trainer.sampling import cfg_velocity, check_sampling, sample

log = logging.getLogger(__name__)


def check_size(width: int, height: int, multiple: int) -> None:
    """Image sides must be multiples of ``multiple`` (VAE downsampling x patch size: 16 for SD3-style models)."""
    for name, side in (("width", width), ("height", height)):
        if side < multiple or side % multiple:
            lower, upper = side // multiple * multiple, (side // multiple + 1) * multiple
            nearest = f"try {lower} or {upper}" if lower >= multiple else f"the smallest is {multiple}"
            raise ValueError(
                f"{name} {side} is not a positive multiple of {multiple} (VAE downsampling x patch size); {nearest}"
            )


def resolve_seed(seed: int) -> int:
    """``seed``, or for -1 a random one (which the images then record)."""
    return secrets.randbelow(2**31) if seed == -1 else seed


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB images."""
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(p) for p in pixels.permute(0, 2, 3, 1).cpu().numpy()]


class Pipeline:
    def __init__(self, model: MMDiT, encoders: Encoders, offload_text_encoders: bool = True):
        """``offload_text_encoders``: move them to the CPU after encoding the prompts (see ``generate``);
        not for encoders that another thread keeps encoding with."""
        cfg = model.mmdit_config
        expected = {
            "text_len": (cfg.text_len_per_encoder, encoders.config.text_len),
            "text_dim": (cfg.text_dim, encoders.config.text_dim),
            "pooled_dim": (cfg.pooled_dim, encoders.pooled_dim),
            "latent channels": (cfg.in_channels, encoders.latent_channels),
            "number of sequence encoders": (cfg.num_text_encoders, 2),
        }
        for what, (model_value, encoders_value) in expected.items():
            if model_value != encoders_value:
                raise ValueError(f"the model expects {what} {model_value} but the encoders give {encoders_value}")
        self.model, self.encoders, self.offload_text_encoders = model, encoders, offload_text_encoders
        self.size_multiple = encoders.downsampling * cfg.patch_size

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        prefer_ema: bool = True,
        encoders: Encoders | None = None,
    ) -> "Pipeline":
        """The model (EMA weights when present and preferred) and, unless given, the encoders recorded
        with the checkpoint, on ``device`` in ``dtype``."""
        step_dir = resolve_checkpoint(path)
        model = load_model(step_dir, prefer_ema=prefer_ema, device=device, dtype=dtype)
        if encoders is None:
            encoders = Encoders(load_encoders_config(step_dir), device=device, dtype=dtype)
        log.info("loaded %s (%s weights)", step_dir, "EMA" if prefer_ema and (step_dir / "ema").is_dir() else "model")
        return cls(model, encoders)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(
        self,
        prompts: str | list[str],
        steps: int = 50,
        cfg: float = 5.0,
        sampler: str = "euler",
        width: int = 512,
        height: int = 512,
        seed: int = -1,
        batch_size: int = 1,
        trajectory: bool = False,
        shift: float = 1.0,
    ):
        """``batch_size`` images per prompt, prompt after prompt. ``cfg`` is w in (1 + w) v_c - w v_u.
        Returns the images, or (images, frames) with ``trajectory=True``: frames[i] are image i's decoded
        intermediate steps, for a GIF.

        Prompt i samples from its own generator, seeded ``seed + i``, which each of its images records
        (``image.info``): ``generate(prompt, seed=that seed, batch_size=the same)`` makes them again, whatever
        other prompts were in the list."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        check_size(width, height, self.size_multiple)
        if not prompts or batch_size < 1:
            raise ValueError("give at least one prompt and a batch_size of at least 1")
        check_sampling(steps, sampler, shift)  # before minutes of text encoding, not after
        max_res = self.model.config.max_res
        if max(width, height) > 2 * max_res:
            log.warning("sampling %dx%d, over twice the model's max_res of %d px: a model asked for images far larger "
                        "than it trained on tends to repeat objects or lose the layout", width, height, max_res)
        seed = resolve_seed(seed)
        log.info("sampling with seed %d (prompt i: seed + i)", seed)

        text, pooled = self.encoders.encode_text(prompts)
        if self.offload_text_encoders:
            self.encoders.free_text_encoders()
        dtype = self.model.dtype
        latent_shape = (batch_size, self.encoders.latent_channels, height // self.encoders.downsampling, width // self.encoders.downsampling)

        images, frames = [], []
        for i, prompt in enumerate(prompts):
            velocity_fn = cfg_velocity(
                self.model,
                text[i : i + 1].expand(batch_size, -1, -1).to(self.device, dtype),  # encoders may sit elsewhere
                pooled[i : i + 1].expand(batch_size, -1).to(self.device, dtype),
                cfg,
            )
            generator = torch.Generator(self.device).manual_seed(seed + i)
            noise = torch.randn(latent_shape, generator=generator, device=self.device)
            steps_seen = []
            callback = (lambda x: steps_seen.append(x.cpu())) if trajectory else None
            latents = sample(velocity_fn, noise, steps, sampler=sampler, generator=generator, shift=shift, callback=callback)
            info = {"prompt": prompt, "seed": seed + i, "batch_size": batch_size, "steps": steps, "cfg": cfg,
                    "sampler": sampler, "shift": shift}
            for image in to_pil(self.encoders.decode_latents(latents)):
                image.info.update(info)
                images.append(image)
            if trajectory:
                per_step = [to_pil(self.encoders.decode_latents(x)) for x in steps_seen]
                frames += [[step[j] for step in per_step] for j in range(batch_size)]
        return (images, frames) if trajectory else images
