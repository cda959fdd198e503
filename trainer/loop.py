"""What model ranks run: receive encoded batches, train the MMDiT under DDP over the model group, log,
checkpoint, and continue exactly from a checkpoint.

One optimizer step = ``accumulation_steps`` micro-batches from this rank's feeder (a ``BatchReceiver``
from its loader rank, or a colocated ``LocalFeeder``); gradients are all-reduced by DDP on the last
micro-batch only. Model-group rank 0 writes metrics and checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from etl.storage import write_atomic
from trainer.checkpoint import (
    VALIDATION_KEYS,
    CheckpointWriteError,
    write_text_atomic,
    load_trainer_state,
    save_checkpoint,
    save_rank_state,
    wait_for_rank_states,
    checkpoint_metadata,
)
from trainer.config import VAE_DOWNSAMPLING, TrainConfig
from trainer.ema import EMA
from trainer.feeder import LocalFeeder, is_checkpoint_step
from trainer.flow import CFGDropout, flow_loss, resolution_shift
from trainer.lr_schedule import apply_optimizer_settings, build_scheduler, continue_schedule
from trainer.metrics import MetricsLogger
from trainer.model import MMDiT, MMDiTConfig
from trainer.resume import ResumePoint, fresh_seed, restore_rng
from trainer.topology import Topology
from trainer.validation import ValidationSet, validation_metrics

log = logging.getLogger(__name__)


@dataclass
class ModelRankContext:
    rank: int  # global rank
    topology: Topology
    group: dist.ProcessGroup  # the model ranks
    group_rank: int
    device: torch.device
    dataset_version: str
    resume: ResumePoint | None  # the checkpoint to continue from
    # The step folder to finetune from (checkpoint.init_from, resolved once at start); None when resuming: the
    # run's own checkpoint then holds everything, so its source may be gone.
    init_from: Path | None
    source: object  # BatchReceiver or LocalFeeder: get() -> (batch or None, seconds waited)
    run_config: dict  # the whole TrainConfig as plain values, for wandb
    validation: ValidationSet | None = None  # this rank's share of the held-out batches
    # A colocated rank's feeder encoders: its samples and evaluations use them rather than a second copy.
    encoders: object | None = None

    @property
    def num_model_ranks(self) -> int:
        return len(self.topology.model_ranks)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def images_per_step(cfg: TrainConfig, num_model_ranks: int) -> int:
    """The global batch: images in one optimizer step over all model ranks."""
    return cfg.train.batch_size * cfg.train.accumulation_steps * num_model_ranks


def weights_sha256(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: model ranks compare it at each checkpoint (DDP keeps them equal)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return MMDiT.from_pretrained(folder, low_cpu_mem_usage=False).state_dict()  # see checkpoint.load_model


def timestep_shift(setting: float | str, latent_shape: tuple[int, ...]) -> float:
    """``train.t_shift`` for latents of shape (..., h, w): the number, or SD3's shift for their pixel size."""
    if setting != "resolution":
        return float(setting)
    return resolution_shift(latent_shape[-2] * VAE_DOWNSAMPLING, latent_shape[-1] * VAE_DOWNSAMPLING)


