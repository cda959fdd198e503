"""The transformers backend on tiny random-weight LLaVA-NeXT and Llama models, loaded from local folders."""

import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from etl.config import RecaptionConfig
from etl.recaption import TransformersCaptioner, get_captioner, recaption_shard
from etl.schema import CANONICAL, conform
from etl.storage import read_parquet
from tests.etl.tiny_captioners import save_tiny_captioners

REPO = Path(__file__).resolve().parents[2]
FAILURE_KINDS = {"loop", "too_few_words", "empty", "chatter", "undecodable"}
ALT_TEXTS = ["a red dog near the sea", "", "Blue bus on a bridge in the city at night", "sun"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> RecaptionConfig:
    vlm, llm = save_tiny_captioners(tmp_path_factory.mktemp("models"))
    return RecaptionConfig(
        backend="transformers", vlm=str(vlm), llm=str(llm), batch_size=3, max_new_tokens=24,
        short_max_new_tokens=16, device="cpu", chunk_rows=4,
    )


@pytest.fixture(scope="module")
def captioner(cfg) -> TransformersCaptioner:
    return get_captioner(cfg)


def _images():
    return [
        Image.new("RGB", (60, 40), "red"),
        Image.new("RGB", (30, 70), "blue"),
        Image.linear_gradient("L").convert("RGB").resize((90, 50)),
        Image.new("RGB", (48, 48), "yellow"),
    ]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_one_model_set_per_process(cfg, captioner):
    assert isinstance(captioner, TransformersCaptioner)
    assert get_captioner(cfg) is captioner


def test_prompts_reach_the_models_chat_templated_and_left_padded(captioner):
    vlm_prompts = captioner.vlm_prompts(["a red dog near the sea"])
    assert vlm_prompts[0].startswith("<|user|> <image> Please make a detailed but succinct caption")
    assert "```\na red dog near the sea\n```" in vlm_prompts[0]
    assert vlm_prompts[0].endswith("<|assistant|> ")
    llm_prompts = captioner.llm_prompts(["A dog on a beach."])
    assert llm_prompts[0].startswith("<|system|> You are a helpful assistant <|end|> <|user|> Please take")
    assert "A dog on a beach." in llm_prompts[0] and llm_prompts[0].endswith("<|assistant|> ")

    seen = []

    def record(module, args, kwargs):
        if kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] > 1:  # the prefill step
            seen.append((kwargs["input_ids"], kwargs["attention_mask"]))

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in (captioner.vlm, captioner.llm)]
    try:
        captioner.detailed(_images()[:2], ALT_TEXTS[:2])
        captioner.shorten(["A dog on a beach.", "A long caption about a blue bus on a bridge in the city."])
    finally:
        for hook in hooks:
            hook.remove()

    (vlm_ids, vlm_mask), (llm_ids, llm_mask) = seen
    decoded = captioner.processor.tokenizer.decode(vlm_ids[0][vlm_mask[0].bool()])
    assert "red dog near the sea" in decoded and "<image>" in decoded
    for mask in (vlm_mask, llm_mask):
        assert mask[:, -1].all(), "the last prompt token of every row is real: padding is on the left"
        assert not mask.all(), "prompts of different lengths were padded"
        shorter = mask.sum(dim=1).argmin()
        assert not mask[shorter, 0]
    decoded = captioner.tokenizer.decode(llm_ids[1][llm_mask[1].bool()])
    assert "blue bus on a bridge" in decoded and "maximum of 40 words" in decoded


def test_batched_and_one_by_one_give_the_same_captions(captioner):
    images = _images()
    batched = captioner.detailed(images, ALT_TEXTS)
    one_by_one = [captioner.detailed([image], [alt])[0] for image, alt in zip(images, ALT_TEXTS)]
    assert batched == one_by_one
    assert all(batched), "random weights still emit words"

    short_batched = captioner.shorten(batched)
    assert short_batched == [captioner.shorten([caption])[0] for caption in batched]


def test_shard_end_to_end_accounts_for_every_row(cfg, tmp_path):
    images = _images() * 3
    keys = [f"demo-{i:09d}" for i in range(len(images))]
    blobs = [_png(image) for image in images]
    blobs[5] = b"\x89PNG truncated"  # the filter should have caught it; it still must be accounted for
    table = conform(
        pa.table({"key": keys, "url": [f"http://127.0.0.1/{k}" for k in keys],
                  "caption": (ALT_TEXTS * 3)[: len(keys)], "image": blobs}),
        CANONICAL,
    )
    progress = []
    result = recaption_shard(table, cfg, tmp_path / "work", progress=lambda done, total: progress.append((done, total)))

    kept, rejects = result.kept, result.rejects
    assert sorted(kept["key"].to_pylist() + rejects["key"].to_pylist()) == keys
    assert kept.schema == CANONICAL
    assert all(c and c.strip() for c in kept["recaption"].to_pylist() + kept["recaption_short"].to_pylist())
    assert set(rejects["reason"].to_pylist()) <= {"caption_failed"}
    assert {detail.split(":")[0] for detail in rejects["detail"].to_pylist()} <= FAILURE_KINDS
    assert "demo-000000005" in rejects["key"].to_pylist()
    assert result.stats.captioned == kept.num_rows and result.stats.rows == len(keys)
    assert sum(result.stats.failures.values()) == rejects.num_rows
    assert result.stats.failures["undecodable"] == 1
    assert progress == [(4, 12), (8, 12), (12, 12)]
    (chunk,) = (tmp_path / "work").glob("chunk-*.parquet")  # three chunks, compacted when the shard is done
    assert read_parquet(chunk).num_rows == len(keys)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_names_the_gpu_extra_when_missing():
    with pytest.raises(ImportError, match=r"`gpu` extra"):
        get_captioner(RecaptionConfig(backend="vllm"))


def test_gpu_benchmark_smoke_mode_runs_on_cpu():
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu/recaption.py"), "--smoke"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "FAILED" not in done.stdout, done.stdout  # a failing backend is reported, not raised
    assert re.search(r"^transformers\s+[\d.]+\s+[\d.]+\s+[\d.]+$", done.stdout, re.M), done.stdout
