"""MMDiT: the Stable-Diffusion-3 dual-stream transformer, with the reference run's changes.

Reads top to bottom: config and presets -> small layers (time embedding, text embedding, positions,
attention) -> the joint block -> the model. Changes from the SD3 paper, as in the reference run:
  * each text encoder's hidden states get their own RMS-norm (with a learnable scale) and projection;
  * the time embedding multiplies t by a learnable scale (init 1000) and goes through its MLP and the
    SiLU once per forward, not once per block;
  * the residual path is the ordinary pre-norm one: block input -> + attention -> + MLP;
  * RoPE-2D on image tokens by (row, column), rescaled by max_res_orig / max_res when finetuning at a
    higher resolution; text tokens carry no position.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from torch.utils.checkpoint import checkpoint

try:
    from flash_attn import flash_attn_func
except ImportError:  # flash-attn is a GPU-only extra; SDPA computes the same attention.
    flash_attn_func = None


@dataclass(frozen=True)
class MMDiTConfig:
    in_channels: int = 16
    patch_size: int = 2
    dim: int = 64 * 19
    num_blocks: int = 19
    num_heads: int = 19
    hidden_scale: float = 4.0
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    text_dim: int = 2304
    text_len_per_encoder: int = 77
    num_text_encoders: int = 2
    pooled_dim: int = 768
    positional_encoding: Literal["rope2d", "absolute", "nope"] = "rope2d"
    # Resolutions in pixels; only their ratio matters (it rescales positions when finetuning higher).
    max_res: int = 256
    max_res_orig: int = 256
    checkpoint_attn: bool = False
    checkpoint_mlp: bool = False
    qk_norm: bool = True
    rope_theta: float = 10000.0
    # "auto": flash-attn on CUDA in half precision when installed, else PyTorch SDPA.
    attention: Literal["auto", "flash", "sdpa"] = "auto"

    def __post_init__(self):
        choices = {"mlp": ("swiglu", "gelu"), "positional_encoding": ("rope2d", "absolute", "nope"),
                   "attention": ("auto", "flash", "sdpa")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"MMDiTConfig.{name}={getattr(self, name)!r} is not one of {list(allowed)}")
        if self.dim % self.num_heads:
            raise ValueError(f"MMDiTConfig: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.positional_encoding == "rope2d" and self.head_dim % 4:
            raise ValueError(f"MMDiTConfig: rope2d needs head_dim ({self.head_dim}) divisible by 4")
        if self.positional_encoding == "absolute" and self.dim % 4:
            raise ValueError(f"MMDiTConfig: absolute positions need dim ({self.dim}) divisible by 4")
        for name in ("patch_size", "num_blocks", "num_text_encoders", "text_len_per_encoder", "max_res", "max_res_orig"):
            if getattr(self, name) < 1:
                raise ValueError(f"MMDiTConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def text_len(self) -> int:
        return self.num_text_encoders * self.text_len_per_encoder


PRESETS: dict[str, MMDiTConfig] = {
    # Keeps the real structure (2 encoders x 77 tokens, RoPE-2D, SwiGLU) at a size a CPU trains.
    "tiny": MMDiTConfig(dim=128, num_blocks=4, num_heads=4, text_dim=64, pooled_dim=64),
    # SD3's depth rule (dim 64*depth, depth heads) at depth 12, with the reference encoders' widths: a
    # model one GPU trains at a useful pace, for colocated runs and for sizing a cluster run.
    "mid-300m": MMDiTConfig(dim=64 * 12, num_blocks=12, num_heads=12),
    # The reference run: 19 blocks, dim 64*19, 19 heads, Gemma-2-2B width text, MetaCLIP-L pooled.
    "reference-1.2b": MMDiTConfig(),
}


# --- small layers --------------------------------------------------------------------------------

# addcmul does each of these in one pass over the activations instead of two.
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(x, gate, update)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbedding(nn.Module):
    """sin-cos of (t * learnable scale), then an MLP; the scale starts at 1000 so t in [0, 1] spans the
    sinusoid frequencies like integer DDPM steps do, and the model may retune it."""

    frequency_dim = 256

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1000.0))
        self.mlp = nn.Sequential(nn.Linear(self.frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # In fp32 (MMDiT.to_inference_dtype keeps this module fp32): bf16 holds only multiples of 4 between
        # 512 and 1024, which would put the fastest sinusoids up to 2 radians off at t = 1.
        emb = sinusoidal_embedding(t.float() * self.scale.float(), self.frequency_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class TextEmbedding(nn.Module):
    """Per text encoder: RMS-norm with a learnable scale, then its own projection. Encoders differ in
    statistics by orders of magnitude (Gemma's hidden states are huge), so they are normalised apart."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.len_per_encoder = cfg.text_len_per_encoder
        self.norms = nn.ModuleList(nn.RMSNorm(cfg.text_dim, eps=1e-6) for _ in range(cfg.num_text_encoders))
        self.projections = nn.ModuleList(nn.Linear(cfg.text_dim, cfg.dim) for _ in range(cfg.num_text_encoders))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        chunks = text.split(self.len_per_encoder, dim=1)
        return torch.cat([proj(norm(chunk)) for chunk, norm, proj in zip(chunks, self.norms, self.projections)], dim=1)


def patch_positions(grid_h: int, grid_w: int, rescale: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of each patch in row-major token order, scaled by max_res_orig / max_res."""
    rows = torch.arange(grid_h, device=device, dtype=torch.float32) * rescale
    cols = torch.arange(grid_w, device=device, dtype=torch.float32) * rescale
    return rows.repeat_interleave(grid_w), cols.repeat(grid_h)


def rope2d_angles(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """(N, head_dim/2) rotation angles: the first half of each head's channel pairs turn with the row,
    the second half with the column, so q.k depends only on the (row, col) offset."""
    axis_dim = head_dim // 2
    freqs = theta ** (-torch.arange(0, axis_dim, 2, device=rows.device, dtype=torch.float32) / axis_dim)
    return torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D): rotate consecutive channel pairs by cos/sin (N, D/2), in fp32. Real arithmetic
    rather than complex numbers, which torch.compile cannot fuse."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


def sincos_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """Absolute 2-D sin-cos embedding (N, dim): half the channels encode the row, half the column."""
    return torch.cat([sinusoidal_embedding(rows, dim // 2), sinusoidal_embedding(cols, dim // 2)], dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Softmax attention over (B, heads, L, head_dim) tensors, the layout SDPA takes without copies."""
    flash_ok = flash_attn_func is not None and v.is_cuda and v.dtype in (torch.float16, torch.bfloat16)
    if backend == "flash" and not flash_ok:
        raise RuntimeError("attention='flash' needs flash-attn installed and fp16/bf16 CUDA tensors")
    if backend in ("auto", "flash") and flash_ok:
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)


class QKNorm(nn.RMSNorm):
    """RMS-norm of queries or keys, computed in fp32 and returned in their dtype: under autocast they
    arrive in bf16 while the weight stays fp32, and the fused kernel needs one dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).type_as(x)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden)  # gate and up projections fused into one matmul
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def make_mlp(cfg: MMDiTConfig) -> nn.Module:
    hidden = int(cfg.dim * cfg.hidden_scale)
    if cfg.mlp == "swiglu":
        return SwiGLU(cfg.dim, hidden)
    return nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, cfg.dim))


# --- the joint block ------------------------------------------------------------------------------

class Stream(nn.Module):
    """One modality's half of a joint block: its adaLN modulation, QKV with QK RMS-norm, the output
    projection and the MLP. The text stream of the last block, whose output nothing reads, keeps only
    its keys and values: the image tokens still attend to the text."""

    def __init__(self, cfg: MMDiTConfig, has_output: bool):
        super().__init__()
        self.has_output = has_output
        self.num_heads = cfg.num_heads
        self.modulation = nn.Linear(cfg.dim, (6 if has_output else 2) * cfg.dim)
        self.norm_attn = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(cfg.dim, (3 if has_output else 2) * cfg.dim)
        self.q_norm = QKNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm and has_output else nn.Identity()
        self.k_norm = QKNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()
        if has_output:
            self.proj = nn.Linear(cfg.dim, cfg.dim)
            self.norm_mlp = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
            self.mlp = make_mlp(cfg)

    def qkv_heads(self, h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
        """-> q, k, v as (B, heads, L, head_dim); q is None for a stream without output."""
        qkv = self.qkv(modulate(self.norm_attn(h), shift, scale))
        *q, k, v = qkv.unflatten(-1, (-1, self.num_heads, h.shape[-1] // self.num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
        return (self.q_norm(q[0]) if q else None), self.k_norm(k), v

    def feed_forward(self, h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.mlp(modulate(self.norm_mlp(h), shift, scale))


class JointBlock(nn.Module):
    def __init__(self, cfg: MMDiTConfig, last: bool):
        super().__init__()
        self.image = Stream(cfg, has_output=True)
        self.text = Stream(cfg, has_output=not last)
        self.attention_backend = cfg.attention
        self.checkpoint_attn = cfg.checkpoint_attn
        self.checkpoint_mlp = cfg.checkpoint_mlp

    def joint_attention(self, x, c, x_shift, x_scale, c_shift, c_scale, rope):
        """Attention over the concatenated [image, text] tokens; returns each stream's share (None for
        a text stream without output, whose queries are then not computed)."""
        qx, kx, vx = self.image.qkv_heads(x, x_shift, x_scale)
        qc, kc, vc = self.text.qkv_heads(c, c_shift, c_scale)
        if rope is not None:
            qx, kx = apply_rope(qx, *rope), apply_rope(kx, *rope)
        q = qx if qc is None else torch.cat([qx, qc], 2)
        out = attention(q, torch.cat([kx, kc], 2), torch.cat([vx, vc], 2), self.attention_backend)
        out = out.transpose(1, 2).flatten(2)
        if qc is None:
            return self.image.proj(out), None
        out_x, out_c = out.split([x.shape[1], c.shape[1]], dim=1)
        return self.image.proj(out_x), self.text.proj(out_c)

    def _run(self, fn, use_checkpoint: bool, *args):
        if use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x, c, cond, rope):
        x_mod = self.image.modulation(cond)[:, None].chunk(6, dim=-1)
        c_mod = self.text.modulation(cond)[:, None].chunk(6 if self.text.has_output else 2, dim=-1)
        # modulation chunks: (shift, scale, gate) for attention, then (shift, scale, gate) for the MLP
        attn_x, attn_c = self._run(self.joint_attention, self.checkpoint_attn, x, c, x_mod[0], x_mod[1], c_mod[0], c_mod[1], rope)
        x = gated_residual(x, x_mod[2], attn_x)
        x = gated_residual(x, x_mod[5], self._run(self.image.feed_forward, self.checkpoint_mlp, x, x_mod[3], x_mod[4]))
        if self.text.has_output:
            c = gated_residual(c, c_mod[2], attn_c)
            c = gated_residual(c, c_mod[5], self._run(self.text.feed_forward, self.checkpoint_mlp, c, c_mod[3], c_mod[4]))
        return x, c


class FinalLayer(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.modulation = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(cfg.dim, cfg.patch_size**2 * cfg.in_channels)

    def forward(self, x, cond):
        shift, scale = self.modulation(cond)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


# --- the model ------------------------------------------------------------------------------------

def _signature_from_config(init):
    """diffusers reads the config keys from __init__'s signature (to save config.json and to rebuild
    the model in from_pretrained); derive that signature from MMDiTConfig so fields are declared once."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in dataclasses.fields(MMDiTConfig)]
    init.__signature__ = inspect.Signature(params)
    return init