def sampling_shift(cfg: TrainConfig) -> float:
    """The shift the run's own samples and evaluations take, at the data resolution: the one it trains with."""
    return timestep_shift(cfg.train.t_shift, (cfg.data.resolution // VAE_DOWNSAMPLING,) * 2)


def build_model(cfg: TrainConfig, device: torch.device, init_from: Path | None = None) -> MMDiT:
    """The MMDiT of the config, from the seed (every model rank builds the same one; DDP broadcasts rank
    0's anyway), or with the weights of the step folder ``init_from`` when finetuning."""
    torch.manual_seed(cfg.train.seed)
    model = MMDiT.from_preset(cfg.model.preset, **cfg.model.overrides)
    if init_from is not None:
        model.load_state_dict(_weights_of(init_from / "model"))
        log.info("finetuning from the weights of %s", init_from)
    return model.to(device)


def prime_gradient_buckets(ddp: DistributedDataParallel, device: torch.device) -> None:
    """One backward of a one-token zero batch, its gradients thrown away. DDP regroups its gradient buckets
    in the order gradients arrived in the first backward it runs; without this, a resumed run's first step
    would use the original grouping and sum gradients in another order than the uninterrupted run did
    (one-ulp differences on a CPU, where a resumed run is otherwise bitwise the same). Every run primes, so
    every real step of every run uses the regrouped buckets."""
    cfg: MMDiTConfig = ddp.module.mmdit_config
    x = torch.zeros(1, cfg.in_channels, cfg.patch_size, cfg.patch_size, device=device)
    text = torch.zeros(1, cfg.text_len, cfg.text_dim, device=device)
    ddp(x, torch.zeros(1, device=device), text, torch.zeros(1, cfg.pooled_dim, device=device)).sum().backward()
    ddp.module.zero_grad(set_to_none=True)


def _check_model_ranks_agree(rank_files: list[Path], model_ranks: list[int], step: int) -> None:
    hashes = {rank: torch.load(rank_files[rank], weights_only=True)["weights_sha256"] for rank in model_ranks}
    if len(set(hashes.values())) != 1:
        raise CheckpointWriteError(f"step {step}: model ranks hold different weights (sha256 per rank: {hashes})")


def train_model_rank(cfg: TrainConfig, ctx: ModelRankContext) -> None:
    device, group = ctx.device, ctx.group
    model = build_model(cfg, device, ctx.init_from)
    ema = EMA(model, cfg.ema.decay, cfg.ema.every, device="cpu" if cfg.ema.device == "cpu" else None)
    if ctx.init_from is not None and (ctx.init_from / "ema").is_dir():
        ema.load_state_dict(_weights_of(ctx.init_from / "ema"))

    ddp = DistributedDataParallel(model, process_group=group, device_ids=[device.index] if device.type == "cuda" else None)
    prime_gradient_buckets(ddp, device)
    if cfg.train.compile:  # in place (DDP calls the same blocks), after the one-token priming pass
        model.compile_blocks()
    # Fused on the CPU too: one kernel instead of a Python loop over the parameters, 3.7-5x faster a step
    # (benchmarks/adamw_cpu.py).
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay, fused=True)
    # bf16 autocast needs no loss scaling; the scaler is kept (disabled) so fp16 support would not change
    # the checkpoint format.
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    generator = torch.Generator(device).manual_seed(fresh_seed(cfg.train.seed, "model", 0, ctx.rank))
    # A finetune that keeps the old wandb run logs after its steps: wandb drops a step lower than one logged.
    start_step, wandb_run_id, wandb_step_offset = 0, None, 0

    # A finetune needs the old run's state only for what it keeps (a weights-only checkpoint has none).
    if ctx.init_from is not None and not (cfg.checkpoint.reset_optimizer and cfg.checkpoint.reset_logger):
        init_state = load_trainer_state(ctx.init_from)
        if not cfg.checkpoint.reset_optimizer:  # its moments; the new run's settings and lr schedule
            optimizer.load_state_dict(init_state["optimizer"])
            apply_optimizer_settings(optimizer, tuple(cfg.train.betas), cfg.train.weight_decay)
            for group_settings in optimizer.param_groups:
                group_settings["lr"] = group_settings["initial_lr"] = cfg.train.lr
        if not cfg.checkpoint.reset_logger:
            wandb_run_id = init_state.get("wandb_run_id")
            wandb_step_offset = init_state.get("wandb_step_offset", 0) + init_state["step"]
    # Built after a finetuning run took over the old optimizer state, so the new run's warmup applies.
    scheduler = build_scheduler(optimizer, cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_steps,
                                cfg.train.total_steps, cfg.train.lr_schedule)
    if ctx.resume is not None:
        step_dir = ctx.resume.step_dir
        model.load_state_dict(_weights_of(step_dir / "model"))
        ema.load_state_dict(_weights_of(step_dir / "ema"))
        state = load_trainer_state(step_dir)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # The loaded state holds the saved run's settings; the config's go on from the saved step.
        changed = continue_schedule(scheduler, cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_steps,
                                    cfg.train.total_steps, cfg.train.lr_schedule)
        changed += apply_optimizer_settings(optimizer, tuple(cfg.train.betas), cfg.train.weight_decay)
        if changed and ctx.group_rank == 0:
            log.warning("--resume with changed settings, applied from step %d on: %s", state["step"], "; ".join(changed))
        scaler.load_state_dict(state["scaler"])
        start_step, wandb_run_id = state["step"], state["wandb_run_id"]
        wandb_step_offset = state.get("wandb_step_offset", 0)
        restore_rng(ctx.resume, cfg.train.seed, ctx.rank, device)  # again: build_model seeded them
        if ctx.resume.same_topology:
            generator.set_state(ctx.resume.rank_state["generator"])
        else:  # another topology (see trainer.resume)
            generator.manual_seed(fresh_seed(cfg.train.seed, "model", start_step, ctx.rank))
        if state["dataset_version"] != ctx.dataset_version:
            log.warning("resuming on dataset version %s; the checkpoint was trained on %s",
                        ctx.dataset_version, state["dataset_version"])
        log.info("rank %d resumes after step %d from %s", ctx.rank, start_step, step_dir)

    metrics = None
    if ctx.group_rank == 0:
        metrics = MetricsLogger(cfg.checkpoint.dir, cfg.train.total_steps, start_step, cfg.log.wandb_mode,
                                cfg.log.wandb_project, wandb_run_id, ctx.run_config, cfg.log.progress, cfg.log.every,
                                wandb_step_offset)
    drop = CFGDropout(cfg.train.null_prob_pooled, tuple(cfg.train.null_prob_text))
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    accumulation = cfg.train.accumulation_steps
    pipelines = TrainingPipelines(cfg, device, shared=ctx.encoders)
    sampler = _Sampler(cfg, pipelines) if ctx.group_rank == 0 and cfg.log.sample_every else None
    evaluation = TrainingEvaluation(cfg, pipelines) if ctx.group_rank == 0 and cfg.log.eval_every else None

    last_validation = {}  # what the next checkpoint's meta.json records; a resumed run starts from its checkpoint's
    if ctx.resume is not None:
        last_validation = {k: v for k, v in checkpoint_metadata(ctx.resume.step_dir).items() if k in VALIDATION_KEYS}
    try:
        ddp.train()
        for step in range(start_step + 1, cfg.train.total_steps + 1):
            started, waited, loss_sum = time.perf_counter(), 0.0, 0.0
            for micro in range(accumulation):
                batch, seconds = ctx.source.get()
                waited += seconds
                if batch is None:
                    raise RuntimeError(f"rank {ctx.rank}: the feeder ended before step {step} had its data")
                batch = {name: tensor.to(device, torch.float32, non_blocking=True) for name, tensor in batch.items()}
                sync = contextlib.nullcontext() if micro == accumulation - 1 else ddp.no_sync()
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss, _ = flow_loss(ddp, batch["latents"], batch["text"], batch["pooled"], generator, drop,
                                            cfg.train.t_sampling, cfg.train.t_mean, cfg.train.t_std,
                                            timestep_shift(cfg.train.t_shift, batch["latents"].shape))
                    (loss / accumulation).backward()
                loss_sum += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.maybe_update(model, step)
            if device.type == "cuda":  # the optimizer's and EMA's kernels belong to this step's time, not to none
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - started
            # Loss and waiting averaged over the model ranks; in float64 a sum of a few float32 values is exact,
            # so the reduction order cannot change the logged loss.
            stats = torch.tensor([loss_sum / accumulation, waited / elapsed], dtype=torch.float64, device=device)
            dist.all_reduce(stats, group=group)
            stats /= ctx.num_model_ranks
            loss_mean = stats[0].item()
            validation = {}
            if ctx.validation is not None and step % cfg.log.val_every == 0:  # every model rank evaluates its share
                validation = validation_metrics({"": model, "_ema": ema.model}, ctx.validation, device, amp_dtype, group)
                last_validation = {"val_loss": validation["val_loss"], "val_loss_ema": validation["val_loss_ema"],
                                   "val_step": step}
            if metrics is not None:
                values = {
                    "step": step, "loss": loss_mean, "lr": lr, "grad_norm": grad_norm.item(),
                    "images_per_s": images_per_step(cfg, ctx.num_model_ranks) / elapsed,
                    "data_wait_frac": stats[1].item(), **validation,
                }
                if evaluation is not None and step % cfg.log.eval_every == 0:
                    values |= evaluation.run(ema.model, step)
                metrics.log_step(values)
            if sampler is not None and step % cfg.log.sample_every == 0:
                sampler.log(ema.model, metrics, step)
            if is_checkpoint_step(step, cfg.checkpoint.every, cfg.train.total_steps):
                _checkpoint(cfg, ctx, step, loss_mean, model, ema, optimizer, scheduler, scaler, generator,
                            {"wandb_run_id": metrics.run_id if metrics is not None else None,
                             "wandb_step_offset": wandb_step_offset}, last_validation)
        ctx.source.close()
    except BaseException:
        if metrics is not None:
            metrics.close(failed=True)
        raise
    if metrics is not None:
        metrics.close()


def _checkpoint(cfg, ctx: ModelRankContext, step, loss, model, ema, optimizer, scheduler, scaler, generator,
                wandb_run: dict, validation: dict) -> None:
    own = {"role": "model", "rng_cpu": torch.get_rng_state(), "generator": generator.get_state(),
           "weights_sha256": weights_sha256(model)}
    if ctx.device.type == "cuda":
        own["rng_cuda"] = torch.cuda.get_rng_state(ctx.device)
    if isinstance(ctx.source, LocalFeeder):
        own["feeder"] = ctx.source.take_snapshot(step)
    save_rank_state(cfg.checkpoint.dir, step, ctx.rank, own)
    if ctx.group_rank != 0:
        return
    rank_files = wait_for_rank_states(cfg.checkpoint.dir, step, ctx.topology.world_size, cfg.topology.timeout_s)
    _check_model_ranks_agree(rank_files, ctx.topology.model_ranks, step)
    trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), **wandb_run, "dataset_version": ctx.dataset_version}
    meta = {"loss": loss, "dataset_version": ctx.dataset_version, "resolution": cfg.data.resolution,
            "topology": ctx.topology.to_record(), "images_per_step": images_per_step(cfg, ctx.num_model_ranks),
            **validation}
    step_dir = save_checkpoint(cfg.checkpoint.dir, step, model, ema.model, cfg.encoders, meta, trainer_state, rank_files,
                               cfg.checkpoint.keep)
    log.info("saved %s", step_dir)
    try:
        # Imported here: only this rank reports lineage, dagster is a slow import, and a GPU training image
        # may not have it at all (seen on an H200 machine): the checkpoint must not depend on it.
        from orchestration.lineage import record_checkpoint, why_not_recorded

        if not record_checkpoint(step_dir, checkpoint_metadata(step_dir)):
            _say_once(f"checkpoints are not recorded in Dagster's lineage: {why_not_recorded()}")
    except Exception as err:  # the checkpoint is safe on disk; a lineage store problem must not stop training
        log.warning("could not record %s in Dagster: %s: %s", step_dir, type(err).__name__, err)


