"""What loader ranks run: draw a batch from one bucket, decode it in DataLoader workers, encode it with the
VAE and the text encoders, split it across the model ranks this loader feeds, and send each its part.

``Feeder`` is that pipeline as an iterator of per-model-rank chunks; ``run_loader`` drives it on a loader
rank (point-to-point sends, up to ``topology.prefetch`` batches in flight per model rank);
``LocalFeeder`` runs it in a background thread of a colocated rank, with the same ``get()`` as the
model rank's ``BatchReceiver``, so the training loop does not know which one feeds it.

The loader's part of a checkpoint (sampler position, VAE sampling generator) is taken when it produces
the last batch of a checkpoint step, not when the model ranks reach that step: the feeder runs ahead by
the prefetch depth, and its state must describe the batches the model ranks actually used.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from etl.config import ConfigError
from trainer.config import TrainConfig
from trainer.data import BucketBatches, BucketSampler, to_unit_range
from trainer.encoders import SEQUENCE_ENCODERS, Encoders
from trainer.model import MMDiTConfig
from trainer.prefetch import Prefetcher
from trainer.resume import fresh_seed
from trainer.transport import SendWaits, pack_batch, send_batch, send_end, send_error
from trainer.vae_memo import VaeMemo
from trainer.validation import ValidationPlan

log = logging.getLogger(__name__)

# Benchmark knob: seconds every batch sleeps in the feeder, to emulate a loader slower than the model
# ranks (benchmarks/data_wait.py uses it to show that data_wait_frac reports real waiting).
SLOW_LOADER_ENV = "SD3_BENCH_LOADER_SLEEP_S"


def is_checkpoint_step(step: int, every: int, total_steps: int) -> bool:
    """Optimizer steps (1-based) after which a checkpoint is written: every ``every`` and the last one."""
    return step % every == 0 or step == total_steps


class Feeder:
    def __init__(self, cfg: TrainConfig, index: pa.Table, num_chunks: int, replica: int, num_replicas: int,
                 device: torch.device, state: dict | None = None, data_version: str = ""):
        """``num_chunks`` model ranks share each batch; feeder ``replica`` of ``num_replicas`` (loaders, or
        colocated ranks) draws its own share of each epoch of the index named ``data_version``; ``state`` is
        the part of a checkpoint to continue from (``snapshot``, or ``trainer.resume.feeder_state``)."""
        self.cfg, self.num_chunks, self.device = cfg, num_chunks, device
        self.chunk_size = cfg.train.batch_size
        self.sampler = BucketSampler(index, self.chunk_size * num_chunks, cfg.train.seed, rank_offset=replica,
                                     num_replicas=num_replicas, shuffle=cfg.data.shuffle, data_version=data_version)
        for size, count in self.sampler.dropped_buckets.items():
            log.warning("bucket %s has %d images, fewer than a batch of %d: dropped", size, count, self.chunk_size * num_chunks)
        self.encoders = Encoders(cfg.encoders, device=device)
        _check_model_fits_encoders(self.encoders, cfg.model.mmdit_config())
        self.vae_memo = VaeMemo(cfg.data.vae_memo_mb)
        self.generator = torch.Generator(device).manual_seed(fresh_seed(cfg.train.seed, "vae", 0, replica))
        self.batches_done = 0
        if state is not None:
            replanned = self.sampler.load_state_dict(state["sampler"])
            if replanned and replica == 0:
                log.warning("the data continues on a new plan: %s", replanned)
            if state["generator"] is not None:
                self.generator.set_state(state["generator"])
            else:  # handed over from another topology: a stream of its own, from the seed and the position
                self.generator.manual_seed(fresh_seed(cfg.train.seed, "vae", state["batches"], replica))
            self.batches_done = state["batches"]
        self.dataset = BucketBatches(cfg.data.root, cfg.data.resolution, index, cfg.data.detailed_caption_prob, cfg.train.seed)
        self.sleep_s = float(os.environ.get(SLOW_LOADER_ENV, "0"))

    def snapshot(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "generator": self.generator.get_state(), "batches": self.batches_done}

    def _loader(self) -> DataLoader:
        # batch_size=None: the sampler yields whole batches of index rows and the dataset decodes one
        # batch per item, so a batch never mixes buckets. Pinned batches copy to the GPU asynchronously.
        workers = self.cfg.data.num_workers
        # A decode worker that hangs (not dies) would block this rank for ever: bounded like every peer.
        return DataLoader(self.dataset, sampler=self.sampler, batch_size=None, num_workers=workers,
                          persistent_workers=False, prefetch_factor=2 if workers else None,
                          pin_memory=self.device.type == "cuda", timeout=self.cfg.topology.timeout_s if workers else 0)

    @torch.no_grad()
    def encode(self, item: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``item`` of ``BucketBatches`` encoded; the VAE samples from ``generator``, by default the feeder's."""
        images = to_unit_range(item["images"].to(self.device, non_blocking=True))
        posteriors = self.vae_memo.posteriors(item["keys"], images, self.encoders.posteriors)
        latents = self.encoders.latents_from(posteriors, generator=generator or self.generator)
        text, pooled = self.encoders.encode_text(item["captions"])
        # Sent in the encoders' dtype (bf16 halves the bytes on GPU); model ranks compute the loss in fp32.
        return {"latents": latents, "text": text, "pooled": pooled}

    def encode_validation(self, plan: ValidationPlan, batch_ids: list[int]) -> list[dict[str, torch.Tensor]]:
        """The validation batches ``batch_ids`` of ``plan``, encoded. Captions chosen with seed 0 and the VAE
        sampled from a stream of its own per batch number: the same inputs whatever the run's seed."""
        dataset = BucketBatches(self.cfg.data.root, self.cfg.data.resolution, plan.index,
                                self.cfg.data.detailed_caption_prob, seed=0)
        generators = {i: torch.Generator(self.device).manual_seed(fresh_seed(0, "validation-vae", i, 0)) for i in batch_ids}
        return [self.encode(dataset[plan.batches[i]], generator=generators[i]) for i in batch_ids]

    def chunks(self, total_batches: int, on_checkpoint: Callable[[int, dict], None]) -> Iterator[list[dict]]:
        """Per batch, its ``num_chunks`` parts until ``total_batches`` batches were made in all (counting
        those before a resume). After each batch that ends a checkpoint step, ``on_checkpoint(step,
        snapshot)`` (steps counted in optimizer steps).

        The DataLoader's worker processes are forked here, in the calling thread, not when the returned
        iterator is first advanced: a colocated rank advances it from a background thread, and a fork there
        copies whatever lock the training thread holds at that instant into the child (a worker hung forever
        in torch's seeding lock, 1 run in 12)."""
        return self._chunks(iter(self._loader()), total_batches, on_checkpoint)

    def _chunks(self, items: Iterator[dict], total_batches: int, on_checkpoint: Callable[[int, dict], None]
                ) -> Iterator[list[dict]]:
        accumulation = self.cfg.train.accumulation_steps
        while self.batches_done < total_batches:
            item = next(items)
            if self.sleep_s:
                time.sleep(self.sleep_s)
            batch = self.encode(item)
            self.batches_done += 1
            # The DataLoader reads the sampler ahead; only a batch actually made moves its saved position.
            self.sampler.advance()
            parts = [{name: t[i * self.chunk_size:(i + 1) * self.chunk_size].contiguous() for name, t in batch.items()}
                     for i in range(self.num_chunks)]
            step, rest = divmod(self.batches_done, accumulation)
            if not rest and is_checkpoint_step(step, self.cfg.checkpoint.every, self.cfg.train.total_steps):
                on_checkpoint(step, self.snapshot())
            yield parts
        if self.cfg.data.vae_memo_mb:
            memo = self.vae_memo
            log.info("VAE memo: %d images kept (%.1f MB); %d of the %d images it served went through the encoder",
                     len(memo), memo.kept_bytes / 2**20, memo.encoded, memo.requested)


