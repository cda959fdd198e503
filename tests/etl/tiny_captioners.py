"""Tiny random-weight LLaVA-NeXT and Llama models, with a tokenizer built here, saved as local HF folders.

They go through the same ``from_pretrained`` / ``generate`` path as the real 8B checkpoints, so the
transformers backend is tested offline; their captions are junk, which the tests account for.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# A small caption-like vocabulary, so decoded junk still reads as words.
WORDS = """a an the of in on with and to is are at by for from near under over behind beside its their this that
photo picture image painting drawing illustration artwork scene view close-up portrait landscape poster logo
dog cat bird horse car bus bicycle boat train tree flower grass sky cloud sun moon mountain river lake sea beach
house building street road bridge city town room table chair bed window door wall floor book cup bottle plate
man woman child girl boy people person group crowd hand face hair eyes shirt dress hat shoes bag
red blue green yellow orange purple pink brown black white grey gray golden silver dark bright light colorful
small large big tall short long round square old new wooden metal glass stone sitting standing walking running
lying holding wearing looking smiling playing flying floating parked open closed background foreground left right
center top bottom text reads says words letters sign label title caption alt hint detailed succinct describe
please make if you see or objects be sure them detail along any other aspects there important include as here
attribute which may not have do take following attempt distill into single sentence remove redundant lines
descriptions it maximum 40 length only write no you helpful assistant . , : ; ! ? ' " ` ( ) - 0 1 2 3 4 5 6 7 8 9
""".split()

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

VISION_IMAGE_SIZE = 32
VISION_PATCH_SIZE = 8


def build_tokenizer(vocab_size: int = 0) -> PreTrainedTokenizerFast:
    """The tiny vocabulary, padded with filler words "w<n>" up to ``vocab_size`` (for real-size models)."""
    tokens = list(dict.fromkeys(SPECIAL_TOKENS + WORDS))
    tokens += [f"w{i}" for i in range(max(0, vocab_size - len(tokens)))]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    # Punctuation and digit runs split off, so "image," and "40" map onto vocabulary entries.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<image>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _text_config(tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # Larger than the default 0.02 so greedy decoding wanders over the vocabulary instead of repeating one word.
        initializer_range=0.5,
    )


def save_tiny_llm(path: Path, seed: int = 0) -> Path:
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_text_config(tokenizer)).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_vlm(path: Path, seed: int = 0) -> Path:
    tokenizer = build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=VISION_IMAGE_SIZE,
        patch_size=VISION_PATCH_SIZE,
        projection_dim=32,
    )
    side = VISION_IMAGE_SIZE
    pinpoints = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=VISION_PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,  # the CLIP tower's CLS token, as in the llava-hf processors
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_tiny_captioners(root: Path) -> tuple[Path, Path]:
    """(vlm folder, llm folder) under ``root``, each loadable with ``from_pretrained``."""
    return save_tiny_vlm(root / "tiny-llava-next"), save_tiny_llm(root / "tiny-llama")