@functools.cache
def _say_once(message: str) -> None:
    log.info(message)


class TrainingPipelines:
    """Sampling pipelines around the training model (model-group rank 0); the encoders are loaded on first
    use, once for the samples and the evaluations, unless a colocated rank's feeder ``shares`` its own.
    Shared ones stay on the GPU: the feeder thread keeps encoding with them while the rank samples."""

    def __init__(self, cfg: TrainConfig, device: torch.device, shared=None):
        self.cfg, self.device, self.encoders, self.shared = cfg, device, shared, shared is not None

    @contextlib.contextmanager
    def around(self, model: MMDiT):
        from trainer.encoders import Encoders
        from trainer.pipeline import Pipeline

        if self.encoders is None:
            log.info("loading the encoders for samples and evaluations")
            self.encoders = Encoders(self.cfg.encoders, device=self.device)
        was_device = next(model.parameters()).device
        try:
            yield Pipeline(model.to(self.device), self.encoders, offload_text_encoders=not self.shared)
        finally:
            model.to(was_device)


class _Sampler:
    """Sample images from the EMA weights for wandb every ``log.sample_every`` steps."""

    def __init__(self, cfg: TrainConfig, pipelines: TrainingPipelines):
        self.cfg, self.pipelines = cfg, pipelines

    def log(self, model: MMDiT, metrics: MetricsLogger, step: int) -> None:
        size = self.cfg.data.resolution
        with self.pipelines.around(model) as pipe:
            images = pipe.generate(self.cfg.log.sample_prompts, steps=self.cfg.log.sample_steps,
                                   cfg=self.cfg.log.sample_cfg, width=size, height=size, seed=step,
                                   shift=sampling_shift(self.cfg))
        metrics.log_images(step, images, self.cfg.log.sample_prompts)
        out = self.cfg.checkpoint.dir / "samples"
        for i, image in enumerate(images):
            write_atomic(out / f"step_{step:07d}_{i}.png", lambda f, image=image: image.save(f, format="PNG"))