class MMDiT(ModelMixin, ConfigMixin):
    """forward(x, t, text, pooled, drop_text=None, drop_pooled=None) -> v, the rectified-flow velocity.

    x (B, C, H, W) latents, H and W multiples of patch_size, any aspect ratio; t (B,) in [0, 1];
    text (B, num_text_encoders * text_len_per_encoder, text_dim), encoder 1's rows first; pooled
    (B, pooled_dim); drop_text (B,) or (B, num_text_encoders) bool and drop_pooled (B,) bool zero
    those conditions (CFG dropout and the unconditional half of CFG sampling).
    """

    @register_to_config
    @_signature_from_config
    def __init__(self, **config):
        super().__init__()
        cfg = MMDiTConfig(**config)
        self._mmdit_config = cfg
        self.patch_embed = nn.Linear(cfg.in_channels * cfg.patch_size**2, cfg.dim)
        self.time_embed = TimeEmbedding(cfg.dim)
        self.pooled_embed = nn.Sequential(nn.Linear(cfg.pooled_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.text_embed = TextEmbedding(cfg)
        self.blocks = nn.ModuleList(JointBlock(cfg, last=i == cfg.num_blocks - 1) for i in range(cfg.num_blocks))
        self.final = FinalLayer(cfg)
        self._init_weights()

    def _init_weights(self):
        # DiT's initialisation: xavier linears, zero biases, and zero adaLN modulation and output layer
        # so every block starts as the identity and the first prediction is v = 0.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for layer in [*(s.modulation for b in self.blocks for s in (b.image, b.text)), self.final.modulation, self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MMDiT:
        if name not in PRESETS:
            raise ValueError(f"unknown MMDiT preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**dataclasses.asdict(dataclasses.replace(PRESETS[name], **overrides)))

    def compile_blocks(self, dynamic: bool = True) -> None:
        """torch.compile each joint block in place, as torchtitan compiles each transformer block. The blocks
        share their code, so inductor compiles one graph for them all and one for the last block (it has no
        text output), for training and for no-grad passes: four graphs, and on 2 CPU cores about a minute
        whatever the depth, where the whole model took 94 s at 2 blocks and 206 s at 8
        (benchmarks/compile_blocks.py). Dynamic shapes from the start, because buckets change the image
        token count: dynamo's default compiles for the first size and again, dynamic, for the next, which
        made 8 graphs over three sizes and a no-grad pass at 8 blocks: its limit per function, past which it
        runs the function uncompiled.
        ``dynamic=False`` compiles for each size (a benchmark of one size, to price the dynamic graphs)."""
        for block in self.blocks:
            block.compile(dynamic=dynamic)

    @property
    def mmdit_config(self) -> MMDiTConfig:
        return self._mmdit_config

    def _check_inputs(self, x, t, text, pooled):
        cfg, p = self._mmdit_config, self._mmdit_config.patch_size
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"latent height and width must be multiples of patch_size {p}, got {tuple(x.shape[2:])}")
        batch = x.shape[0]
        if t.shape != (batch,):
            raise ValueError(f"t must be ({batch},), got {tuple(t.shape)}")
        if text.shape != (batch, cfg.text_len, cfg.text_dim):
            raise ValueError(f"text must be ({batch}, {cfg.text_len}, {cfg.text_dim}) "
                             f"({cfg.num_text_encoders} encoders x {cfg.text_len_per_encoder} tokens), got {tuple(text.shape)}")
        if pooled.shape != (batch, cfg.pooled_dim):
            raise ValueError(f"pooled must be ({batch}, {cfg.pooled_dim}), got {tuple(pooled.shape)}")

    def drop_conditions(self, text, pooled, drop_text=None, drop_pooled=None):
        """Zero the text rows of each dropped encoder and each dropped pooled vector."""
        cfg = self._mmdit_config
        if drop_text is not None:
            drop_text = drop_text.to(text.device, torch.bool)
            if drop_text.ndim == 1:
                drop_text = drop_text[:, None].expand(-1, cfg.num_text_encoders)
            if drop_text.shape != (text.shape[0], cfg.num_text_encoders):
                raise ValueError(f"drop_text must be ({text.shape[0]},) or ({text.shape[0]}, {cfg.num_text_encoders}), "
                                 f"got {tuple(drop_text.shape)}")
            rows = drop_text.repeat_interleave(cfg.text_len_per_encoder, dim=1)  # (B, L)
            text = text.masked_fill(rows[:, :, None], 0.0)
        if drop_pooled is not None:
            if drop_pooled.shape != (pooled.shape[0],):
                raise ValueError(f"drop_pooled must be ({pooled.shape[0]},), got {tuple(drop_pooled.shape)}")
            pooled = pooled.masked_fill(drop_pooled.to(pooled.device, torch.bool)[:, None], 0.0)
        return text, pooled

    def to_inference_dtype(self, dtype: torch.dtype) -> "MMDiT":
        """Cast for sampling in ``dtype``, the time embedding kept in fp32: cast too, the learned time scale
        would round to a multiple of 4 in bf16 (see TimeEmbedding). Training casts nothing (autocast)."""
        kept = {name: value.clone() for name, value in self.time_embed.state_dict().items()}
        # nn.Module's cast: ModelMixin.to warns on every dtype cast that modules "should be kept in float32",
        # listing none (diffusers checks `[] is not None`); this method is what keeps the one that should.
        nn.Module.to(self, dtype)
        self.time_embed.float().load_state_dict(kept)
        return self

    def forward(self, x, t, text, pooled, drop_text=None, drop_pooled=None) -> torch.Tensor:
        self._check_inputs(x, t, text, pooled)
        cfg, p = self._mmdit_config, self._mmdit_config.patch_size
        batch, channels, height, width = x.shape
        grid_h, grid_w = height // p, width // p
        dtype = self.patch_embed.weight.dtype
        text, pooled = self.drop_conditions(text, pooled, drop_text, drop_pooled)

        patches = x.reshape(batch, channels, grid_h, p, grid_w, p).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)
        tokens = self.patch_embed(patches.to(dtype))
        context = self.text_embed(text.to(dtype))
        pooled = self.pooled_embed(pooled.to(dtype))
        cond = F.silu(self.time_embed(t).to(pooled.dtype) + pooled)  # SiLU once, shared by all adaLNs

        rows, cols = patch_positions(grid_h, grid_w, cfg.max_res_orig / cfg.max_res, x.device)
        rope = None
        if cfg.positional_encoding == "rope2d":
            angles = rope2d_angles(rows, cols, cfg.head_dim, cfg.rope_theta)
            rope = (angles.cos(), angles.sin())
            for table in rope:
                # The channel axis is the head size's: static, so that compiling the blocks with dynamic shapes
                # (compile_blocks) cannot take it for the token axis when the two sizes happen to be equal.
                torch._dynamo.mark_static(table, 1)
        elif cfg.positional_encoding == "absolute":
            tokens = tokens + sincos_2d(rows, cols, cfg.dim).to(tokens.dtype)

        for block in self.blocks:
            tokens, context = block(tokens, context, cond, rope)

        out = self.final(tokens, cond)
        out = out.reshape(batch, grid_h, grid_w, channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(batch, channels, height, width)
