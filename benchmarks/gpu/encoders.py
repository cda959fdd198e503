"""Loader-rank throughput: the reference's VAE and text encoders at their real sizes, random weights.

No weights can be downloaded, so each encoder is built from a config that reproduces the real model's
size (Gemma-2-2B, ModernBERT-large, the MetaCLIP-L/14 text tower, the FLUX VAE), saved with
save_pretrained and loaded back through `Encoders` exactly as a hub id or local folder is. Random weights
cost the same time as trained ones. These are the numbers that size the loader:model ratio.

    python benchmarks/gpu/encoders.py                        # one H100/H200, about a minute
    python benchmarks/gpu/encoders.py --save /tmp/encoders   # and keep the four folders (colocated.py reads them)
    python benchmarks/gpu/encoders.py --smoke                # CPU, tiny sizes: checks the script runs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without installing

from diffusers import AutoencoderKL  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig, CLIPTextModelWithProjection, Gemma2Config, Gemma2Model, ModernBertConfig, ModernBertModel,
)

from benchmarks.text_encode import loader_captions, padded_to_text_len  # noqa: E402
from trainer.encoders import TINY_VAE_CONFIG, Encoders, EncodersConfig  # noqa: E402
from trainer.tokenizer import build_tokenizer  # noqa: E402


def real_sized_models(tokenizer, smoke: bool) -> dict:
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    if smoke:
        small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
        return {
            "gemma": Gemma2Model(Gemma2Config(**ids, **small, num_key_value_heads=1, head_dim=32,
                                              vocab_size=len(tokenizer))),
            "bert": ModernBertModel(ModernBertConfig(**ids, **small, cls_token_id=2, sep_token_id=3,
                                                     vocab_size=len(tokenizer))),
            "clip": CLIPTextModelWithProjection(CLIPTextConfig(**ids, **small, projection_dim=64,
                                                               vocab_size=len(tokenizer))),
            "vae": AutoencoderKL(**TINY_VAE_CONFIG),
        }
    return {
        "gemma": Gemma2Model(Gemma2Config(**ids)),  # the defaults are Gemma-2-2B's
        "bert": ModernBertModel(ModernBertConfig(**ids, cls_token_id=2, sep_token_id=3, hidden_size=1024,
                                                 intermediate_size=2624, num_hidden_layers=28,
                                                 num_attention_heads=16)),
        "clip": CLIPTextModelWithProjection(CLIPTextConfig(**ids, vocab_size=49408, hidden_size=768,
                                                           intermediate_size=3072, num_hidden_layers=12,
                                                           num_attention_heads=12, projection_dim=768)),
        "vae": AutoencoderKL(**{**TINY_VAE_CONFIG, "block_out_channels": (128, 256, 512, 512),
                                "layers_per_block": 2, "norm_num_groups": 32}),
    }


def seconds_per_call(fn, device: torch.device, reps: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def vae_encode_seconds(encoders: Encoders, x: torch.Tensor, layout: torch.memory_format, device: torch.device,
                       reps: int) -> float:
    """The VAE encoder in one memory layout (Encoders uses channels_last on CPUs only, measured there by
    benchmarks/vae_layout.py: this is the GPU's answer)."""
    vae, restore = encoders.vae, encoders.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for part in (vae.encoder, vae.quant_conv):
        if part is not None:
            part.to(memory_format=layout)
    x = x.to(encoders.dtype).contiguous(memory_format=layout)
    seconds = seconds_per_call(lambda: vae.encode(x), device, reps)
    for part in (vae.encoder, vae.quant_conv):
        if part is not None:
            part.to(memory_format=torch.channels_last if restore else torch.contiguous_format)
    return seconds


def row(what: str, measure) -> None:
    """One table row, printed as soon as it is measured (a run cut short keeps what it had); a failing
    measurement prints its error in the row and the rest still run."""
    try:
        figure = measure()
    except Exception as err:  # noqa: BLE001 - one failed figure must not lose the others
        figure = f"failed: {type(err).__name__}: {str(err)[:200]}"
    print(f"| {what} | {figure} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, one rep")
    parser.add_argument("--captions", type=int, default=120, help="a loader batch at 512 px: 3 x 40")
    parser.add_argument("--save", help="keep the encoder folders (vae, gemma, bert, clip) here instead of a temp dir")
    args = parser.parse_args()
    if args.smoke:
        args.captions = 4
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = "float32" if device.type == "cpu" else "bfloat16"
    reps = 1 if args.smoke else 5
    tokenizer = build_tokenizer()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n### Encoders on {name}, torch {torch.__version__}, {dtype}\n")
    print("| what | figure |\n|---|---|", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.save or tmp)
        # Built on the device in the run's dtype: 3.5B parameters made in fp32 on the host take a minute.
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, dtype))
        with device:
            models = real_sized_models(tokenizer, args.smoke)
        torch.set_default_dtype(default_dtype)
        for part, model in models.items():
            model.save_pretrained(folder / part)
            if part != "vae":
                tokenizer.save_pretrained(folder / part)
            parameters = sum(p.numel() for p in model.parameters())
            row(f"{part} parameters", lambda: f"{parameters:,}")
        del models, model  # the benchmark loads them back from the folders, as a real run does
        config = EncodersConfig(preset="tiny" if args.smoke else "reference", vae=str(folder / "vae"),
                                gemma=str(folder / "gemma"), bert=str(folder / "bert"), clip=str(folder / "clip"))
        started = time.perf_counter()
        encoders = Encoders(config, device=device, dtype=dtype)
        row("load the four encoders from their folders", lambda: f"{time.perf_counter() - started:.1f} s")

        # Half detailed (cut at 77 tokens), half short, as the sampler mixes them (benchmarks/text_encode.py).
        captions = loader_captions(args.captions)
        for what, encode in (("encode_text (length-grouped chunks)", encoders.encode_text),
                             ("all padded to 77 in one batch (before)", lambda c: padded_to_text_len(encoders, c))):
            def captions_per_s(encode=encode):
                s = seconds_per_call(lambda: encode(captions), device, reps)
                return f"{s:.3f} s = {len(captions) / s:.0f} captions/s"
            row(f"{what}, {len(captions)} loader captions", captions_per_s)
        for side, batch in ((256, 64), (512, 16)) if not args.smoke else ((64, 2),):
            x = torch.rand(batch, 3, side, side, device=device) * 2 - 1
            row(f"encode_images {side} px, batch {batch}",
                lambda: f"{batch / seconds_per_call(lambda: encoders.encode_images(x), device, reps):.0f} images/s")

            def layouts():
                nchw, nhwc = (vae_encode_seconds(encoders, x, layout, device, reps)
                              for layout in (torch.contiguous_format, torch.channels_last))
                return f"{batch / nchw:.0f} vs {batch / nhwc:.0f} images/s ({nchw / nhwc:.2f}x)"
            row(f"VAE encoder {side} px, batch {batch}: NCHW vs channels_last", layouts)
        if device.type == "cuda":
            row("GPU memory, all loaded", lambda: f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB")
            encoders.free_text_encoders()
            row("GPU memory after free_text_encoders()", lambda: f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
