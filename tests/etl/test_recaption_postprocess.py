import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from etl.buckets import bucket_shard
from etl.config import BucketConfig, ConfigError, PipelineConfig, RecaptionConfig, from_mapping
from etl.recaption import recaption_shard
from etl.recaption.postprocess import (
    BOILERPLATE_OPENINGS,
    clean_alt_text,
    clean_caption,
    find_loop,
    judge_detailed,
    judge_short,
)
from etl.recaption.prompts import LLM_PROMPT, VLM_PROMPT, llm_messages, vlm_messages
from etl.recaption.shard import _decode
from etl.schema import CANONICAL, conform
from tests.etl.bad_images import BAD_IMAGES, canonical_table

# What LLaVA-NeXT and Llama-3-Instruct write, good and bad, with the verdict expected after cleaning.
DETAILED = [
    ("The image shows a golden retriever lying on a wooden porch next to a red door.",
     "A golden retriever lying on a wooden porch next to a red door.", None),
    ("In the artwork, a woman in a blue dress holds a lantern beside a river at dusk.",
     "Artwork of a woman in a blue dress holds a lantern beside a river at dusk.", None),
    ("This image depicts NASA's Saturn V rocket on the launch pad, with the text \"APOLLO 11\" on a banner.",
     "NASA's Saturn V rocket on the launch pad, with the text \"APOLLO 11\" on a banner.", None),
    ("  the image features   a bowl of ramen\nwith an egg and spring onions. ",
     "A bowl of ramen with an egg and spring onions.", None),
    ("In this image, the image shows a yellow taxi on a wet street at night.",
     "A yellow taxi on a wet street at night.", None),
    ("A poster with the text \"SALE 50% OFF\" in bold red letters on a white background.",
     "A poster with the text \"SALE 50% OFF\" in bold red letters on a white background.", None),
    ("A cat on a sofa, no text, no other objects, no text, no other objects, no text, no other objects, "
     "no additional objects.", None, "loop"),
    ("The image shows a tree tree tree tree tree tree tree tree tree.", None, "loop"),
    ("A street with cars and people walking, walking on the street, walking on the street, walking on the "
     "street, walking on the street, walking on the street.", None, "loop"),
    ("A shop window with a red poster reading \"SALE SALE SALE SALE\" in white capitals.",
     "A shop window with a red poster reading \"SALE SALE SALE SALE\" in white capitals.", None),
    ("A cat on a sofa. No text, no other objects, No text, no other objects, No text, no other objects.",
     None, "loop"),
    ("Dog.", None, "too_few_words"),
    ("The image shows a a", None, "too_few_words"),
    ("   ", None, "empty"),
    ("", None, "empty"),
]

SHORT = [
    ("A golden retriever rests on a wooden porch beside a red door.",
     "A golden retriever rests on a wooden porch beside a red door.", None),
    ("Here is the distilled caption:\n\n\"A woman in a blue dress holds a lantern by a river at dusk.\"",
     "A woman in a blue dress holds a lantern by a river at dusk.", None),
    ("Sure! Here's a single sentence version: A bowl of ramen with egg and spring onions.\n\n"
     "Let me know if you need anything else!", "A bowl of ramen with egg and spring onions.", None),
    ("`A yellow taxi on a wet street at night.`", "A yellow taxi on a wet street at night.", None),
    ("I'm sorry, but I can't help with that request.", None, "chatter"),
    ("I cannot create a caption without more information.", None, "chatter"),
    ("Could you please provide the image caption you would like me to distill?", None, "chatter"),
    ("As an AI language model, I do not see images.", None, "chatter"),
    ("A red ball on green grass.\nNote: I kept the caption under 40 words as requested.",
     "A red ball on green grass.", None),
    ("'A dog's red ball on the grass.'", "A dog's red ball on the grass.", None),
    ('"OPEN" sign hangs on a door next to a poster reading "SALE"',
     '"OPEN" sign hangs on a door next to a poster reading "SALE"', None),
    ("'90s sports car parked outside a diner whose sign says 'DINER'",
     "'90s sports car parked outside a diner whose sign says 'DINER'", None),
    ("A golden retriever rests on a porch. " * 9, None, "too_long"),
    ("Taxi.", None, "too_few_words"),
    ("", None, "empty"),
]


