"""The trainer's one typed config: YAML sections -> dataclasses, validated before any rank starts work.

Loaded with ``etl.config.from_mapping`` (unknown keys, wrong types and bad values are errors naming the
key). Command-line overrides are dotted ``section.key=value`` pairs whose value is parsed as YAML, so
``topology.loader_to_model={0: [1, 2, 3]}`` and ``train.betas=[0.9, 0.95]`` work as written.
Relative paths in the file are relative to the file; relative paths in overrides are relative to the
current directory (where the command was typed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from etl.config import ConfigError, from_mapping, load_yaml
from trainer.encoders import EncodersConfig
from trainer.model import PRESETS as MODEL_PRESETS
from trainer.model import MMDiTConfig

PATCH_MULTIPLE = 16  # bucket sides are multiples of this (etl BucketConfig.multiple)
VAE_DOWNSAMPLING = 8
# EncodersConfig alone defaults to the reference encoders; a trainer config defaults to the tiny ones,
# matching the tiny default MMDiT, also when its encoders section sets other keys but no preset.
DEFAULT_ENCODERS_PRESET = "tiny"
# (section, key) pairs holding paths, resolved against the config file or the working directory.
PATH_KEYS = (
    ("data", "root"), ("checkpoint", "dir"), ("checkpoint", "init_from"),
    ("log", "eval_prompts_file"), ("log", "eval_reference"), ("log", "eval_inception"), ("log", "eval_clip"),
)


def _at_least(section: Any, minimum: float, *names: str) -> None:
    for name in names:
        if getattr(section, name) < minimum:
            raise ConfigError(f"{name}: must be at least {minimum}, got {getattr(section, name)}")


def _probability(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}: must be in [0, 1], got {value}")


@dataclass
class DataSection:
    root: Path  # the pipeline root: buckets/<R>/*.parquet and index/<R>.parquet
    resolution: int
    detailed_caption_prob: float = 0.5  # recaption vs recaption_short
    num_workers: int = 2  # DataLoader decode workers per loader rank
    # rows: every epoch permutes each bucket's rows, and every image costs a read of its row group (~8 MiB).
    # row_groups: permutes the row groups, so a batch holds a few whole groups and each is read about once
    # an epoch (trainer.data.BucketSampler); for data that does not fit in the page cache.
    shuffle: Literal["rows", "row_groups"] = "rows"
    # Share of the images never trained on, for the validation loss (log.val_every): chosen by a hash of
    # each key, so the same images in every run and as the index grows (trainer/validation.py).
    holdout_fraction: float = 0.0
    # MB of loader memory for VAE posteriors (2C x h x w values an image: 128 KiB at 256 px in fp32, 8 KiB
    # for the demo's), each kept from an image's first encoding so later epochs skip the VAE encoder; for data
    # seen over many epochs. Memory only: a resumed run encodes again (trainer/vae_memo.py). 0: off.
    vae_memo_mb: float = 0.0

    def __post_init__(self):
        if self.resolution < PATCH_MULTIPLE or self.resolution % PATCH_MULTIPLE:
            raise ConfigError(f"resolution: must be a positive multiple of {PATCH_MULTIPLE}, got {self.resolution}")
        _probability(self.detailed_caption_prob, "detailed_caption_prob")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(f"holdout_fraction: must be in [0, 1), got {self.holdout_fraction}")
        _at_least(self, 0, "num_workers")
        _at_least(self, 0, "vae_memo_mb")


@dataclass
class TrainSection:
    total_steps: int
    batch_size: int  # per model rank
    accumulation_steps: int = 1
    lr: float = 1e-4
    warmup_steps: int = 1000
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0  # the cosine schedule's floor
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    t_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    t_mean: float = 0.0
    t_std: float = 1.0
    # SD3's timestep shift towards noise: a number (1: none), or "resolution", sqrt(pixels / 256^2) of each
    # batch's bucket, so larger images keep the noise level per area of a 256 px one.
    t_shift: float | Literal["resolution"] = 1.0
    null_prob_pooled: float = 0.1
    null_prob_text: list[float] = field(default_factory=lambda: [0.316, 0.316])  # per sequence encoder

    def __post_init__(self):
        _at_least(self, 1, "total_steps", "batch_size", "accumulation_steps")
        _at_least(self, 0, "warmup_steps", "weight_decay", "min_lr", "seed")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be positive, got {self.lr}")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr: {self.min_lr} is above lr {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas: expected two numbers in [0, 1), got {self.betas}")
        if self.grad_clip <= 0:
            raise ConfigError(f"grad_clip: must be positive, got {self.grad_clip}")
        if self.t_std <= 0:
            raise ConfigError(f"t_std: must be positive, got {self.t_std}")
        if self.t_shift != "resolution" and self.t_shift <= 0:
            raise ConfigError(f"t_shift: must be positive (1 for none) or 'resolution', got {self.t_shift}")
        _probability(self.null_prob_pooled, "null_prob_pooled")
        for i, p in enumerate(self.null_prob_text):
            _probability(p, f"null_prob_text[{i}]")


@dataclass
class CheckpointSection:
    dir: Path
    every: int
    keep: int = 3
    init_from: Path | None = None  # finetune: start from this checkpoint's weights
    reset_optimizer: bool = False  # with init_from: fresh optimizer state (the reference's reset_optim)
    reset_logger: bool = False  # with init_from: a new wandb run (the reference's reset_wandb)

    def __post_init__(self):
        _at_least(self, 1, "every", "keep")


@dataclass
class TopologySection:
    # {loader rank: [model ranks]}; when unset, derived from WORLD_SIZE and models_per_loader.
    loader_to_model: dict[int, list[int]] | None = None
    models_per_loader: int | None = None  # without a map: 3, the reference's
    colocated: bool = False  # every rank encodes its own data (one GPU, a laptop)
    prefetch: int = 2  # batches a loader keeps in flight per model rank; its receiver queues as many and holds one more
    timeout_s: float = 300.0  # collectives and point-to-point
    # The waits of a start: a model rank's for its loader's first batch (the loader first loads its encoders,
    # from the Hub the first time, and encodes the validation batches; if it fails it says so at once), and a
    # loader's for its model ranks to take their first batches (they build the model and compile a step).
    startup_timeout_s: float = 1800.0

    def __post_init__(self):
        if self.loader_to_model is not None and self.models_per_loader is not None:
            raise ConfigError(f"models_per_loader: {self.models_per_loader} and loader_to_model {self.loader_to_model} "
                              "both say how many model ranks a loader feeds: give one (loader_to_model=null derives "
                              "the map from WORLD_SIZE and models_per_loader)")
        if self.loader_to_model is None and not self.colocated:
            if self.models_per_loader is None:
                self.models_per_loader = 3
            _at_least(self, 1, "models_per_loader")
        _at_least(self, 1, "prefetch")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s: must be positive, got {self.timeout_s}")
        if self.startup_timeout_s < self.timeout_s:
            raise ConfigError(f"startup_timeout_s: {self.startup_timeout_s} is below timeout_s {self.timeout_s}")


@dataclass
class ModelSection:
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # any MMDiTConfig field, e.g. max_res

    def __post_init__(self):
        if self.preset not in MODEL_PRESETS:
            raise ConfigError(f"preset: unknown MMDiT preset {self.preset!r} (known: {', '.join(MODEL_PRESETS)})")
        self.mmdit_config()

    def mmdit_config(self) -> MMDiTConfig:
        """The preset with the overrides applied, type-checked field by field."""
        base = dataclasses.asdict(MODEL_PRESETS[self.preset])
        unknown = [name for name in self.overrides if name not in base]
        if unknown:
            raise ConfigError(f"overrides.{unknown[0]}: not an MMDiT setting (known: {', '.join(base)})")
        try:
            return from_mapping(MMDiTConfig, {**base, **self.overrides}, "overrides")
        except ConfigError:
            raise
        except ValueError as err:  # MMDiTConfig's own checks raise plain ValueError
            raise ConfigError(f"overrides: {err}") from err


@dataclass
class EmaSection:
    every: int = 100
    decay: float = 0.99
    device: Literal["same", "cpu"] = "same"  # "cpu" keeps the EMA weights off the GPU

    def __post_init__(self):
        _at_least(self, 1, "every")
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"decay: must be in [0, 1), got {self.decay}")


@dataclass
class LogSection:
    wandb_mode: Literal["disabled", "offline", "online"] = "disabled"
    wandb_project: str = "sd3-from-scratch"
    every: int = 10  # a wandb point (the window's means) and the console's figures; metrics.jsonl has every step
    sample_every: int = 0  # 0 = never
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 20
    sample_cfg: float = 5.0
    progress: bool = True
    # FID (and CLIP score) of the EMA weights against reference images, into metrics.jsonl as eval_fid /
    # eval_clip_score and <checkpoint.dir>/eval/step_*.json (see trainer/evaluation.py). The other model
    # ranks wait meanwhile: keep the prompt set small enough to finish within topology.timeout_s.
    eval_every: int = 0  # 0 = never
    eval_prompts_file: Path | None = None  # one prompt per line
    eval_reference: Path | None = None  # image folder, or bucketed parquet shard(s)
    eval_inception: Path | None = None  # FID Inception-v3 weights file
    eval_clip: Path | None = None  # local CLIP folder; no CLIP score without it
    eval_steps: int = 20
    eval_cfg: float = 5.0
    eval_images_per_prompt: int = 1
    eval_reference_images: int = 10_000  # at most, spread over eval_reference; read once, at the first evaluation
    # Validation loss of the training and the EMA weights on held-out images (data.holdout_fraction) at
    # val_timesteps fixed t, into metrics.jsonl as val_loss, val_loss_ema and val_loss/t<t>.
    val_every: int = 0  # 0 = never
    val_images: int = 256  # at most this many held-out images (those with the smallest key hashes)
    val_timesteps: int = 8

    def __post_init__(self):
        _at_least(self, 1, "every", "sample_steps", "eval_steps", "eval_images_per_prompt", "val_images", "val_timesteps")
        _at_least(self, 2, "eval_reference_images")
        _at_least(self, 0, "sample_every", "eval_every", "val_every")
        if self.sample_every and not self.sample_prompts:
            raise ConfigError("sample_prompts: give at least one prompt when sample_every > 0")
        if self.eval_every:
            # Checked here, before any rank starts, rather than at the first evaluation hours in.
            for name in ("eval_prompts_file", "eval_reference", "eval_inception"):
                path = getattr(self, name)
                if path is None or not path.exists():
                    raise ConfigError(f"{name}: {'not set' if path is None else f'{path} does not exist'} "
                                      "(needed when eval_every > 0)")
            if self.eval_clip is not None and not self.eval_clip.is_dir():
                raise ConfigError(f"eval_clip: {self.eval_clip} is not a folder")


@dataclass
class TrainConfig:
    data: DataSection
    train: TrainSection
    checkpoint: CheckpointSection
    topology: TopologySection = field(default_factory=TopologySection)
    model: ModelSection = field(default_factory=ModelSection)
    encoders: EncodersConfig = field(default_factory=lambda: EncodersConfig(preset=DEFAULT_ENCODERS_PRESET))
    ema: EmaSection = field(default_factory=EmaSection)
    log: LogSection = field(default_factory=LogSection)

    def __post_init__(self):
        model = self.model.mmdit_config()
        if len(self.train.null_prob_text) != model.num_text_encoders:
            raise ConfigError(
                f"train.null_prob_text: {len(self.train.null_prob_text)} probabilities for "
                f"{model.num_text_encoders} text encoders"
            )
        # The MMDiT reads what the encoders write: a mismatch would only surface as a shape error mid-run.
        if (model.text_dim, model.text_len_per_encoder) != (self.encoders.text_dim, self.encoders.text_len):
            raise ConfigError(
                f"model: text_dim {model.text_dim} / text_len_per_encoder {model.text_len_per_encoder} do not match "
                f"encoders.text_dim {self.encoders.text_dim} / encoders.text_len {self.encoders.text_len}"
            )
        if self.log.val_every and not self.data.holdout_fraction:
            raise ConfigError("log.val_every: the validation loss needs held-out images: set data.holdout_fraction > 0")
        if PATCH_MULTIPLE % (model.patch_size * VAE_DOWNSAMPLING):
            raise ConfigError(
                f"model.overrides.patch_size: {model.patch_size} x VAE {VAE_DOWNSAMPLING} does not divide the bucket "
                f"multiple {PATCH_MULTIPLE}"
            )


    def doubtful_settings(self) -> list[str]:
        """Legal settings that are probably mistakes: rank 0 logs them as warnings at start."""
        doubts = []
        if self.train.warmup_steps >= self.train.total_steps:
            doubts.append(f"train.warmup_steps {self.train.warmup_steps} >= train.total_steps {self.train.total_steps}: "
                          f"the learning rate never reaches train.lr {self.train.lr:g}")
        if self.ema.every > self.train.total_steps:
            doubts.append(f"ema.every {self.ema.every} > train.total_steps {self.train.total_steps}: "
                          "the EMA weights are never updated")
        return doubts


def _split_override(override: str) -> tuple[list[str], Any]:
    key, sep, raw = override.partition("=")
    path = key.strip().split(".")
    if not sep or len(path) < 2 or not all(path):
        raise ConfigError(f"override {override!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {err}") from err
    return path, value


def _absolute(base: Path, value: str) -> str:
    return str((base / Path(value).expanduser()).resolve())


def apply_overrides(data: dict, overrides: list[str], cwd: Path) -> dict:
    """``data`` with each dotted ``section.key=value`` set; path values made absolute against ``cwd``."""
    for override in overrides:
        path, value = _split_override(override)
        if tuple(path) in PATH_KEYS and isinstance(value, str):
            value = _absolute(cwd, value)
        node = data
        for depth, name in enumerate(path[:-1]):
            child = node.setdefault(name, {})
            if child is None:
                child = node[name] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)}: '{'.'.join(path[: depth + 1])}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def _resolve_file_paths(data: dict, base: Path) -> None:
    for section, key in PATH_KEYS:
        values = data.get(section)
        if isinstance(values, dict) and isinstance(values.get(key), str):
            values[key] = _absolute(base, values[key])


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read the YAML at ``path``, apply ``overrides``, and validate everything; raises ``ConfigError``."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    _resolve_file_paths(data, Path(path).resolve().parent)
    apply_overrides(data, list(overrides), Path.cwd())
    encoders = data.get("encoders")
    if encoders is None or (isinstance(encoders, dict) and "preset" not in encoders):
        data["encoders"] = {**(encoders or {}), "preset": DEFAULT_ENCODERS_PRESET}
    return from_mapping(TrainConfig, data)
