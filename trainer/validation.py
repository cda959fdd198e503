"""Validation loss on held-out images, at fixed timesteps with fixed noise: a loss curve whose only noise is
the model's, comparable between runs (SD3's paper tracks it because it follows sample quality).

The split is a hash of each image's key, never of the seed or the row order, so every run, seed and
topology holds out the same images, and a key held out in one version of the index stays held out as the
index grows. The validation set is the held-out images with the smallest hashes, up to ``log.val_images``,
cut into batches of one bucket each and dealt round-robin to the model ranks. Loader ranks encode them
once per launch and send them ahead of the training batches (a colocated rank encodes its own).

A validation image is noised with one fixed noise (from its key hash) at each of ``log.val_timesteps``
evenly spaced t, with every condition kept (no CFG dropout), so the loss is a function of the weights
alone; each model rank sums its share and the sums are all-reduced in float64.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.flow import add_noise, velocity_target

_U64 = np.uint64


def key_hashes(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A uint64 per key: FNV-1a over its UTF-8 bytes, then murmur3's finaliser so the top bits are mixed.

    Hand-written because the split must never move: polars' hash is documented as unstable across versions,
    pyarrow has no string hash, and hashlib in a Python loop costs ~1 us a key (25 s on 25M keys). Numpy
    runs one pass per byte position over all keys at once."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    keys = keys.cast(pa.large_string())
    if keys.null_count:
        raise ValueError("the index holds null keys: rebuild it")
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int64)[keys.offset : keys.offset + len(keys) + 1]
    data = np.frombuffer(keys.buffers()[2], dtype=np.uint8) if keys.buffers()[2] is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(len(keys), 0xCBF29CE484222325, dtype=_U64)
    with np.errstate(over="ignore"):
        shortest, longest = (int(lengths.min()), int(lengths.max())) if len(keys) else (0, 0)
        for position in range(longest):
            if position < shortest:  # every key has this byte: no masking
                h = (h ^ data[starts + position]) * _U64(0x100000001B3)
            else:
                live = np.flatnonzero(lengths > position)
                h[live] = (h[live] ^ data[starts[live] + position]) * _U64(0x100000001B3)
        h ^= h >> _U64(33)
        h *= _U64(0xFF51AFD7ED558CCD)
        h ^= h >> _U64(33)
        h *= _U64(0xC4CEB9FE1A85EC53)
        h ^= h >> _U64(33)
    return h


def held_out(index: pa.Table, fraction: float) -> np.ndarray:
    """Bool per index row: its key's hash falls in the lowest ``fraction`` of the uint64 range."""
    if fraction <= 0:
        return np.zeros(index.num_rows, dtype=bool)
    return key_hashes(index["key"]) < _U64(min(int(fraction * 2.0**64), 2**64 - 1))


def split_holdout(index: pa.Table, fraction: float) -> tuple[pa.Table, pa.Table]:
    """(the rows to train on, the held-out rows)."""
    mask = held_out(index, fraction)
    return index.filter(pa.array(~mask)), index.filter(pa.array(mask))


@dataclass(frozen=True)
class ValidationPlan:
    """The validation batches: rows of the held-out index, one bucket per batch, and each row's key hash."""

    index: pa.Table  # the held-out rows
    batches: list[list[int]]
    hashes: np.ndarray  # per held-out index row
    fingerprint: str  # names the set of images (their keys), for the logs

    @property
    def num_images(self) -> int:
        return sum(len(b) for b in self.batches)

    def shares(self, model_ranks: list[int]) -> dict[int, list[int]]:
        """{global model rank: the batch numbers it evaluates}, dealt round-robin in model-rank order."""
        return {rank: list(range(i, len(self.batches), len(model_ranks))) for i, rank in enumerate(model_ranks)}

    def validation_set(self, batch_ids: list[int], encoded: list[dict[str, torch.Tensor]], timesteps: int) -> ValidationSet:
        """A model rank's ``ValidationSet``: its batches ``batch_ids``, ``encoded`` in that order."""
        return ValidationSet(encoded, [self.hashes[self.batches[i]] for i in batch_ids], evenly_spaced_t(timesteps))


def plan_validation(val_index: pa.Table, images: int, batch_size: int) -> ValidationPlan:
    """The ``images`` held-out rows with the smallest key hashes, by bucket, in batches of ``batch_size``."""
    if val_index.num_rows == 0:
        raise ValueError("no image is held out for validation: raise data.holdout_fraction (or use more data)")
    hashes = key_hashes(val_index["key"])
    chosen = np.argsort(hashes, kind="stable")[:images]
    buckets = val_index["height"].to_numpy()[chosen].astype(np.int64) << 32 | val_index["width"].to_numpy()[chosen]
    batches = []
    for bucket in np.unique(buckets):
        rows = chosen[buckets == bucket]  # still in hash order
        batches.extend(rows[i : i + batch_size].tolist() for i in range(0, len(rows), batch_size))
    keys = sorted(val_index["key"].take(pa.array(chosen)).to_pylist())
    fingerprint = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
    return ValidationPlan(val_index, batches, hashes, fingerprint)


def evenly_spaced_t(count: int) -> list[float]:
    """The midpoints of ``count`` equal slices of [0, 1]."""
    return [(k + 0.5) / count for k in range(count)]


@dataclass
class ValidationSet:
    """A model rank's share of the validation batches (encoded: latents, text, pooled) with each image's key
    hash, which seeds its noise."""

    batches: list[dict[str, torch.Tensor]]
    hashes: list[np.ndarray]
    timesteps: list[float]

    @torch.no_grad()
    def loss_sums(self, model: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> torch.Tensor:
        """float64 (len(timesteps) + 1,): the summed per-image MSE at each timestep, then the image count."""
        sums = torch.zeros(len(self.timesteps) + 1, dtype=torch.float64)
        for batch, hashes in zip(self.batches, self.hashes):
            x0 = batch["latents"].to(device, torch.float32)
            text, pooled = batch["text"].to(device, torch.float32), batch["pooled"].to(device, torch.float32)
            noise = torch.stack([
                torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(int(h))) for h in hashes
            ]).to(device)
            for k, t in enumerate(self.timesteps):
                t_batch = torch.full((len(x0),), t, device=device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    v = model(add_noise(x0, noise, t_batch), t_batch, text, pooled)
                per_image = F.mse_loss(v.float(), velocity_target(x0, noise), reduction="none").flatten(1).mean(1)
                sums[k] += per_image.double().sum().cpu()
            sums[-1] += len(x0)
        return sums


def validation_metrics(sets: dict[str, torch.nn.Module], validation: ValidationSet, device: torch.device,
                       amp_dtype: torch.dtype | None, group) -> dict[str, float]:
    """``val_loss<suffix>`` for each named model (all model ranks call this together), and the loss at each
    timestep of the first one as ``val_loss/t<t>``."""
    values = {}
    for n, (suffix, model) in enumerate(sets.items()):
        was_training, was_on = model.training, next(model.parameters()).device
        model.eval().to(device)  # ema.device=cpu keeps the EMA weights off the GPU between evaluations
        sums = validation.loss_sums(model, device, amp_dtype).to(device)
        model.train(was_training).to(was_on)
        dist.all_reduce(sums, group=group)
        per_t = (sums[:-1] / sums[-1]).tolist()
        values[f"val_loss{suffix}"] = sum(per_t) / len(per_t)
        if n == 0:
            values |= {f"val_loss/t{t:.3f}": loss for t, loss in zip(validation.timesteps, per_t)}
    return values
