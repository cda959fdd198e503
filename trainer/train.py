"""Train the MMDiT: ``torchrun --nproc_per_node=N trainer/train.py --config FILE [--resume] [section.key=value ...]``.

Every rank validates the config, the topology (against WORLD_SIZE) and the data before the process group
starts, so a bad setup fails on every rank at once with the same message. Then loader ranks run
``trainer.feeder.run_loader`` and model ranks ``trainer.loop.train_model_rank``. Any error is logged
with the rank that saw it and the process exits non-zero at once: its peers' collectives and receives
then fail or time out (``topology.timeout_s``), so every rank ends, none hangs.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script, Python puts trainer/ first on sys.path, where model.py, data.py, config.py ...
    # would shadow top-level modules of the same names; the repository root is what the imports need.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import logging
import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import get_error_handler

from etl.config import ConfigError, to_mapping
from etl.index import bucket_order_version, dataset_version, row_group_version
from trainer.checkpoint import CheckpointNotFoundError, clean_stale_writes, resolve_checkpoint, save_rank_state
from trainer.config import load_train_config
from trainer.data import BucketSampler, DataError, open_index
from trainer.evaluation import EvalSetupError
from trainer.feeder import Feeder, LocalFeeder, run_loader
from trainer.loop import ModelRankContext, images_per_step, train_model_rank
from trainer.resume import ResumePoint, feeder_state, restore_rng, resume_point
from trainer.topology import Topology, TopologyError, new_groups
from trainer.transport import BatchReceiver
from trainer.validation import plan_validation, split_holdout

log = logging.getLogger("trainer")
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # where torchrun tells a rank to write its error
SETUP_ERRORS = (ConfigError, TopologyError, DataError, CheckpointNotFoundError, EvalSetupError)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--resume", action="store_true", help="continue from <checkpoint.dir>/latest")
    parser.add_argument("overrides", nargs="*", help="section.key=value, value parsed as YAML")
    return parser.parse_intermixed_args(argv)  # overrides may come before, between or after the flags


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _check_batches_fit(cfg, topology: Topology, index) -> None:
    """Build each feeder's kind of sampler once, so a batch larger than every bucket fails on all ranks
    at start (a sampler per distinct batch size: each one scans the whole index)."""
    if topology.colocated:
        sizes, replicas = {cfg.train.batch_size}, topology.world_size
    else:
        sizes = {cfg.train.batch_size * len(topology.models_of(loader)) for loader in topology.loader_ranks}
        replicas = len(topology.loader_ranks)
    for batch_size in sorted(sizes):
        BucketSampler(index, batch_size, cfg.train.seed, 0, replicas, shuffle=cfg.data.shuffle)


def _record_for_torchrun(err: BaseException) -> None:
    """torchelastic's error file, so torchrun's failure summary names this error as the root cause (not "no
    error file"). Written beside the file and renamed into place: torchrun SIGTERMs the other ranks once
    one fails, and a file it finds half-written crashes its own agent (JSONDecodeError, seen under load)."""
    target = os.environ.get(ERROR_FILE_ENV)
    if not target:
        return
    os.environ[ERROR_FILE_ENV] = f"{target}.partial"
    try:
        get_error_handler().record_exception(err)
    finally:
        os.environ[ERROR_FILE_ENV] = target
    if os.path.exists(f"{target}.partial"):
        os.replace(f"{target}.partial", target)


def _resume_dir(cfg, resume: bool) -> Path | None:
    if not resume:
        # Starting over there would mix two runs' step folders (the older run's later steps outliving
        # this one's) and drop the earlier run's metrics.jsonl.
        try:
            held = resolve_checkpoint(cfg.checkpoint.dir)
        except CheckpointNotFoundError:
            return None
        raise ConfigError(f"checkpoint.dir {cfg.checkpoint.dir} already holds a run (its last checkpoint: {held.name}): "
                          "pass --resume to continue it, or choose another checkpoint.dir (or delete that one) "
                          "to start afresh")
    try:
        return resolve_checkpoint(cfg.checkpoint.dir)
    except CheckpointNotFoundError:
        log.warning("--resume: no checkpoint in %s yet, starting from step 0", cfg.checkpoint.dir)
        return None


def _warn_about_changes(cfg, topology: Topology, resume: ResumePoint) -> None:
    if not resume.same_topology:
        log.warning("step %d was saved on another topology (%s): weights, EMA, optimizer, schedule and step "
                    "continue; the data position is handed over and the random streams start afresh",
                    resume.step, resume.saved_topology.describe())
    global_batch = images_per_step(cfg, len(topology.model_ranks))
    if resume.images_per_step not in (None, global_batch):
        log.warning("images per optimizer step: %d -> %d (train.lr stays %g)", resume.images_per_step, global_batch,
                    cfg.train.lr)


def _check_restart_store() -> None:
    """torchrun keeps one rendezvous TCPStore for every restart of a job, and its ranks use it without a
    per-attempt prefix: restarted ranks would read the dead ranks' addresses and hang connecting to them
    (seen here with torch 2.13 and gloo; pytorch issue 167288 reports the same with NCCL). torch's own
    switch gives each restart a fresh store."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise RuntimeError(
            f"torchrun restarted this rank (restart {restarts}), but its rendezvous store is shared across "
            "restarts, where the new ranks would find the dead ranks' addresses and hang: launch torchrun with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment (scripts/train_node.sh sets it)"
        )