def _check_model_fits_encoders(encoders: Encoders, model: MMDiTConfig) -> None:
    # Only the loaded encoders know their widths; the model ranks would otherwise fail on their first batch.
    for name, model_value, encoder_value, source in (
        ("in_channels", model.in_channels, encoders.latent_channels, "the VAE's latent channels"),
        ("pooled_dim", model.pooled_dim, encoders.pooled_dim, "the CLIP text encoder's projection width"),
    ):
        if model_value != encoder_value:
            raise ConfigError(f"model.overrides.{name}: {model_value} does not match {source}, {encoder_value}")


def run_loader(cfg: TrainConfig, models: list[int], replica: int, num_replicas: int, index: pa.Table,
               device: torch.device, state: dict | None, save_state: Callable[[int, dict], None],
               data_version: str = "", validation: ValidationPlan | None = None,
               validation_shares: dict[int, list[int]] | None = None) -> None:
    """A loader rank's whole job: send each of ``models`` its validation batches (``validation_shares``: model
    rank -> batch numbers of ``validation``), then feed them until every optimizer step has its batches, then
    send them the end sentinel. On any error, tell them why (they exit non-zero) and re-raise."""
    total_batches = cfg.train.total_steps * cfg.train.accumulation_steps
    in_flight: dict[int, collections.deque] = {rank: collections.deque() for rank in models}
    # A model rank takes its validation batches and fills its receiver (prefetch queued, one in hand), then
    # builds its model: the next send waits for that, and the next accumulation_steps ones for its first,
    # compiled, step. Counting more would slow the detection of a rank stuck in its first steps.
    validation_batches = max((len(share) for share in (validation_shares or {}).values()), default=0)
    sends = SendWaits(cfg.topology.timeout_s, cfg.topology.startup_timeout_s,
                      early=validation_batches + cfg.topology.prefetch + 2 + cfg.train.accumulation_steps)
    try:
        feeder = Feeder(cfg, index, len(models), replica, num_replicas, device, state, data_version)
        if validation is not None:
            for rank in models:
                for batch in feeder.encode_validation(validation, validation_shares[rank]):
                    part = pack_batch(batch, text_blocks=len(SEQUENCE_ENCODERS))
                    sends.wait(send_batch(part, rank), rank)
        for parts in feeder.chunks(total_batches, save_state):
            for rank, part in zip(models, parts):
                part = pack_batch(part, text_blocks=len(SEQUENCE_ENCODERS))  # text without its zero rows
                pending = in_flight[rank]
                # A bounded number of sends per model rank: beyond its prefetch depth the loader waits.
                while len(pending) >= cfg.topology.prefetch:
                    sends.wait(pending.popleft()[0], rank)
                # The part is kept with its works: its tensors must live until they are sent.
                pending.append((send_batch(part, rank), part))
        for rank, pending in in_flight.items():
            while pending:
                sends.wait(pending.popleft()[0], rank)
            send_end(rank, device=device, timeout_s=cfg.topology.timeout_s)
    except BaseException as err:
        message = f"rank {_rank()}: {type(err).__name__}: {err}"
        for rank in models:
            try:
                send_error(rank, message, device=device, timeout_s=cfg.topology.timeout_s)
            except Exception:  # that model rank may be the one that died; the others still hear why
                log.debug("could not tell rank %d that its loader failed", rank)
        raise


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class LocalFeeder(Prefetcher):
    """A colocated rank's feeder: ``Feeder`` in a background thread, up to ``depth`` batches ahead, with
    the ``get() -> (batch or None at the end, seconds waited)`` of ``BatchReceiver``. Checkpoint
    snapshots are kept until the training loop takes them with ``take_snapshot(step)``."""

    def __init__(self, feeder: Feeder, total_batches: int, depth: int):
        self._snapshots: dict[int, dict] = {}
        self._lock = threading.Lock()
        chunks = feeder.chunks(total_batches, self._keep_snapshot)  # forks the DataLoader workers, in this thread
        # A colocated rank is its own only model rank: each batch has exactly one part.
        super().__init__((parts[0] for parts in chunks), depth, name="feeder")

    def _keep_snapshot(self, step: int, snapshot: dict) -> None:
        with self._lock:
            self._snapshots[step] = snapshot

    def take_snapshot(self, step: int) -> dict:
        with self._lock:
            return self._snapshots.pop(step)
