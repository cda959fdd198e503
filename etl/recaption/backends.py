"""Captioners: images + alt texts -> detailed captions, detailed captions -> short captions.

``get_captioner`` builds the backend the config names and keeps it for the life of the process, so a
worker loads its models once and reuses them across shards. Captioners return raw model text;
cleaning and failure detection happen in ``etl.recaption.shard``.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Protocol

from PIL import Image

if TYPE_CHECKING:
    import torch

from etl.config import RecaptionConfig, to_mapping
from etl.recaption.prompts import render_llm_prompts, render_vlm_prompts


class Captioner(Protocol):
    def detailed(self, images: list[Image.Image], alt_texts: list[str]) -> list[str]: ...

    def shorten(self, captions: list[str]) -> list[str]: ...


class AltTextCaptioner:
    """The smoke backend: no model; the alt text (cleaned by ``caption_rows``) is both the detailed and the
    short caption. Cleaning it again would decode an entity twice: "&amp;lt;" is the text "&lt;"."""

    def detailed(self, images: list[Image.Image], alt_texts: list[str]) -> list[str]:
        return list(alt_texts)

    def shorten(self, captions: list[str]) -> list[str]:
        return list(captions)


# torch is imported where a model backend needs it: every Dagster step imports this module, and the
# alt-text backend should not pay seconds of torch import per step.


def resolve_device(cfg: RecaptionConfig) -> "torch.device":
    import torch

    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def resolve_dtype(cfg: RecaptionConfig, device: "torch.device") -> "torch.dtype":
    import torch

    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def _hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")


def _stop_token_ids(tokenizer) -> list[int]:
    # Llama-3-Instruct ends its turn with <|eot_id|>, not with its eos token.
    ids = [tokenizer.eos_token_id]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>") if "<|eot_id|>" in tokenizer.get_vocab() else None
    return [i for i in dict.fromkeys(ids + [eot]) if i is not None]


def _left_padded(tokenizer) -> None:
    # Decoder-only batches pad on the left so every row's generation starts right after its prompt.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


class TransformersCaptioner:
    """Any HF VLM (AutoModelForImageTextToText) and chat LLM; batched, left-padded, greedy."""

    def __init__(self, vlm, processor, llm, tokenizer, cfg: RecaptionConfig):
        self.vlm, self.processor, self.cfg = vlm.eval(), processor, cfg
        self.llm, self.tokenizer = llm.eval(), tokenizer
        _left_padded(processor.tokenizer)
        _left_padded(tokenizer)

    @classmethod
    def from_config(cls, cfg: RecaptionConfig) -> "TransformersCaptioner":
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        device = resolve_device(cfg)
        dtype = resolve_dtype(cfg, device)
        token = _hf_token()
        processor = AutoProcessor.from_pretrained(cfg.vlm, token=token)
        vlm = AutoModelForImageTextToText.from_pretrained(cfg.vlm, dtype=dtype, token=token).to(device)
        tokenizer = AutoTokenizer.from_pretrained(cfg.llm, token=token)
        llm = AutoModelForCausalLM.from_pretrained(cfg.llm, dtype=dtype, token=token).to(device)
        return cls(vlm, processor, llm, tokenizer, cfg)

    def vlm_prompts(self, alt_texts: list[str]) -> list[str]:
        return render_vlm_prompts(self.processor, alt_texts, self.cfg)

    def llm_prompts(self, captions: list[str]) -> list[str]:
        return render_llm_prompts(self.tokenizer, captions, self.cfg)

    def detailed(self, images: list[Image.Image], alt_texts: list[str]) -> list[str]:
        if not images:
            return []
        inputs = self.processor(
            images=images, text=self.vlm_prompts(alt_texts), padding=True, return_tensors="pt"
        ).to(self.vlm.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.vlm.dtype)
        return self._generate(self.vlm, self.processor.tokenizer, inputs, self.cfg.max_new_tokens)

    def shorten(self, captions: list[str]) -> list[str]:
        if not captions:
            return []
        # One bos token: the prompts come without the template's (see without_template_bos).
        inputs = self.tokenizer(self.llm_prompts(captions), padding=True, return_tensors="pt").to(self.llm.device)
        return self._generate(self.llm, self.tokenizer, inputs, self.cfg.short_max_new_tokens)

    @staticmethod
    def _generate(model, tokenizer, inputs, max_new_tokens: int) -> list[str]:
        import torch

        with torch.inference_mode():
            output = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=_stop_token_ids(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


class VllmCaptioner:
    """The same prompts through vLLM's offline engines (one for the VLM, one for the LLM, sharing a GPU)."""

    def __init__(self, cfg: RecaptionConfig):
        try:
            import vllm
        except ImportError as err:
            raise ImportError(
                "recaption backend 'vllm' needs vLLM, which comes with the optional `gpu` extra: "
                "pip install -e '.[gpu]' (on a CUDA machine), or use backend 'transformers'"
            ) from err
        from transformers import AutoProcessor, AutoTokenizer

        token = _hf_token()
        self.cfg = cfg
        # vLLM renders no chat templates for offline generate(); the HF processor/tokenizer do, as in
        # TransformersCaptioner, so both backends send the model the same prompts.
        self.processor = AutoProcessor.from_pretrained(cfg.vlm, token=token)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.llm, token=token)
        dtype = "auto" if cfg.dtype == "auto" else cfg.dtype
        engine = dict(dtype=dtype, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
        self.vlm = vllm.LLM(model=cfg.vlm, limit_mm_per_prompt={"image": 1}, **engine)
        self.llm = vllm.LLM(model=cfg.llm, **engine)
        self.vlm_params = vllm.SamplingParams(temperature=0.0, max_tokens=cfg.max_new_tokens)
        self.llm_params = vllm.SamplingParams(
            temperature=0.0, max_tokens=cfg.short_max_new_tokens, stop_token_ids=_stop_token_ids(self.tokenizer)
        )

    def detailed(self, images: list[Image.Image], alt_texts: list[str]) -> list[str]:
        prompts = render_vlm_prompts(self.processor, alt_texts, self.cfg)
        requests = [
            {"prompt": prompt, "multi_modal_data": {"image": image}}
            for prompt, image in zip(prompts, images, strict=True)
        ]
        outputs = self.vlm.generate(requests, self.vlm_params, use_tqdm=False)
        return [out.outputs[0].text for out in outputs]

    def shorten(self, captions: list[str]) -> list[str]:
        # Tokenized here as the transformers backend does, so both send the model the same token ids.
        requests = [
            {"prompt_token_ids": self.tokenizer(prompt)["input_ids"]}
            for prompt in render_llm_prompts(self.tokenizer, captions, self.cfg)
        ]
        outputs = self.llm.generate(requests, self.llm_params, use_tqdm=False)
        return [out.outputs[0].text for out in outputs]


_loaded: dict[str, Captioner] = {}


def get_captioner(cfg: RecaptionConfig) -> Captioner:
    """The captioner for ``cfg``; built once per process and reused while the config stays the same."""
    key = json.dumps(to_mapping(cfg), sort_keys=True)
    if key not in _loaded:
        # One model set per process: a new config frees the previous one before loading.
        _loaded.clear()
        if cfg.backend == "alt-text":
            _loaded[key] = AltTextCaptioner()
        elif cfg.backend == "transformers":
            _loaded[key] = TransformersCaptioner.from_config(cfg)
        else:
            _loaded[key] = VllmCaptioner(cfg)
    return _loaded[key]