def _init_process_group(backend: str, timeout: timedelta) -> None:
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:  # `python trainer/train.py` without torchrun: one colocated rank
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def run(args: argparse.Namespace) -> None:
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    _check_restart_store()
    cfg = load_train_config(args.config, args.overrides)
    topology = Topology.from_config(cfg.topology, world_size)
    index = open_index(cfg.data.root, cfg.data.resolution)
    version = dataset_version(index)  # of the whole index, images and captions included: what lineage records
    order = bucket_order_version(index)  # keys and buckets only: new captions keep the sampler's epoch
    if cfg.data.shuffle == "row_groups":  # that order is drawn over the row groups too
        order += "-" + row_group_version(index)
    index, validation = _hold_out(cfg, index, rank)
    _check_batches_fit(cfg, topology, index)
    # The held-out share is part of what fixes the sampler's order of batches.
    sampler_version = f"{order}-holdout{cfg.data.holdout_fraction:g}" if cfg.data.holdout_fraction else order
    resume_from = _resume_dir(cfg, args.resume)
    resume = resume_point(resume_from, topology, rank) if resume_from is not None else None
    # Resolved here so a wrong path fails before the process group starts, and every use reads the same step.
    init_from = (resolve_checkpoint(cfg.checkpoint.init_from)
                 if cfg.checkpoint.init_from is not None and resume_from is None else None)
    if rank == 0:
        log.info("%s; data version %s; %s", topology.describe(), version,
                 f"resuming from {resume_from}" if resume_from else "starting at step 0")
        for doubt in cfg.doubtful_settings():
            log.warning(doubt)
        if resume is not None:
            _warn_about_changes(cfg, topology, resume)

    device = _device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=cfg.topology.timeout_s)
    # The default group carries the loader -> model transport, whose every wait passes its own bound: the
    # startup timeout for the first batches, timeout_s after. The group's timeout must not cut the first
    # ones short: ProcessGroupNCCL's watchdog aborts an operation pending past it whatever its wait
    # allowed, and a pair's first NCCL send waits that long in the store for its peer to join.
    _init_process_group("nccl" if device.type == "cuda" else "gloo", timedelta(seconds=cfg.topology.startup_timeout_s))
    model_group = new_groups(topology, timeout)
    # The loaders reach the last barrier once their last batches are sent; the model ranks still train the
    # up to 2 x prefetch + 1 batches queued for them, then evaluate, sample and checkpoint, each bounded by
    # timeout_s already (their peers wait that long for them mid-run). So this wait gets all of it.
    end_group = dist.new_group(timeout=timeout * (2 * cfg.topology.prefetch + 4))
    if rank == 0:
        clean_stale_writes(cfg.checkpoint.dir)
    dist.barrier()  # nobody stages checkpoint state before the stale staging folders are gone

    shares = validation.shares(topology.model_ranks) if validation is not None else None
    feeding = None
    if resume is not None:
        restore_rng(resume, cfg.train.seed, rank, device)
        if topology.runs_feeder(rank):
            feeding = feeder_state(resume, cfg.train.accumulation_steps)
    if topology.role(rank) == "loader":
        loaders = topology.loader_ranks
        run_loader(cfg, topology.models_of(rank), loaders.index(rank), len(loaders), index, device, feeding,
                   lambda step, snapshot: _save_loader_state(cfg, step, rank, snapshot), sampler_version,
                   validation, shares)
    else:
        validation_batches, encoders = [], None
        if topology.colocated:
            feeder = Feeder(cfg, index, 1, rank, world_size, device, feeding, sampler_version)
            if validation is not None:
                validation_batches = feeder.encode_validation(validation, shares[rank])
            source = LocalFeeder(feeder, cfg.train.total_steps * cfg.train.accumulation_steps, cfg.topology.prefetch)
            encoders = feeder.encoders
        else:
            source = BatchReceiver(topology.loader_of(rank), cfg.topology.prefetch, device, timeout_s=cfg.topology.timeout_s,
                                   first_timeout_s=cfg.topology.startup_timeout_s)
            if validation is not None:
                validation_batches = [_validation_batch(source, rank) for _ in shares[rank]]
        model_ranks = topology.model_ranks
        ctx = ModelRankContext(
            rank=rank, topology=topology, group=model_group, group_rank=model_ranks.index(rank), device=device,
            dataset_version=version, resume=resume, init_from=init_from, source=source, run_config=to_mapping(cfg),
            validation=None if validation is None else validation.validation_set(shares[rank], validation_batches,
                                                                                 cfg.log.val_timesteps),
            encoders=encoders,
        )
        train_model_rank(cfg, ctx)
    dist.barrier(group=end_group)  # the last checkpoint is written before any rank tears the process group down
    dist.destroy_process_group()


