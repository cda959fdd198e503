"""The loader's VAE memo: each image through the demo VAE's encoder once, with the latents of encoding it every time."""

import logging
import re
from pathlib import Path

import pytest
import torch

from tests.trainer.demo_dataset import build_demo_dataset
from trainer.config import load_train_config
from trainer.data import open_index
from trainer.encoders import Encoders, EncodersConfig
from trainer.feeder import Feeder
from trainer.vae_memo import VaeMemo

REPO = Path(__file__).resolve().parents[2]
RESOLUTION = 64
IMAGES = 48
BATCH = 6  # 2 images for each of 3 model ranks: 8 batches an epoch


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("demo"), n=IMAGES, resolution=RESOLUTION)


@pytest.fixture(scope="module")
def encoders():
    return Encoders(EncodersConfig(preset="demo", text_len=16))


def _count_encoded_rows(encoders: Encoders) -> list[int]:
    """Rows of every call of the VAE's encoder from now on."""
    calls, encode = [], encoders.vae.encode
    encoders.vae.encode = lambda x, *args, **kwargs: calls.append(x.shape[0]) or encode(x, *args, **kwargs)
    return calls


def _feed(demo_root, memo_mb: float, batches: int) -> tuple[list[dict], list[list[str]], list[int]]:
    """Each batch the feeder made (its model ranks' parts joined), its keys, and the rows of each VAE encoder call."""
    cfg = load_train_config(REPO / "configs/train/demo.yaml", [
        f"data.root={demo_root}", f"data.vae_memo_mb={memo_mb}", "data.num_workers=0", f"train.batch_size={BATCH // 3}"])
    feeder = Feeder(cfg, open_index(demo_root, RESOLUTION), 3, 0, 1, torch.device("cpu"))
    calls, keys, posteriors = _count_encoded_rows(feeder.encoders), [], feeder.vae_memo.posteriors
    feeder.vae_memo.posteriors = lambda batch_keys, *args: keys.append(list(batch_keys)) or posteriors(batch_keys, *args)
    merged = [{name: torch.cat([part[name] for part in parts]) for name in parts[0]}
              for parts in feeder.chunks(batches, lambda step, snapshot: None)]
    return merged, keys, calls


def test_over_three_epochs_each_image_is_encoded_once_and_the_latents_are_those_of_encoding_it_every_time(demo_root,
                                                                                                         caplog):
    batches = 3 * IMAGES // BATCH
    with caplog.at_level(logging.INFO, logger="trainer.feeder"):
        remembered, keys, calls = _feed(demo_root, 64, batches)
        encoded, keys_without, calls_without = _feed(demo_root, 0, batches)
    summaries = [r.message for r in caplog.records if r.message.startswith("VAE memo: ")]
    assert len(summaries) == 1, summaries  # said by the memo's feeder, at its end
    assert re.fullmatch(rf"VAE memo: {sum(calls)} images kept \([\d.]+ MB\); {sum(calls)} of the {batches * BATCH} "
                        "images it served went through the encoder", summaries[0]), summaries
    assert keys == keys_without and len(keys) == batches
    first_seen = [sum(key not in {k for batch in keys[:i] for k in batch} for key in batch) for i, batch in enumerate(keys)]
    assert calls == [n for n in first_seen if n]  # only images not seen before reach the encoder
    assert sum(calls) == len({key for batch in keys for key in batch}) > IMAGES - BATCH and len(calls) < batches
    assert calls_without == [BATCH] * batches
    for with_memo, without in zip(remembered, encoded):
        # The same VAE noise from the same generator; the posteriors equal up to the rounding of the batch the
        # encoder ran them in (up to 1.2e-5 on 2 threads).
        torch.testing.assert_close(with_memo["latents"], without["latents"], rtol=1e-4, atol=1e-4)
        assert torch.equal(with_memo["text"], without["text"]) and torch.equal(with_memo["pooled"], without["pooled"])


def test_past_its_budget_the_memo_keeps_what_it_holds_and_encodes_the_others_every_time(encoders, caplog):
    images = torch.rand(8, 3, RESOLUTION, RESOLUTION) * 2 - 1
    keys = [f"image-{i}" for i in range(8)]
    reference = encoders.posteriors(images)
    per_image = reference[0].numel() * reference[0].element_size()
    memo = VaeMemo(budget_mb=5 * per_image / 2**20)
    calls = []

    def encode(x):
        calls.append(x.shape[0])
        return encoders.posteriors(x)

    with caplog.at_level(logging.WARNING, logger="trainer.vae_memo"):
        for _ in range(3):
            torch.testing.assert_close(memo.posteriors(keys, images, encode), reference, rtol=1e-4, atol=1e-4)
    assert calls == [8, 3, 3] and len(memo) == 5 and memo.kept_bytes == 5 * per_image
    assert (memo.encoded, memo.requested) == (14, 24)
    assert [r.message for r in caplog.records].count(
        f"data.vae_memo_mb ({5 * per_image / 2**20:g} MB) is full at 5 images: the others are encoded every time "
        "they come") == 1
    # A batch of kept and new images: only the new ones reach the encoder, in the batch's order.
    mixed = memo.posteriors(["image-9", "image-0", "image-1"], images[[7, 0, 1]], encode)
    assert calls[-1] == 1
    torch.testing.assert_close(mixed, reference[[7, 0, 1]], rtol=1e-4, atol=1e-4)


def test_without_a_budget_every_batch_goes_to_the_encoder_whole(encoders):
    images = torch.rand(4, 3, RESOLUTION, RESOLUTION) * 2 - 1
    memo, calls = VaeMemo(budget_mb=0), []
    for _ in range(2):
        out = memo.posteriors(list("abcd"), images, lambda x: calls.append(x) or encoders.posteriors(x))
        assert calls[-1] is images
    assert len(memo) == 0 and memo.kept_bytes == 0 and memo.encoded == memo.requested == 8
    assert torch.equal(encoders.latents_from(out, torch.Generator().manual_seed(3)),
                       encoders.encode_images(images, torch.Generator().manual_seed(3)))
