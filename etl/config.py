"""Typed pipeline configuration, loaded from YAML with errors that name the offending key.

``from_mapping`` is the one loader for every config dataclass in the project (the trainer uses it too):
unknown keys, wrong types and invalid values are errors that name the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    pass


_EXPONENT_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _yaml_bool_hint(value: Any) -> str:
    # YAML 1.1 (PyYAML) reads unquoted on/off/yes/no as booleans: `wandb_mode: off` arrives as False.
    return " (YAML reads unquoted on/off/yes/no as true/false: quote the word)" if isinstance(value, bool) else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool) != isinstance(typing.get_args(tp)[0], bool):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}{_yaml_bool_hint(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)

        def key(k):
            # JSON (a config saved with a checkpoint) turns integer keys into strings.
            if key_tp is int and isinstance(k, str) and k.lstrip("-").isdigit():
                return int(k)
            return _coerce(k, key_tp, f"{where}.{k}")

        return {key(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 (PyYAML) reads 1e-4, without a dot, as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        # NaN passes every range check (all comparisons are false): a NaN clip or rate trained to NaN.
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}{_yaml_bool_hint(value)}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value).expanduser()
    return value


def from_mapping(cls, data: Any, where: str = ""):
    """Build dataclass ``cls`` from a mapping; unknown or missing keys raise ``ConfigError`` naming the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing config key '{prefix}{name}'")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}" if where else str(err)) from err


