import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.text_encode import padded_to_text_len
from etl.config import ConfigError, from_mapping
from trainer import encoders as encoders_module
from trainer.encoders import Encoders, EncodersConfig, build_tiny_text_encoder, build_tiny_vae, register_preset
from trainer.tokenizer import DEMO_COLOURS, DEMO_SHAPES, build_tokenizer

REPO = Path(__file__).resolve().parents[2]

CAPTIONS = ["a red circle on a white background", "a blue square", "Zebra crossing at night, unusual words!"]


@pytest.fixture(scope="module")
def tiny():
    return Encoders(EncodersConfig(preset="tiny"))


def test_tokenizer_gives_each_demo_word_its_own_token():
    tokenizer = build_tokenizer()
    words = [*DEMO_COLOURS, *DEMO_SHAPES, "background", "a", "on"]
    ids = [tokenizer(w, add_special_tokens=False).input_ids for w in words]
    assert all(len(i) == 1 for i in ids), dict(zip(words, ids))
    flat = [i[0] for i in ids]
    assert len(set(flat)) == len(words)
    assert tokenizer.unk_token_id not in flat


def test_tokenizer_handles_any_text_and_is_deterministic():
    first, second = build_tokenizer(), build_tokenizer()
    text = "Xylophone QUARTET, naïve café -- 42%"
    ids = first(text).input_ids
    assert ids == second(text).input_ids
    assert ids[0] == first.bos_token_id and ids[-1] == first.eos_token_id
    assert first.unk_token_id not in ids  # unknown words fall back to characters, accents are stripped
    assert first.decode(ids, skip_special_tokens=True).replace(" ", "") == "xylophonequartet,naivecafe--42%"
    padded = first(["a", "a red circle"], padding="max_length", max_length=77, truncation=True)
    assert len(padded.input_ids[0]) == 77 and padded.input_ids[0][3] == first.pad_token_id


def test_encode_text_shapes_masking_and_width_padding(tiny):
    text, pooled = tiny.encode_text(CAPTIONS)
    assert text.shape == (3, 2 * 77, 64) and pooled.shape == (3, tiny.pooled_dim) == (3, 64)
    for i, caption in enumerate(CAPTIONS):
        for block, name in enumerate(("gemma", "bert")):
            n = len(tiny.tokenizers[name](caption).input_ids)
            rows = text[i, block * 77 : (block + 1) * 77]
            assert (rows[n:] == 0).all(), f"{name} padding rows of caption {i} are not zero"
            assert (rows[:n].abs().sum(-1) > 0).all()
    gemma_width, bert_width = (tiny.text_models[n].config.hidden_size for n in ("gemma", "bert"))
    assert bert_width < 64 == gemma_width
    assert (text[:, 77:, bert_width:] == 0).all()
    assert pooled.abs().sum(-1).gt(0).all()


