"""The frozen encoders around the MMDiT: the VAE (images <-> latents) and the three text encoders.

As in the reference run: the FLUX VAE (16 latent channels, 8x downsampling, latents shifted and scaled),
Gemma-2-2B and ModernBERT-large (last hidden states, ``text_len`` tokens each, right padded, padding rows
zeroed, zero-padded to ``text_dim`` and stacked to ``2 * text_len`` rows) and MetaCLIP-L/14 (projected
pooled embedding). Each component is a hub id, a local folder, or ``"tiny"``: built from a small config
with random weights (deterministic from ``seed``) and the project's own tokenizer, for CPU runs and tests.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from etl.config import ConfigError, from_mapping, to_mapping

# diffusers' AutoencoderKL and the transformers models are imported where they are built: model ranks import
# this module for EncodersConfig and never build an encoder, and those imports cost every process ~3 s
# (diffusers' autoencoders package imports all of its models; benchmarks/startup_imports.py).
if TYPE_CHECKING:
    from diffusers import AutoencoderKL

TINY = "tiny"
TEXT_ENCODERS = ("gemma", "bert", "clip")
SEQUENCE_ENCODERS = ("gemma", "bert")  # the row blocks of encode_text's text, in order
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EncodersConfig:
    """Which encoders to run. Settings left unset come from ``preset``; the resolved values are recorded
    with every checkpoint (``to_config_dict``), so a checkpoint samples without restating them."""

    preset: str = "reference"
    vae: str | None = None
    vae_subfolder: str | None = None  # the FLUX repo keeps its VAE under "vae"; a local VAE folder has none
    gemma: str | None = None
    bert: str | None = None
    clip: str | None = None
    text_len: int | None = None  # tokens per sequence encoder
    text_dim: int | None = None  # common width; narrower encoders are zero-padded to it
    # Captions are encoded grouped by length, in chunks of at most this many tokens (rows x padded length)
    text_batch_tokens: int = 8192
    latents: Literal["sample", "mode"] = "sample"  # draw from the VAE posterior, or take its mean
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    seed: int = 0  # random weights of "tiny" components

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ConfigError(f"preset: unknown encoder preset {self.preset!r} (known: {', '.join(PRESETS)})")
        base = PRESETS[self.preset]
        if self.vae is None:
            self.vae, self.vae_subfolder = base["vae"], base.get("vae_subfolder")
        elif self.vae_subfolder is None:  # a preset's VAE named outright keeps its subfolder
            self.vae_subfolder = next((p.get("vae_subfolder") for p in PRESETS.values() if p["vae"] == self.vae), None)
        for name in ("gemma", "bert", "clip", "text_len", "text_dim"):
            if getattr(self, name) is None:
                setattr(self, name, base[name])
        if self.text_len < 1 or self.text_dim < 1:
            raise ConfigError(f"text_len, text_dim: must be positive, got {self.text_len}, {self.text_dim}")
        if self.text_batch_tokens < 1:
            raise ConfigError(f"text_batch_tokens: must be positive, got {self.text_batch_tokens}")

    def to_config_dict(self) -> dict:
        return to_mapping(self)

    @classmethod
    def from_config_dict(cls, data: dict) -> "EncodersConfig":
        return from_mapping(cls, data, "encoders")


# Presets fill the unset settings of an EncodersConfig; "demo" is registered below through register_preset.
PRESETS: dict[str, dict] = {
    "reference": {
        "vae": "black-forest-labs/FLUX.1-dev",
        "vae_subfolder": "vae",
        "gemma": "google/gemma-2-2b",
        "bert": "answerdotai/ModernBERT-large",
        "clip": "facebook/metaclip-l14-fullcc2.5b",
        "text_len": 77,
        "text_dim": 2304,
    },
    "tiny": {"vae": TINY, "gemma": TINY, "bert": TINY, "clip": TINY, "text_len": 77, "text_dim": 64},
}


def register_preset(name: str, **settings) -> None:
    missing = {"vae", "gemma", "bert", "clip", "text_len", "text_dim"} - settings.keys()
    if missing:
        raise ValueError(f"preset {name!r} lacks {sorted(missing)}")
    PRESETS[name] = settings


# The demo: the tiny text encoders (fixed random embeddings are enough to learn its captions) with a small
# VAE trained on the demo domain by scripts/train_demo_vae.py, shipped as package data.
# Checkpoints record it by this name, not by its path, so they sample from any checkout or install.
DEMO_VAE, DEMO_VAE_DIR = "demo-vae", Path(__file__).resolve().parent / "assets" / "demo_vae"
register_preset("demo", vae=DEMO_VAE, gemma=TINY, bert=TINY, clip=TINY, text_len=77, text_dim=64)


# --- the tiny components: small configs, random weights ----------------------------------------------

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    # Four block levels -> three 2x downsamplings -> 8x, as in the FLUX VAE.
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=16,
    sample_size=64,
    # The FLUX VAE's factors, so tiny latents go through the same arithmetic as real ones.
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def _tiny_text_configs(vocab_size: int, pad: int, bos: int, eos: int) -> dict:
    from transformers import CLIPTextConfig, Gemma2Config, ModernBertConfig

    ids = dict(vocab_size=vocab_size, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)
    return {
        "gemma": Gemma2Config(
            **ids, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=64,
            max_position_embeddings=256,
        ),
        # Narrower than text_dim on purpose: the zero-padding path runs in every tiny test.
        "bert": ModernBertConfig(
            **ids, cls_token_id=bos, sep_token_id=eos, hidden_size=48, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=2, local_attention=32, max_position_embeddings=256,
        ),
        "clip": CLIPTextConfig(
            **ids, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=64,
        ),
    }


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny_vae(seed: int = 0) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return _seeded(seed, lambda: AutoencoderKL(**TINY_VAE_CONFIG))


def build_tiny_text_encoder(name: str, seed: int = 0):
    """(tokenizer, model) of the tiny ``gemma``, ``bert`` or ``clip`` encoder."""
    from transformers import CLIPTextModelWithProjection, Gemma2Model, ModernBertModel

    from trainer.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    configs = _tiny_text_configs(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    model_cls = {"gemma": Gemma2Model, "bert": ModernBertModel, "clip": CLIPTextModelWithProjection}[name]
    offset = 1 + TEXT_ENCODERS.index(name)  # distinct weights per encoder from one seed
    return tokenizer, _seeded(seed + offset, lambda: model_cls(configs[name]))


# --- loading ---------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _locate(setting: str, value: str) -> str:
    """A local folder or a hub id; a path that does not exist is an error naming the setting."""
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path)
    if value.startswith(("/", ".", "~")) or not _HUB_ID.match(value):
        raise FileNotFoundError(f"encoders.{setting}: local folder {value} does not exist")
    return value


def _from_pretrained(setting: str, value: str, load):
    source = _locate(setting, value)
    try:
        return load(source, token=os.environ.get("HF_TOKEN") or None)
    except OSError as err:
        raise OSError(f"encoders.{setting}: cannot load {value!r}: {err}") from err


def _check_complete(setting: str, value: str, model, loading_info: dict) -> None:
    """A checkpoint that lacks some of the model's weights would load them random, with only a printed
    report: frozen, they would condition every batch on noise (a CLIP text tower saved without its
    projection, another architecture's folder)."""
    if loading_info["missing_keys"]:
        missing = sorted(loading_info["missing_keys"])
        raise ConfigError(f"encoders.{setting}: {value!r} has no weights for {len(missing)} tensors of "
                          f"{type(model).__name__} ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): "
                          "is it the right model?")


def load_vae(config: EncodersConfig, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    if config.vae == TINY:
        vae = build_tiny_vae(config.seed)
        # Cast only when needed: diffusers warns on every dtype cast of a model, even a no-op one.
        return vae if dtype == torch.float32 else vae.to(dtype)
    from diffusers import AutoencoderKL

    value = str(DEMO_VAE_DIR) if config.vae == DEMO_VAE else config.vae
    subfolder = config.vae_subfolder
    if subfolder is None and not (Path(value) / "config.json").exists() and (Path(value) / "vae" / "config.json").exists():
        subfolder = "vae"  # a local copy of a whole pipeline repo (FLUX.1-dev's), its VAE where the repo keeps it
    vae, info = _from_pretrained(
        "vae", value,
        # low_cpu_mem_usage=False: no warning about accelerate on every load (see trainer.checkpoint.load_model)
        lambda src, token: AutoencoderKL.from_pretrained(src, subfolder=subfolder, torch_dtype=dtype, token=token,
                                                         low_cpu_mem_usage=False, output_loading_info=True),
    )
    _check_complete("vae", value, vae, info)
    return vae


def load_text_encoder(name: str, config: EncodersConfig, dtype: torch.dtype = torch.float32):
    """(tokenizer, model) for ``gemma``, ``bert`` or ``clip``; CLIP loads its text tower with projection."""
    value = getattr(config, name)
    if value == TINY:
        tokenizer, model = build_tiny_text_encoder(name, config.seed)
        return tokenizer, model.to(dtype)
    from transformers import AutoModel, AutoTokenizer, CLIPTextModelWithProjection

    model_cls = CLIPTextModelWithProjection if name == "clip" else AutoModel
    tokenizer = _from_pretrained(name, value, lambda src, token: AutoTokenizer.from_pretrained(src, token=token))
    model, info = _from_pretrained(name, value, lambda src, token: model_cls.from_pretrained(
        src, dtype=dtype, token=token, output_loading_info=True))
    _check_complete(name, value, model, info)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        # Padding rows are masked and zeroed, so which id fills them does not matter.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


# Captions whose token counts round up to the same multiple of this run together (at most this many
# padding tokens a caption): few chunks, so each forward stays a large batch.
LENGTH_STEP = 16


def _length_chunks(lengths: list[int], budget: int) -> list[list[int]]:
    """Positions grouped by length rounded up to LENGTH_STEP, each group sorted by length and cut into
    chunks of at most ``budget`` tokens (rows x the group's rounded length; at least one row)."""
    groups: dict[int, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        groups.setdefault(-(-lengths[i] // LENGTH_STEP), []).append(i)
    chunks = []
    for steps, members in sorted(groups.items()):
        rows = max(1, budget // (steps * LENGTH_STEP))
        chunks += [members[j : j + rows] for j in range(0, len(members), rows)]
    return chunks


def _frozen(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return module.to(device).eval().requires_grad_(False)


class Encoders:
    """The VAE and the text encoders, loaded once per process."""

    def __init__(
        self, config: EncodersConfig, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
    ):
        """``device`` and ``dtype`` override the config's (a checkpoint records where it was trained)."""
        self.config = config
        self.device = torch.device(device or config.device)
        self.dtype = dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype or config.dtype]
        self.vae = _frozen(load_vae(config, self.dtype), self.device)
        # On the CPU the encoder's convolutions run 1.3-2.2x faster in NHWC (benchmarks/vae_layout.py); the
        # decoder's gain nothing there, and the GPU layouts are not measured yet, so they stay as they are.
        self._encode_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        for part in (self.vae.encoder, self.vae.quant_conv):
            if part is not None:
                part.to(memory_format=self._encode_format)
        self.tokenizers, self.text_models = {}, {}
        # A colocated rank's feeder thread and its sampling share one Encoders; HF fast tokenizers set their
        # padding and truncation on each call and fail ("Already borrowed") when two threads overlap.
        self._text_lock = threading.Lock()
        for name in TEXT_ENCODERS:
            tokenizer, model = load_text_encoder(name, config, self.dtype)
            self.tokenizers[name], self.text_models[name] = tokenizer, _frozen(model, self.device)
        for name in SEQUENCE_ENCODERS:
            width = self.text_models[name].config.hidden_size
            if width > config.text_dim:
                raise ConfigError(f"encoders.text_dim: {config.text_dim} is narrower than {name}'s width {width}")

    @classmethod
    def from_config_dict(cls, data: dict, device=None, dtype=None) -> "Encoders":
        return cls(EncodersConfig.from_config_dict(data), device=device, dtype=dtype)

    def to_config_dict(self) -> dict:
        return self.config.to_config_dict()

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pooled_dim(self) -> int:
        return self.text_models["clip"].config.projection_dim

    # --- images --------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/8, W/8)."""
        return self.latents_from(self.posteriors(x), generator)

    @torch.no_grad()
    def posteriors(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> the VAE posteriors' parameters (B, 2C, H/8, W/8): means, then log-variances."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"the VAE encodes (B, 3, H, W) images, got shape {tuple(x.shape)}")
        if x.shape[2] % self.downsampling or x.shape[3] % self.downsampling:
            raise ValueError(f"image size {tuple(x.shape[2:])} is not a multiple of {self.downsampling}")
        return self.vae.encode(x.to(self.device, self.dtype).contiguous(memory_format=self._encode_format)).latent_dist.parameters

    @torch.no_grad()
    def latents_from(self, posteriors: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``posteriors`` parameters -> scaled latents: a draw from ``generator``, or the means (``config.latents``)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(posteriors)
        z = posterior.sample(generator) if self.config.latents == "sample" else posterior.mode()
        return ((z - self._shift) * self.vae.config.scaling_factor).contiguous()

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (B, 3, 8h, 8w) in [-1, 1]."""
        z = z.to(self.device, self.dtype) / self.vae.config.scaling_factor + self._shift
        return self.vae.decode(z).sample.clamp(-1, 1)

    @property
    def _shift(self) -> float:
        return self.vae.config.shift_factor or 0.0  # SD-style VAEs have none

    # --- text ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (text (B, 2 * text_len, text_dim), pooled (B, pooled_dim)), in the captions' order.

        The captions run grouped by token count (``LENGTH_STEP``), in chunks of at most ``text_batch_tokens``
        tokens, each padded to its own longest caption instead of every caption to text_len: a loader batch mixes detailed
        captions (often cut at text_len) with short ones of a sentence, and the short ones then cost their
        own length (benchmarks/text_encode.py). The results are those of one batch padded to text_len up to
        float rounding: padding is masked (right padding; causal encoders never look ahead of a token)."""
        if isinstance(captions, str):
            raise TypeError("encode_text takes a list of captions, not one string")
        with self._text_lock:
            return self._encode_text(captions)

    def _encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self._text_models_to(self.device)
        text = torch.zeros(len(captions), 2 * self.config.text_len, self.config.text_dim, device=self.device,
                           dtype=self.dtype)
        pooled = torch.zeros(len(captions), self.pooled_dim, device=self.device, dtype=self.dtype)
        if not captions:
            return text, pooled
        lengths = {"gemma": self.config.text_len, "bert": self.config.text_len,
                   "clip": self.text_models["clip"].config.max_position_embeddings}
        ids = {name: self.tokenizers[name](list(captions), truncation=True, max_length=lengths[name])["input_ids"]
               for name in TEXT_ENCODERS}
        longest = [max(len(ids[name][i]) for name in TEXT_ENCODERS) for i in range(len(captions))]
        for chunk in _length_chunks(longest, self.config.text_batch_tokens):
            rows = torch.tensor(chunk, device=self.device)
            for block, name in enumerate(SEQUENCE_ENCODERS):
                hidden = self._sequence(name, [ids[name][i] for i in chunk])
                start = block * self.config.text_len
                text[rows, start : start + hidden.shape[1], : hidden.shape[2]] = hidden
            pooled[rows] = self.text_models["clip"](**self._pad("clip", [ids["clip"][i] for i in chunk])).text_embeds
        return text, pooled

    def _pad(self, name: str, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizers[name].pad({"input_ids": ids}, padding="longest", return_tensors="pt")
        return {"input_ids": tokens["input_ids"].to(self.device), "attention_mask": tokens["attention_mask"].to(self.device)}

    def _sequence(self, name: str, ids: list[list[int]]) -> torch.Tensor:
        """(b, longest, width) last hidden states, padding rows zeroed."""
        tokens = self._pad(name, ids)
        hidden = self.text_models[name](**tokens).last_hidden_state
        return hidden * tokens["attention_mask"][..., None].to(hidden.dtype)

    def free_text_encoders(self) -> None:
        """Offload the text encoders to CPU so sampling memory is the model and the VAE decoder;
        the next ``encode_text`` brings them back."""
        with self._text_lock:
            self._text_models_to(torch.device("cpu"))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _text_models_to(self, device: torch.device) -> None:
        for model in self.text_models.values():
            model.to(device)