def _judge_table(rows, judge) -> pa.Table:
    table = pa.table({"raw": [raw for raw, _, _ in rows]})
    verdicts = judge(table["raw"].to_pylist())
    return table.append_column("caption", pa.array([v.caption for v in verdicts], pa.string())).append_column(
        "kind", pa.array([v.kind for v in verdicts], pa.string())
    )


@pytest.mark.parametrize(("rows", "judge"), [(DETAILED, judge_detailed), (SHORT, judge_short)])
def test_judging_a_table_of_real_looking_captions(rows, judge):
    judged = _judge_table(rows, judge)
    assert judged["caption"].to_pylist() == [expected for _, expected, _ in rows]
    assert judged["kind"].to_pylist() == [kind for _, _, kind in rows]


def test_the_reference_openings_are_stripped_in_both_capitalisations():
    assert len(BOILERPLATE_OPENINGS) == 36
    for opening, replacement in BOILERPLATE_OPENINGS:
        for variant in (opening, opening[0].lower() + opening[1:]):
            cleaned = clean_caption(f"{variant}two red apples on a plate.")
            expected = f"{replacement}two red apples on a plate."
            assert cleaned == expected[0].upper() + expected[1:], variant


def test_openings_inside_a_caption_are_kept():
    text = "A gallery wall; the image shows three framed prints."
    assert clean_caption(text) == text


def test_loop_detection_leaves_ordinary_repetition_alone():
    assert find_loop("A red car, a red bus and a red bike parked on a red brick street.") is None
    assert find_loop("no text " * 7) is not None


def test_the_smoke_backend_keeps_an_alt_text_cleaned_once(tmp_path):
    table = canonical_table({"a": b"not an image"}, caption=["Tom &amp;amp; Jerry &amp;lt;3"])
    result = recaption_shard(table, RecaptionConfig(), tmp_path / "work")
    assert result.kept["recaption"].to_pylist() == ["Tom &amp; Jerry &lt;3"]


def test_alt_text_cleaning():
    assert clean_alt_text("Tom &amp; Jerry <b>poster</b>\n\t&quot;1940&quot;  ") == 'Tom & Jerry poster "1940"'
    assert clean_alt_text("<img src='x'>") == ""
    assert clean_alt_text(None) == ""


def test_prompts_carry_the_hint_and_can_be_overridden():
    cfg = RecaptionConfig()
    user = vlm_messages("a {braced} dog", cfg)[0]
    assert user["content"][0] == {"type": "image"}
    assert "a {braced} dog" in user["content"][1]["text"] and "hint" in user["content"][1]["text"].lower()
    assert VLM_PROMPT.split("{alt_text}")[0] in user["content"][1]["text"]
    messages = llm_messages("A dog on grass.", cfg)
    assert messages[0]["role"] == "system" and "40 words" in messages[1]["content"]
    assert LLM_PROMPT.split("{caption}")[0] in messages[1]["content"]

    custom = RecaptionConfig(
        vlm_prompt="Describe. Alt: {alt_text}", llm_prompt="Shorten: {caption}", llm_system_prompt=""
    )
    assert vlm_messages("cat", custom)[0]["content"][1]["text"] == "Describe. Alt: cat"
    assert llm_messages("A cat.", custom) == [{"role": "user", "content": "Shorten: A cat."}]


