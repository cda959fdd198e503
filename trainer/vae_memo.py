"""The loader's memo of VAE posteriors: each image through the VAE encoder once, for data seen many epochs.

A loader rank encodes every batch online, so an image seen in 160 epochs (the demo: 360 images, 2400 steps
of 24) goes through the encoder 160 times, for the same posterior every time up to float rounding. The
memo keeps an image's posterior parameters (means and log-variances, 2C x h x w values) from its first
encoding, within ``data.vae_memo_mb``; later epochs draw its latent from the kept posterior, so the VAE's
sampling noise is still new every time and comes from the same generator stream as without the memo.

It is memory only: nothing is written, so the data still changes without re-encoding anything, and a
resumed run starts with an empty memo. Its latents then equal an uninterrupted run's up to float rounding
(the encoder's result for an image depends slightly on the batch it ran in), not bitwise.

When the budget is spent, the images already kept stay and the others are encoded each time they come:
under a shuffled epoch, evicting to admit new ones would hit no more often.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)


class VaeMemo:
    def __init__(self, budget_mb: float):
        self.budget_bytes = int(budget_mb * 2**20)
        self.kept_bytes = 0
        self.requested = 0  # images asked for
        self.encoded = 0  # of them, those that went through the encoder, kept or not
        self._kept: dict[str, torch.Tensor] = {}
        self._full = self.budget_bytes == 0

    def __len__(self) -> int:
        return len(self._kept)

    def posteriors(self, keys: Sequence[str], images: torch.Tensor,
                   encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The posterior parameters of ``images``, named by their ``keys`` (unique in an index), ``encode``-ing
        only the images not kept."""
        missing = [i for i, key in enumerate(keys) if key not in self._kept]
        self.requested += len(keys)
        self.encoded += len(missing)
        if len(missing) == len(keys):
            fresh = encode(images)
            for key, parameters in zip(keys, fresh):
                self._keep(key, parameters)
            return fresh
        fresh = dict(zip(missing, encode(images[missing]))) if missing else {}
        for i, parameters in fresh.items():
            self._keep(keys[i], parameters)
        return torch.stack([fresh[i] if i in fresh else self._kept[key] for i, key in enumerate(keys)])

    def _keep(self, key: str, parameters: torch.Tensor) -> None:
        if self._full:
            return
        size = parameters.numel() * parameters.element_size()
        if self.kept_bytes + size > self.budget_bytes:
            self._full = True
            log.warning("data.vae_memo_mb (%g MB) is full at %d images: the others are encoded every time they come",
                        self.budget_bytes / 2**20, len(self._kept))
            return
        self._kept[key] = parameters.clone()  # a view would keep its whole batch alive
        self.kept_bytes += size