def test_encode_text_of_a_caption_does_not_depend_on_its_batch(tiny):
    text, pooled = tiny.encode_text(CAPTIONS)
    alone_text, alone_pooled = tiny.encode_text(CAPTIONS[1:2])
    torch.testing.assert_close(alone_text[0], text[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone_pooled[0], pooled[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(text[0], text[1])


@torch.no_grad()
def test_captions_encoded_in_length_sorted_chunks_equal_one_batch_padded_to_text_len():
    """Detailed captions cut at text_len mixed with short ones, in chunks of one length group and at most
    120 tokens: the same rows, in the captions' order, as one batch of 77-token rows."""
    chunked = Encoders(EncodersConfig(preset="tiny", text_batch_tokens=120))
    long = "a detailed caption of a red circle and a blue square on a white background " * 8
    captions = [long, "a blue square", CAPTIONS[2], long.upper(), "a", *CAPTIONS, "red " * 30]
    lengths = [max(len(chunked.tokenizers[n](c, truncation=True, max_length=77).input_ids) for n in ("gemma", "bert", "clip"))
               for c in captions]
    assert max(lengths) == 77 and min(lengths) <= 3
    chunks = encoders_module._length_chunks(lengths, 120)
    assert sorted(i for c in chunks for i in c) == list(range(len(captions))) and len(chunks) >= 3
    step = encoders_module.LENGTH_STEP
    for chunk in chunks:
        rounded = {-(-lengths[i] // step) * step for i in chunk}
        assert len(rounded) == 1 and (len(chunk) == 1 or len(chunk) * rounded.pop() <= 120)
    text, pooled = chunked.encode_text(captions)
    expected_text, expected_pooled = padded_to_text_len(chunked, captions)
    torch.testing.assert_close(text, expected_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-5, rtol=1e-5)
    assert chunked.encode_text([])[0].shape == (0, 154, 64)


def test_free_text_encoders_offloads_and_encoding_still_works(tiny):
    before = tiny.encode_text(CAPTIONS[:1])
    tiny.free_text_encoders()
    assert all(next(m.parameters()).device.type == "cpu" for m in tiny.text_models.values())
    after = tiny.encode_text(CAPTIONS[:1])
    torch.testing.assert_close(before, after)


def test_vae_latents_are_shifted_and_scaled(tiny):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 48) * 2 - 1  # non-square
    mode = Encoders(EncodersConfig(preset="tiny", latents="mode"))
    z = mode.encode_images(x)
    assert z.shape == (2, 16, 8, 6)
    vae = build_tiny_vae(0)
    with torch.no_grad():
        expected = (vae.encode(x).latent_dist.mode() - 0.1159) * 0.3611
        decoded = vae.decode(z / 0.3611 + 0.1159).sample.clamp(-1, 1)
    torch.testing.assert_close(z, expected)
    images = mode.decode_latents(z)
    assert images.shape == x.shape and images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images, decoded)

    sampled = tiny.encode_images(x, generator=torch.Generator().manual_seed(1))
    assert sampled.shape == z.shape and not torch.equal(sampled, z)


def test_bad_image_shapes_are_clear_errors(tiny):
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny.encode_images(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny.encode_images(torch.zeros(3, 64, 64))


def test_tiny_weights_are_deterministic_from_the_seed():
    a, b, c = (build_tiny_text_encoder("gemma", seed)[1] for seed in (0, 0, 1))
    assert torch.equal(a.embed_tokens.weight, b.embed_tokens.weight)
    assert not torch.equal(a.embed_tokens.weight, c.embed_tokens.weight)


def test_real_loading_path_from_saved_folders(tiny, tmp_path):
    """The tiny models saved as a hub repo would hold them load back through the hub-id code path."""
    folders = {}
    tiny.vae.save_pretrained(tmp_path / "flux" / "vae")
    for name in ("gemma", "bert", "clip"):
        tiny.text_models[name].save_pretrained(tmp_path / name)
        tiny.tokenizers[name].save_pretrained(tmp_path / name)
        folders[name] = str(tmp_path / name)
    config = from_mapping(
        EncodersConfig,
        {"preset": "reference", "vae": str(tmp_path / "flux"), "vae_subfolder": "vae", "text_dim": 64, "latents": "mode", **folders},
    )
    loaded = Encoders(config)
    for a, b in zip(loaded.encode_text(CAPTIONS), tiny.encode_text(CAPTIONS)):
        torch.testing.assert_close(a, b)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    reference = Encoders(EncodersConfig(preset="tiny", latents="mode"))
    torch.testing.assert_close(loaded.encode_images(x), reference.encode_images(x))

    recorded = Encoders.from_config_dict(loaded.to_config_dict())
    assert recorded.config == config


def test_a_local_copy_of_a_pipeline_repo_finds_its_vae_and_a_preset_vae_named_outright_keeps_its_subfolder(
        tiny, tmp_path):
    tiny.vae.save_pretrained(tmp_path / "FLUX.1-dev" / "vae")  # as a snapshot of the whole repo holds it
    (tmp_path / "FLUX.1-dev" / "model_index.json").write_text("{}")
    config = EncodersConfig(preset="tiny", vae=str(tmp_path / "FLUX.1-dev"), latents="mode")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    reference = Encoders(EncodersConfig(preset="tiny", latents="mode"))  # the weights saved above
    torch.testing.assert_close(Encoders(config).encode_images(x), reference.encode_images(x))
    assert EncodersConfig(preset="tiny", vae="black-forest-labs/FLUX.1-dev").vae_subfolder == "vae"


def test_a_checkpoint_lacking_some_weights_is_refused_not_loaded_random(tiny, tmp_path):
    from transformers import CLIPTextModel

    CLIPTextModel(tiny.text_models["clip"].config).save_pretrained(tmp_path / "clip")  # no text_projection
    tiny.tokenizers["clip"].save_pretrained(tmp_path / "clip")
    with pytest.raises(ConfigError, match=r"encoders\.clip: .* has no weights for 1 tensors of "
                                          r"CLIPTextModelWithProjection \(text_projection\.weight\)"):
        Encoders(EncodersConfig(preset="tiny", clip=str(tmp_path / "clip")))


def test_a_registered_preset_takes_a_local_vae_folder(tiny, tmp_path, monkeypatch):
    """The hook the demo uses: tiny text encoders with a VAE trained elsewhere, saved to a folder."""
    monkeypatch.setattr(encoders_module, "PRESETS", dict(encoders_module.PRESETS))
    trained = build_tiny_vae(seed=7)
    trained.save_pretrained(tmp_path / "demo-vae")
    register_preset("demo", vae=str(tmp_path / "demo-vae"), gemma="tiny", bert="tiny", clip="tiny", text_len=77, text_dim=64)
    demo = Encoders(from_mapping(EncodersConfig, {"preset": "demo", "latents": "mode"}))
    assert demo.config.vae_subfolder is None
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = (trained.encode(x).latent_dist.mode() - 0.1159) * 0.3611
    torch.testing.assert_close(demo.encode_images(x), expected)
    with pytest.raises(ValueError, match="lacks"):
        register_preset("broken", vae="tiny")


def test_missing_local_folder_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"encoders\.vae: local folder .*does-not-exist"):
        Encoders(EncodersConfig(preset="tiny", vae=str(tmp_path / "does-not-exist")))
    with pytest.raises(FileNotFoundError, match=r"encoders\.gemma"):
        Encoders(EncodersConfig(preset="tiny", gemma="./no/such/gemma"))


def test_config_resolves_presets_and_rejects_bad_settings():
    reference = EncodersConfig()
    assert (reference.vae, reference.vae_subfolder, reference.text_dim) == ("black-forest-labs/FLUX.1-dev", "vae", 2304)
    local = EncodersConfig(vae="/models/my-vae")
    assert local.vae_subfolder is None and local.gemma == "google/gemma-2-2b"
    with pytest.raises(ConfigError, match="^preset: unknown encoder preset"):
        EncodersConfig(preset="huge")
    with pytest.raises(ConfigError, match="text_dim"):
        from_mapping(EncodersConfig, {"text_dim": "wide"})
    with pytest.raises(ConfigError, match="text_dim.*narrower"):
        Encoders(EncodersConfig(preset="tiny", text_dim=32))


def test_a_model_rank_starts_without_importing_the_encoder_libraries():
    # Model ranks import trainer.train (and EncodersConfig through it) but never build an encoder; diffusers'
    # autoencoders and the transformers models cost every such process seconds of start-up.
    heavy = ["diffusers.models.autoencoders", "transformers.models.gemma2.modeling_gemma2",
             "transformers.models.modernbert.modeling_modernbert", "transformers.models.clip.modeling_clip"]
    probe = f"import sys, trainer.train; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
