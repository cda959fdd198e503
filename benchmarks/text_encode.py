"""A loader batch's text encoding: length-sorted chunks padded to their longest vs all padded to text_len.

``Encoders.encode_text`` sorts a batch's captions by token count and runs them in chunks of about
``encoders.text_batch_tokens`` tokens, each padded to its own longest caption. The baseline is the plain
way, rebuilt here (``padded_to_text_len``): every caption padded to text_len (77) in one batch. A loader
batch mixes the two captions the sampler picks 50/50: detailed recaptions, mostly longer than 77 tokens
and cut there, and short ones of a sentence, which the plain way pads to 77 as well.

The encoders have the reference's three architectures (Gemma-2, ModernBERT, CLIP text tower with
projection) at a CPU size, random weights, saved and loaded back through ``Encoders`` as a local folder
is; the time per token scales the same way at the real sizes (benchmarks/gpu/encoders.py runs them
there). Captions are drawn from the project tokenizer's word list, one token a word: detailed ones of
N(110, 30) words, short ones of 8 to 24 words.

    .venv/bin/python benchmarks/text_encode.py                  # batches of 120 and 420, about 2 minutes
    .venv/bin/python benchmarks/text_encode.py --batch-sizes 45 --reps 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, Gemma2Config, Gemma2Model, ModernBertConfig, ModernBertModel

from trainer.encoders import Encoders, EncodersConfig, _length_chunks
from trainer.tokenizer import WORDS, build_tokenizer


def loader_captions(n: int, seed: int = 0, detailed_prob: float = 0.5) -> list[str]:
    """``n`` captions as a loader batch holds them: detailed (mostly past 77 tokens) or short, 50/50."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    counts = [int(np.clip(rng.normal(110, 30), 20, 250)) if rng.random() < detailed_prob else int(rng.integers(8, 25))
              for _ in range(n)]
    return [" ".join(rng.choice(words, count)) for count in counts]


@torch.no_grad()
def padded_to_text_len(encoders: Encoders, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain way: every caption padded to text_len, all in one batch (the same outputs up to rounding)."""
    cfg, device = encoders.config, encoders.device

    def tokens(name: str, length: int) -> dict:
        batch = encoders.tokenizers[name](captions, padding="max_length", max_length=length, truncation=True,
                                          return_tensors="pt")
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}

    blocks = []
    for name in ("gemma", "bert"):
        batch = tokens(name, cfg.text_len)
        hidden = encoders.text_models[name](**batch).last_hidden_state
        hidden = hidden * batch["attention_mask"][..., None].to(hidden.dtype)
        blocks.append(F.pad(hidden, (0, cfg.text_dim - hidden.shape[-1])))
    clip = encoders.text_models["clip"]
    return torch.cat(blocks, dim=1), clip(**tokens("clip", clip.config.max_position_embeddings)).text_embeds


def cpu_sized_encoders(folder: Path, text_batch_tokens: int) -> Encoders:
    tokenizer = build_tokenizer()
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    models = {
        "gemma": Gemma2Model(Gemma2Config(**ids, hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                                          num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                                          query_pre_attn_scalar=64)),
        "bert": ModernBertModel(ModernBertConfig(**ids, cls_token_id=tokenizer.bos_token_id,
                                                 sep_token_id=tokenizer.eos_token_id, hidden_size=384,
                                                 intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6)),
        "clip": CLIPTextModelWithProjection(CLIPTextConfig(**ids, hidden_size=384, intermediate_size=1536,
                                                           num_hidden_layers=6, num_attention_heads=6,
                                                           max_position_embeddings=77, projection_dim=384)),
    }
    for name, model in models.items():
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    config = EncodersConfig(preset="tiny", gemma=str(folder / "gemma"), bert=str(folder / "bert"),
                            clip=str(folder / "clip"), text_dim=512, text_batch_tokens=text_batch_tokens)
    return Encoders(config)


def best_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[120, 420],
                        help="captions per loader batch (the reference's 512 / 256 px: 3 x 40, 3 x 140)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--text-batch-tokens", type=int, default=EncodersConfig.text_batch_tokens)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        encoders = cpu_sized_encoders(Path(tmp), args.text_batch_tokens)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, text_batch_tokens {args.text_batch_tokens}")
        print("| captions | tokens a caption (gemma, mean) | token rows run: padded to 77 / chunked "
              "| padded to 77, one batch | length-grouped chunks | ratio | max abs difference |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for batch in args.batch_sizes:
            captions = loader_captions(batch, seed=batch)
            lengths = [len(ids) for ids in encoders.tokenizers["gemma"](captions, truncation=True, max_length=77)["input_ids"]]
            run = sum(len(chunk) * max(lengths[i] for i in chunk)
                      for chunk in _length_chunks(lengths, encoders.config.text_batch_tokens))
            plain = best_seconds(lambda: padded_to_text_len(encoders, captions), args.reps)
            chunked = best_seconds(lambda: encoders.encode_text(captions), args.reps)
            (text, pooled), (ref_text, ref_pooled) = encoders.encode_text(captions), padded_to_text_len(encoders, captions)
            diff = max((text - ref_text).abs().max().item(), (pooled - ref_pooled).abs().max().item())
            print(f"| {batch} | {np.mean(lengths):.1f} | {77 * batch / run:.2f}x | {plain:.2f} s | {chunked:.2f} s | {plain / chunked:.2f}x | {diff:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
