"""Recaptioning throughput on one GPU with random weights at the real sizes (no downloads).

The VLM is LLaVA-NeXT-llama3-8B's shape (CLIP ViT-L/14-336 tower, anyres grid, Llama-3-8B text model), the
LLM Llama-3-8B-Instruct's shape; the tokenizer is the test tokenizer padded to Llama 3's vocabulary. Both
stages run through TransformersCaptioner (batched, left-padded, greedy, bf16) and report images/s; the same
through vLLM when it is installed (the random models are saved to a temp folder for it). Random weights
rarely emit eos, so every row generates the full max_new_tokens: a worst case for the decode phase.
Failures of a stage (out of memory, vLLM missing) are printed and the script still exits 0.

    python benchmarks/gpu/recaption.py [--batch-size 16] [--rows 64] [--max-new-tokens 128]
    python benchmarks/gpu/recaption.py --smoke     # tiny shapes on CPU, to test the script itself
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from etl.config import RecaptionConfig  # noqa: E402
from etl.recaption import TransformersCaptioner, VllmCaptioner  # noqa: E402
from tests.etl.tiny_captioners import CHAT_TEMPLATE, build_tokenizer  # noqa: E402

# (vision tower, text model, image side, patch, LLM) shapes.
REAL = dict(
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14, projection_dim=768),
    text=dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
)
SMOKE = dict(
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8, projection_dim=32),
    text=dict(vocab_size=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
)


def build(shapes: dict, device: torch.device, dtype: torch.dtype):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = build_tokenizer(shapes["text"]["vocab_size"])
    text = LlamaConfig(**{**shapes["text"], "vocab_size": len(tokenizer)}, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    side, patch = shapes["vision"]["image_size"], shapes["vision"]["patch_size"]
    pinpoints = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side], [3 * side, side], [side, 3 * side]]
    vlm_config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**shapes["vision"]), text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:  # initialise on the GPU: random init of 8B parameters on the CPU takes minutes
            vlm = LlavaNextForConditionalGeneration(vlm_config).eval()
            llm = LlamaForCausalLM(text).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_grid_pinpoints=pinpoints
        ),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    return vlm, processor, llm, tokenizer


def images(rows: int, side: int) -> list[Image.Image]:
    # Already downscaled (long side <= max_image_side), in a mix of aspect ratios.
    shapes = [(side, side * 3 // 4), (side * 2 // 3, side), (side, side // 2), (side, side)]
    return [Image.new("RGB", shapes[i % 4], (37 * i % 256, 120, 200)) for i in range(rows)]


def measure(name: str, captioner, pics, alts, batch: int, sync) -> None:
    def stage(fn, inputs):
        fn(*[x[:batch] for x in inputs])  # warm-up: kernels, allocator
        sync()
        started = time.perf_counter()
        outputs = []
        for i in range(0, len(inputs[0]), batch):
            outputs += fn(*[x[i : i + batch] for x in inputs])
        sync()
        return outputs, len(inputs[0]) / (time.perf_counter() - started)

    detailed, vlm_rate = stage(captioner.detailed, (pics, alts))
    _, llm_rate = stage(captioner.shorten, ([d or "empty" for d in detailed],))
    print(f"{name:<14}{vlm_rate:>14.2f}{llm_rate:>14.2f}{1 / (1 / vlm_rate + 1 / llm_rate):>14.2f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--short-max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.batch_size, args.max_new_tokens, args.short_max_new_tokens = 4, 2, 8, 4
    shapes = SMOKE if args.smoke else REAL
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = RecaptionConfig(backend="transformers", batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          short_max_new_tokens=args.short_max_new_tokens, device=device.type)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device={name} rows={args.rows} batch={args.batch_size} "
          f"new tokens: detailed={args.max_new_tokens} short={args.short_max_new_tokens}")
    print(f"{'backend':<14}{'VLM images/s':>14}{'LLM images/s':>14}{'both images/s':>14}")
    pics = images(args.rows, 512 if not args.smoke else 64)
    alts = [f"photo number {i} of a red dog near the sea" for i in range(args.rows)]

    failures, vlm = [], None
    try:
        started = time.perf_counter()
        vlm, processor, llm, tokenizer = build(shapes, device, dtype)
        print(f"(random models built in {time.perf_counter() - started:.1f} s)", flush=True)
        measure("transformers", TransformersCaptioner(vlm, processor, llm, tokenizer, cfg), pics, alts,
                args.batch_size, sync)
    except Exception:  # noqa: BLE001 -- report and go on to the next backend
        failures.append(("transformers", traceback.format_exc()))

    try:
        importlib.import_module("vllm")
        vllm_missing = None
    except Exception as err:  # noqa: BLE001 -- not installed, or an install that fails on import: skip it
        vllm_missing = f"{type(err).__name__}: {str(err)[:80]}"
    if vllm_missing:
        print(f"vllm          not importable ({vllm_missing}); skipped", flush=True)
    elif vlm is None:  # vLLM loads the models the transformers part built
        print("vllm          skipped: the random models did not build (see FAILED transformers)", flush=True)
    else:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                vlm.save_pretrained(Path(tmp) / "vlm")
                processor.save_pretrained(Path(tmp) / "vlm")
                llm.save_pretrained(Path(tmp) / "llm")
                tokenizer.save_pretrained(Path(tmp) / "llm")
                del vlm, llm
                torch.cuda.empty_cache()
                vllm_cfg = RecaptionConfig(backend="vllm", vlm=str(Path(tmp) / "vlm"), llm=str(Path(tmp) / "llm"),
                                           max_new_tokens=args.max_new_tokens,
                                           short_max_new_tokens=args.short_max_new_tokens)
                # vLLM schedules its own batches: hand it the whole set at once.
                measure("vllm", VllmCaptioner(vllm_cfg), pics, alts, args.rows, sync)
        except Exception:  # noqa: BLE001
            failures.append(("vllm", traceback.format_exc()))

    for backend, trace in failures:
        print(f"FAILED {backend}:\n{trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