class TrainingEvaluation:
    """FID (and CLIP score) of the EMA weights every ``log.eval_every`` steps, at the data resolution with a
    fixed seed so evaluations compare; the reference features are computed once, at the first."""

    def __init__(self, cfg: TrainConfig, pipelines: TrainingPipelines, feature_extractor: torch.nn.Module | None = None,
                 feature_size: int | None = None):
        """``feature_extractor`` / ``feature_size`` replace the FID Inception (see ``Evaluator``)."""
        from trainer.evaluation import INCEPTION_SIZE, Evaluator, GenerationSettings, read_prompts

        log_cfg, size = cfg.log, cfg.data.resolution
        settings = GenerationSettings(steps=log_cfg.eval_steps, cfg=log_cfg.eval_cfg, width=size, height=size, seed=0,
                                      batch_size=log_cfg.eval_images_per_prompt,
                                      shift=sampling_shift(cfg))
        self.evaluator = Evaluator(
            read_prompts(log_cfg.eval_prompts_file, "log.eval_prompts_file"), log_cfg.eval_reference,
            inception=log_cfg.eval_inception, clip=log_cfg.eval_clip, settings=settings, device=pipelines.device,
            feature_extractor=feature_extractor, feature_size=feature_size or INCEPTION_SIZE, setting_prefix="log.eval_",
            reference_images=log_cfg.eval_reference_images,
        )
        self.pipelines, self.out = pipelines, cfg.checkpoint.dir / "eval"

    def run(self, model: MMDiT, step: int) -> dict:
        """The scores for metrics.jsonl / wandb; the whole report goes to ``eval/step_<step>.json``."""
        with self.pipelines.around(model) as pipe:
            report = self.evaluator.evaluate(pipe)
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out / f"step_{step:07d}.json", json.dumps({"step": step, **report}, indent=2) + "\n")
        log.info("step %d: FID %.3f", step, report["fid"])
        scores = {"eval_fid": report["fid"]}
        if report["clip_score"] is not None:
            scores["eval_clip_score"] = report["clip_score"]
        return scores