def test_recaption_config_loads_from_yaml(tmp_path):
    (tmp_path / "pipeline.yaml").write_text(
        "root: out\nsources: []\nrecaption:\n  backend: transformers\n  vlm: models/vlm\n  llm: models/llm\n"
        "  batch_size: 4\n  max_image_side: 256\n  dtype: bfloat16\n  vlm_prompt: 'Caption it. Hint: {alt_text}'\n"
    )
    cfg = PipelineConfig.from_yaml(tmp_path / "pipeline.yaml").recaption
    assert (cfg.backend, cfg.vlm, cfg.batch_size, cfg.max_image_side, cfg.dtype) == (
        "transformers", "models/vlm", 4, 256, "bfloat16"
    )
    with pytest.raises(ConfigError, match="recaption.backend"):
        from_mapping(PipelineConfig, {"root": "x", "sources": [], "recaption": {"backend": "openai"}})
    with pytest.raises(ConfigError, match=r"vlm_prompt.*\{alt_text\}"):
        from_mapping(RecaptionConfig, {"vlm_prompt": "no placeholder"})
    with pytest.raises(ConfigError, match="batch_size"):
        from_mapping(RecaptionConfig, {"batch_size": 0})


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "purple").save(buffer, "JPEG")
    return buffer.getvalue()


def test_images_are_downscaled_before_the_vlm():
    assert _decode(_jpeg(3000, 1200), 512).size == (512, 205)
    assert _decode(_jpeg(300, 200), 512).size == (300, 200)


@pytest.mark.parametrize("name", ["exif_rotated_jpeg", "exif_rotated_tiff", "rgba_png"])
def test_the_vlm_sees_the_image_as_the_buckets_hold_it(name):
    seen = _decode(BAD_IMAGES[name][0], 512)
    held = bucket_shard(canonical_table({"k": BAD_IMAGES[name][0]}), 256, BucketConfig()).kept
    assert seen.mode == "RGB" and seen.size == (held["width"][0].as_py(), held["height"][0].as_py())
    stored = Image.open(io.BytesIO(held["image"][0].as_py()))
    assert np.abs(np.asarray(seen, dtype=int) - np.asarray(stored, dtype=int)).mean() < 8  # upright, alpha on white


def test_alt_text_backend_accounts_for_every_row(tmp_path):
    captions = ["A red circle on &amp; <i>white</i>", "", "   ", None, "blue   square"]
    table = conform(
        pa.table(
            {
                "key": [f"demo-{i:09d}" for i in range(5)],
                "url": [f"http://127.0.0.1/{i}.png" for i in range(5)],
                "caption": captions,
                "image": [_jpeg(64, 64)] * 5,
            }
        ),
        CANONICAL,
    )
    result = recaption_shard(table, RecaptionConfig(), tmp_path / "work")
    assert result.kept["recaption"].to_pylist() == ["A red circle on & white", "blue square"]
    assert result.kept["recaption_short"].to_pylist() == result.kept["recaption"].to_pylist()
    assert result.kept.schema == CANONICAL
    assert result.rejects["key"].to_pylist() == ["demo-000000001", "demo-000000002", "demo-000000003"]
    assert set(result.rejects["reason"].to_pylist()) == {"empty_caption"}
    assert set(result.rejects["stage"].to_pylist()) == {"recaption"}
    assert result.counts == {"kept": 2, "empty_caption": 3}
    assert result.stats.failures == {"empty_caption": 3}
    assert result.stats.mean_words_detailed == pytest.approx((5 + 2) / 2)  # "&" is no word


def test_a_prompt_reaches_the_model_with_one_bos_token():
    from tokenizers import processors

    from etl.recaption.prompts import render_llm_prompts, without_template_bos
    from tests.etl.tiny_captioners import build_tokenizer

    plain = build_tokenizer()  # adds no bos of its own: a template's bos stays
    assert without_template_bos(plain, ["<s> hi"]) == ["<s> hi"]

    # Llama-3's case: the template writes the bos token and the tokenizer adds one too.
    llama = build_tokenizer()
    llama.chat_template = "<s>" + llama.chat_template
    bos = llama.bos_token_id
    llama.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    (prompt,) = render_llm_prompts(llama, ["A red dog on a beach."], RecaptionConfig())
    ids = llama(prompt).input_ids
    assert ids[0] == bos and ids.count(bos) == 1