def _hold_out(cfg, index, rank: int):
    """(the rows to train on, the validation plan or None), logged by rank 0 so every row is accounted for."""
    if not cfg.data.holdout_fraction:
        return index, None
    train_rows, held = split_holdout(index, cfg.data.holdout_fraction)
    plan = plan_validation(held, cfg.log.val_images, cfg.train.batch_size) if cfg.log.val_every else None
    if rank == 0:
        log.info("held out %d of %d images (data.holdout_fraction %g); training on %d%s", held.num_rows,
                 index.num_rows, cfg.data.holdout_fraction, train_rows.num_rows,
                 f"; validation set: {plan.num_images} images in {len(plan.batches)} batches (keys {plan.fingerprint})"
                 if plan is not None else "")
    return train_rows, plan


def _validation_batch(source: BatchReceiver, rank: int) -> dict:
    batch, _ = source.get()
    if batch is None:
        raise RuntimeError(f"rank {rank}: the loader ended before sending its validation batches")
    return batch


def _save_loader_state(cfg, step: int, rank: int, snapshot: dict) -> None:
    save_rank_state(cfg.checkpoint.dir, step, rank, {"role": "loader", "rng_cpu": torch.get_rng_state(), "feeder": snapshot})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except BaseException as err:  # noqa: BLE001 - every failure must end this rank, with its reason
        # A setup mistake's message says what to fix; a traceback (times every rank) would bury it.
        where = "" if isinstance(err, SETUP_ERRORS) else "\n" + traceback.format_exc()
        log.error("rank %s failed: %s: %s%s", rank, type(err).__name__, err, where)
        _record_for_torchrun(err)
        logging.shutdown()
        sys.stderr.flush()
        # os._exit, not sys.exit: receiver threads and an unfinished process group would make a normal
        # interpreter shutdown wait on the very peer that failed.
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