def to_mapping(obj) -> dict:
    """The inverse of ``from_mapping``: plain dicts, lists and strings, ready for YAML or JSON."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(obj)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f)
    return data or {}


# --- the data pipeline's config -------------------------------------------------------------


@dataclass
class SourceConfig:
    name: str
    path: Path  # the URL list; for kind img2dataset, an img2dataset (or webdataset) output folder
    kind: Literal["laion_parquet", "cc12m_tsv", "img2dataset"] = "laion_parquet"
    url_col: str = "url"
    caption_col: str = "caption"
    extra_cols: list[str] = field(default_factory=list)
    # cc12m_tsv only: false for a TSV without a header row, as CC12M ships: its columns are then
    # [url_col, caption_col, *extra_cols] in that order.
    header: bool = True

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"sources: name {self.name!r} must be letters, digits, '-' or '_'")
        reserved = [name for name in self.extra_cols if name in ("key", "url", "caption", "source")]
        if reserved:  # the pipeline writes these itself: a column of the list by that name would clash
            raise ConfigError(f"sources: {self.name}: extra_cols {reserved[0]!r} is a column the pipeline makes; "
                              "map the list's own url and caption with url_col and caption_col")


@dataclass
class DownloadConfig:
    processes: int = 4
    threads: int = 32
    timeout: int = 10
    retries: int = 0  # img2dataset's: tries again at once, inside the same request
    # Further passes over the URLs that timed out or met a connection or a 429/502/503/504 error, each after
    # the whole shard has been tried: a host that was down for a moment has had time to come back.
    transient_passes: int = 1
    # "original" keeps the downloaded bytes as they are; "jpg"/"png"/"webp" re-encode inside img2dataset.
    encode_format: Literal["original", "jpg", "png", "webp"] = "original"
    user_agent_token: str | None = None
    disallowed_header_directives: list[str] = field(default_factory=list)

    def __post_init__(self):
        for name, least in (("processes", 1), ("threads", 1), ("timeout", 1), ("retries", 0), ("transient_passes", 0)):
            if getattr(self, name) < least:
                raise ConfigError(f"{name}: must be at least {least}, got {getattr(self, name)}")


@dataclass
class FilterConfig:
    min_side: int = 64
    max_punsafe: float | None = 0.5
    max_pwatermark: float | None = 0.8
    dedup: bool = True

    def __post_init__(self):
        if self.min_side < 0:
            raise ConfigError(f"min_side: must be at least 0, got {self.min_side}")
        for name in ("max_punsafe", "max_pwatermark"):  # probabilities, as LAION's columns give them
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ConfigError(f"{name}: must be in [0, 1] or null, got {value}")


@dataclass
class RecaptionConfig:
    # "alt-text" is the model-free smoke backend: the cleaned alt text becomes both captions.
    backend: Literal["alt-text", "transformers", "vllm"] = "alt-text"
    vlm: str = "llava-hf/llama3-llava-next-8b-hf"  # hub id or local path
    llm: str = "meta-llama/Meta-Llama-3-8B-Instruct"  # hub id or local path of a chat model
    # Prompt overrides; None keeps the reference prompts in etl/recaption/prompts.py.
    vlm_prompt: str | None = None  # must contain {alt_text}
    llm_prompt: str | None = None  # must contain {caption}
    llm_system_prompt: str | None = None
    batch_size: int = 16
    max_new_tokens: int = 256  # detailed caption
    short_max_new_tokens: int = 96
    max_image_side: int = 512  # images are downscaled to this long side before the VLM
    device: str = "auto"  # "auto" picks cuda when visible, else cpu
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    chunk_rows: int = 64  # finished rows persisted per resume chunk
    vllm_gpu_memory_utilization: float = 0.45  # per engine: the VLM and the LLM share one GPU

    def __post_init__(self):
        for name in ("batch_size", "max_new_tokens", "short_max_new_tokens", "max_image_side", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1")
        for name, placeholder in (("vlm_prompt", "{alt_text}"), ("llm_prompt", "{caption}")):
            prompt = getattr(self, name)
            if prompt is not None and placeholder not in prompt:
                raise ConfigError(f"{name}: must contain the placeholder {placeholder}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError("vllm_gpu_memory_utilization: must be in (0, 1]")


@dataclass
class BucketConfig:
    resolutions: list[int] = field(default_factory=lambda: [256, 512, 1024])
    format: Literal["png", "jpeg", "webp"] = "png"
    quality: int = 95  # jpeg/webp only
    multiple: int = 16  # patch size 2 x VAE downsampling 8

    def __post_init__(self):
        if self.multiple < 1:
            raise ConfigError(f"multiple: must be at least 1, got {self.multiple}")
        if not 0 <= self.quality <= 100:  # Pillow's scale for JPEG and WebP alike
            raise ConfigError(f"quality: must be in [0, 100], got {self.quality}")
        if not self.resolutions:
            raise ConfigError("resolutions: give at least one resolution")
        for r in self.resolutions:
            if r < self.multiple or r % self.multiple:
                raise ConfigError(f"resolutions: {r} is not a positive multiple of {self.multiple}")
        if len(set(self.resolutions)) != len(self.resolutions):
            raise ConfigError(f"resolutions: each resolution once, got {self.resolutions}")


@dataclass
class AutomationConfig:
    # A folder of URL lists: each *.parquet (LAION-style) or *.tsv (CC12M-style) file dropped here
    # becomes a source named after the file, with columns `url` and `caption`; the sensor picks it up.
    watch_dir: Path | None = None
    recaption_cron: str = "0 * * * *"  # the schedule that backfills recaptioning
    recaption_pool_limit: int | None = None  # recaption steps at once; None: one per visible GPU (1 on CPU)
    sensor_interval_s: int = 60  # least time between two evaluations of the URL-list sensor
    retries: int = 2  # the sensor's runs that fail are requested again up to this many times

    def __post_init__(self):
        if self.sensor_interval_s < 1:
            raise ConfigError(f"sensor_interval_s: must be at least 1, got {self.sensor_interval_s}")
        if self.retries < 0:
            raise ConfigError(f"retries: must be at least 0, got {self.retries}")


@dataclass
class PipelineConfig:
    root: Path
    sources: list[SourceConfig]
    shard_size: int = 10000
    download: DownloadConfig = field(default_factory=DownloadConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    recaption: RecaptionConfig = field(default_factory=RecaptionConfig)
    buckets: BucketConfig = field(default_factory=BucketConfig)
    concurrency: int = 2  # Dagster runs (one per partition) executed at once
    automation: AutomationConfig = field(default_factory=AutomationConfig)

    def __post_init__(self):
        if self.shard_size < 1:
            raise ConfigError("shard_size: must be at least 1")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"sources: names must be unique, got {names}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PipelineConfig":
        config = from_mapping(cls, load_yaml(path))
        # Relative paths in a config file are relative to that file, so configs can travel with their data.
        base = Path(path).resolve().parent
        config.root = (base / config.root).resolve()
        for source in config.sources:
            source.path = (base / source.path).resolve()
        if config.automation.watch_dir is not None:
            config.automation.watch_dir = (base / config.automation.watch_dir).resolve()
        return config

    def all_sources(self) -> list[SourceConfig]:
        """The configured sources, then one per URL list found in `automation.watch_dir`."""
        watched = []
        folder = self.automation.watch_dir
        if folder is not None and folder.is_dir():
            configured = {s.path for s in self.sources}
            kinds = {".parquet": "laion_parquet", ".tsv": "cc12m_tsv"}
            for path in sorted(p for p in folder.iterdir() if p.suffix in kinds and p.resolve() not in configured):
                name = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem)
                watched.append(SourceConfig(name=name, path=path.resolve(), kind=kinds[path.suffix]))
        sources = self.sources + watched
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"sources: names must be unique (watched files included), got {names}")
        return sources
