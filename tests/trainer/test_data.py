import io
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from etl.config import ConfigError
from etl.index import INDEX
from etl.layout import DataLayout
from etl.storage import read_parquet, write_parquet_atomic
from tests.trainer.demo_dataset import build_demo_dataset
from trainer.config import load_train_config
from trainer.data import (BucketBatches, BucketSampler, DataError, EpochBatch, clean_caption, open_index, pick_caption,
                          to_unit_range)
from trainer.feeder import Feeder
from trainer.validation import plan_validation

REPO = Path(__file__).resolve().parents[2]
RESOLUTION = 64


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("demo"), n=48, resolution=RESOLUTION)


@pytest.fixture(scope="module")
def two_caption_root(demo_root, tmp_path_factory):
    """The demo data with distinguishable captions: "detailed: ..." and "short: ..." (messy whitespace)."""
    root = tmp_path_factory.mktemp("captions")
    shutil.copytree(demo_root / "index", root / "index")
    for path in (demo_root / "buckets" / str(RESOLUTION)).glob("*.parquet"):
        table = read_parquet(path)
        alt = table["caption"].to_pylist()
        for name, prefix in (("recaption", "  detailed:\n "), ("recaption_short", "short:  ")):
            values = [f"{prefix}{text} " for text in alt]
            table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
        write_parquet_atomic(table, root / "buckets" / str(RESOLUTION) / path.name)
    return root


GROUP_ROWS = 7


def synthetic_index(sizes: dict[tuple[int, int], int], shard_rows: int = 200) -> pa.Table:
    """An index with ``sizes[(h, w)]`` rows per bucket, sorted by bucket as build_index writes it, over
    shards of ``shard_rows`` rows in row groups of GROUP_ROWS, every bucket spread over every shard."""
    rows = [(h, w) for (h, w), n in sorted(sizes.items()) for _ in range(n)]
    shards = -(-len(rows) // shard_rows)
    records = []
    for i, (h, w) in enumerate(rows):
        shard, row = i % shards, i // shards
        records.append({"shard": f"{shard:05d}.parquet", "row": row, "row_group": row // GROUP_ROWS,
                        "key": f"k{i}", "height": h, "width": w})
    return pa.Table.from_pylist(records, schema=INDEX)


def row_groups_of(index: pa.Table, rows) -> set[tuple[str, int]]:
    shard, group = index["shard"].to_pylist(), index["row_group"].to_pylist()
    return {(shard[r], group[r]) for r in rows}


def take(sampler, n):
    iterator = iter(sampler)
    return [next(iterator) for _ in range(n)]


SIZES = {(64, 64): 600, (64, 32): 300, (32, 64): 100, (48, 64): 9}


@pytest.mark.parametrize("shuffle", ["rows", "row_groups"])
def test_each_batch_comes_from_one_bucket_drawn_in_proportion_and_small_buckets_are_dropped(shuffle):
    index = synthetic_index(SIZES)
    sampler = BucketSampler(index, batch_size=10, seed=0, shuffle=shuffle)
    assert sampler.dropped_buckets == {"48x64": 9}
    assert sampler.batches_per_epoch == 100
    heights, widths = index["height"].to_numpy(), index["width"].to_numpy()
    epoch = take(sampler, 100)
    buckets = Counter()
    for batch in epoch:
        assert len(batch) == 10 and batch.epoch == 0
        assert len({(heights[r], widths[r]) for r in batch}) == 1
        buckets[(int(heights[batch[0]]), int(widths[batch[0]]))] += 1
    assert buckets == {(64, 64): 60, (64, 32): 30, (32, 64): 10}
    used = [r for batch in epoch for r in batch]
    assert len(set(used)) == len(used) == 1000  # an epoch uses every row of the kept buckets once


@pytest.mark.parametrize("shuffle", ["rows", "row_groups"])
def test_order_is_deterministic_from_the_seed_and_reshuffled_per_epoch(shuffle):
    index = synthetic_index(SIZES)
    first = take(BucketSampler(index, 10, seed=3, shuffle=shuffle), 200)
    assert first == take(BucketSampler(index, 10, seed=3, shuffle=shuffle), 200)
    assert first != take(BucketSampler(index, 10, seed=4, shuffle=shuffle), 200)
    assert first[100].epoch == 1
    assert first[:100] != first[100:]
    assert sorted(map(sorted, first[:100])) != sorted(map(sorted, first[100:]))  # new batches, not just a new order


@pytest.mark.parametrize("shuffle", ["rows", "row_groups"])
def test_resume_mid_epoch_continues_exactly_like_an_uninterrupted_run(shuffle):
    index = synthetic_index(SIZES)
    uninterrupted = take(BucketSampler(index, 10, seed=7, shuffle=shuffle), 250)
    sampler = BucketSampler(index, 10, seed=7, shuffle=shuffle)
    iterator = iter(sampler)
    for _ in range(137):  # across an epoch boundary; prefetched batches beyond these are not counted
        next(iterator)
        sampler.advance()
    next(iterator), next(iterator)
    state = sampler.state_dict()
    assert state["epoch"] == 1 and state["batches_used"] == 37
    assert all(isinstance(v, (int, str)) for v in state.values())  # saves with torch.save, loads with weights_only
    resumed = BucketSampler(index, 10, seed=7, shuffle=shuffle)
    assert resumed.load_state_dict(state) is None  # nothing re-planned
    assert take(resumed, 113) == uninterrupted[137:]


def _used(sampler: BucketSampler, batches: int) -> dict:
    iterator = iter(sampler)
    for _ in range(batches):
        next(iterator)
        sampler.advance()
    return sampler.state_dict()


@pytest.mark.parametrize("shuffle", ["rows", "row_groups"])
def test_another_loader_count_continues_the_epoch_after_the_batches_all_loaders_used(shuffle):
    """2 loaders used 37 batches each of the epoch's one order of batches (taking turns): 3 loaders take
    over after those 74, skipping fewer than one turn, and then read on in their turns."""
    index = synthetic_index(SIZES)
    order = take(BucketSampler(index, 10, seed=5, shuffle=shuffle), 100)  # one loader: the whole order
    state = _used(BucketSampler(index, 10, seed=5, rank_offset=0, num_replicas=2, shuffle=shuffle), 37)
    resumed = [BucketSampler(index, 10, seed=5, rank_offset=r, num_replicas=3, shuffle=shuffle) for r in range(3)]
    notes = {sampler.load_state_dict(state) for sampler in resumed}
    assert notes == {"2 loaders -> 3: epoch 0 continues after the 74 batches of its order already used (1 skipped)"}
    for r, sampler in enumerate(resumed):
        assert (sampler.epoch, sampler.batches_used) == (0, 25)
        nexts = take(sampler, 8)  # 8 = this epoch's last 8 of 33 per loader
        assert nexts == order[75 + r::3][:8] and all(b.epoch == 0 for b in nexts)
        assert take(sampler, 9)[8].epoch == 1
    # The position rolls into the next epoch when the old loaders used what the new ones would get.
    late = _used(BucketSampler(index, 10, seed=5, num_replicas=2, shuffle=shuffle), 49)
    sampler = BucketSampler(index, 10, seed=5, rank_offset=1, num_replicas=3, shuffle=shuffle)
    sampler.load_state_dict(late)
    assert (sampler.epoch, sampler.batches_used) == (1, 0)
    # Growing by several loaders: what one loader used (99 of 100) can pass what each of six gets (16, the
    # 4 left over dropped); the next epoch is then whole, not entered past its start.
    near_end = _used(BucketSampler(index, 10, seed=5, shuffle=shuffle), 99)
    six = [BucketSampler(index, 10, seed=5, rank_offset=r, num_replicas=6, shuffle=shuffle) for r in range(6)]
    notes = {sampler.load_state_dict(near_end) for sampler in six}
    assert notes == {"1 loaders -> 6: the 99 batches of epoch 0 already used cover this many loaders' share of it; "
                     "epoch 1 starts"}
    assert [(sampler.epoch, sampler.batches_used) for sampler in six] == [(1, 0)] * 6
    fresh = [BucketSampler(index, 10, seed=5, rank_offset=r, num_replicas=6, shuffle=shuffle) for r in range(6)]
    assert [take(sampler, 1) for sampler in six] == [fresh_sampler._epoch_batches(1)[:1].tolist() for fresh_sampler in fresh]


def test_another_order_redraws_the_epoch_and_continues_at_the_share_used():
    index = synthetic_index(SIZES)
    state = _used(BucketSampler(index, 10, seed=7, data_version="v1"), 137)  # epoch 1, 37 of 100
    bigger = BucketSampler(index, 20, seed=7, data_version="v1")
    assert bigger.load_state_dict(state) == (
        "batch_size 10 -> 20: epoch 1 is re-drawn and continues at the share already used (37 of 100 batches per "
        "loader -> 19 of 50); within this epoch some images repeat and some are left out")
    assert (bigger.epoch, bigger.batches_used) == (1, 19)
    assert take(bigger, 1) == [BucketSampler(index, 20, seed=7, data_version="v1")._epoch_batches(1)[19].tolist()]
    grown = synthetic_index({**SIZES, (64, 64): 900})
    for sampler, change in [(BucketSampler(grown, 10, seed=7, data_version="v2"), "data_version v1 -> v2"),
                            (BucketSampler(index, 10, seed=8, data_version="v1"), "seed 7 -> 8"),
                            (BucketSampler(index, 10, seed=7, shuffle="row_groups", data_version="v1"),
                             "shuffle rows -> row_groups")]:
        assert sampler.load_state_dict(state).startswith(f"{change}: epoch 1 is re-drawn")
        assert sampler.epoch == 1 and sampler.batches_used == -(-37 * sampler.batches_per_epoch // 100)


@pytest.mark.parametrize("shuffle", ["rows", "row_groups"])
def test_replicas_split_each_epoch(shuffle):
    index = synthetic_index(SIZES)
    a = take(BucketSampler(index, 10, seed=1, rank_offset=0, num_replicas=2, shuffle=shuffle), 50)
    b = take(BucketSampler(index, 10, seed=1, rank_offset=1, num_replicas=2, shuffle=shuffle), 50)
    rows_a, rows_b = {r for x in a for r in x}, {r for x in b for r in x}
    assert len(rows_a) == len(rows_b) == 500 and not rows_a & rows_b
    with pytest.raises(DataError, match="rank_offset 2"):
        BucketSampler(index, 10, seed=1, rank_offset=2, num_replicas=2)


def test_row_group_shuffle_reads_each_group_about_once_an_epoch():
    """Per epoch, "rows" touches most groups once per image in them; "row_groups" puts a group's rows of
    one bucket in at most two batches (a batch boundary cuts it), a batch holds a few whole groups, and the
    batches (not just their order) change from epoch to epoch."""
    index = synthetic_index({(64, 64): 1400, (64, 32): 700}, shard_rows=350)
    widths = index["width"].to_numpy()  # tells the two buckets apart
    batch = 20
    reads = {}
    for shuffle in ("rows", "row_groups"):
        sampler = BucketSampler(index, batch, seed=5, shuffle=shuffle)
        epochs = take(sampler, 2 * sampler.batches_per_epoch)
        first = epochs[: sampler.batches_per_epoch]
        batches_of_group = Counter((g, widths[rows[0]]) for rows in first for g in row_groups_of(index, rows))
        reads[shuffle] = sum(batches_of_group.values())
        if shuffle == "row_groups":
            assert max(batches_of_group.values()) <= 2
            # whole groups of 7, but the group that holds a shard's bucket boundary is shared by two buckets
            assert np.mean([len(row_groups_of(index, rows)) for rows in first]) <= batch / GROUP_ROWS + 1
            assert all(rows != sorted(rows) for rows in first[:5])  # the groups are mixed within a batch
            second = epochs[sampler.batches_per_epoch :]
            assert {frozenset(r) for r in first} != {frozenset(r) for r in second}
    groups = len({(g, widths[r]) for r in range(index.num_rows) for g in row_groups_of(index, [r])})
    assert reads["row_groups"] <= groups + 105  # each group (per bucket) once, plus at most one cut per batch
    assert reads["rows"] > 3 * reads["row_groups"]


def test_row_group_shuffle_needs_an_index_that_names_the_groups():
    index = synthetic_index(SIZES).drop_columns(["row_group"])
    assert BucketSampler(index, 10, seed=0).batches_per_epoch == 100
    with pytest.raises(DataError, match="no row_group column.*rebuild it.*data.shuffle=rows"):
        BucketSampler(index, 10, seed=0, shuffle="row_groups")
    with pytest.raises(DataError, match="shuffle must be one of"):
        BucketSampler(synthetic_index(SIZES), 10, seed=0, shuffle="files")


def test_batch_larger_than_every_bucket_is_a_clear_error():
    with pytest.raises(DataError, match=r"batch of 601 is larger than every bucket \(largest: 64x64 with 600 rows\)"):
        BucketSampler(synthetic_index(SIZES), batch_size=601, seed=0)


def test_an_empty_training_index_is_a_clear_error():
    with pytest.raises(DataError, match="no images to train on.*data.holdout_fraction"):
        BucketSampler(synthetic_index(SIZES).slice(0, 0), batch_size=4, seed=0)


def test_a_corrupt_bucket_shard_is_named(demo_root, tmp_path):
    root = tmp_path / "corrupt"
    shutil.copytree(demo_root, root)
    index = open_index(root, RESOLUTION)
    shard = index["shard"][0].as_py()
    path = root / "buckets" / str(RESOLUTION) / shard
    path.write_bytes(path.read_bytes()[:500])  # cut short: no footer
    dataset = BucketBatches(root, RESOLUTION, index, detailed_caption_prob=0.5, seed=0)
    with pytest.raises(DataError, match=f"bucket shard {path} cannot be read.*rebuild it"):
        dataset[[0]]


def test_an_image_that_does_not_decode_is_named_with_its_shard_and_row(demo_root, tmp_path):
    root = tmp_path / "damaged"
    shutil.copytree(demo_root, root)
    index = open_index(root, RESOLUTION)
    row = index.slice(3, 1).to_pylist()[0]
    path = root / "buckets" / str(RESOLUTION) / row["shard"]
    table = read_parquet(path)
    images = table["image"].to_pylist()
    images[row["row"]] = images[row["row"]][: len(images[row["row"]]) // 2]  # a body cut short, checksums intact
    write_parquet_atomic(table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())), path)
    dataset = BucketBatches(root, RESOLUTION, index, detailed_caption_prob=0.5, seed=0)
    where = f"image {row['key']} (bucket shard {RESOLUTION}/{row['shard']}, row {row['row']}) cannot be decoded"
    with pytest.raises(DataError, match=re.escape(where) + ".*rebuild that bucketed partition"):
        dataset[[3]]


def test_open_index_errors_say_what_is_missing(demo_root, tmp_path):
    assert open_index(demo_root, RESOLUTION).num_rows == 48
    with pytest.raises(DataError, match="nowhere does not exist: build it with the data pipeline .sd3 data run"):
        open_index(tmp_path / "nowhere", RESOLUTION)
    with pytest.raises(DataError, match=r"no index for resolution 256 .*resolutions: \[64\].*buckets.resolutions"):
        open_index(demo_root, 256)
    root = tmp_path / "unindexed"
    (root / "buckets" / "128").mkdir(parents=True)
    with pytest.raises(DataError, match="indexed resolutions: none.*materialize the bucket index"):
        open_index(root, 128)
    write_parquet_atomic(INDEX.empty_table(), DataLayout(root).index(128))
    with pytest.raises(DataError, match="has no rows"):
        open_index(root, 128)


def test_batches_decode_to_uint8_pixels_of_the_bucket_size(demo_root):
    index = open_index(demo_root, RESOLUTION)
    dataset = BucketBatches(demo_root, RESOLUTION, index, detailed_caption_prob=0.5, seed=0)
    sampler = BucketSampler(index, batch_size=4, seed=0)
    for batch in take(sampler, 8):
        item = dataset[batch]
        h, w = index["height"][batch[0]].as_py(), index["width"][batch[0]].as_py()
        assert item["images"].shape == (4, 3, h, w) and item["images"].dtype == torch.uint8
        assert item["keys"] == [index["key"][r].as_py() for r in batch]
        assert all(c.startswith("a ") and c.endswith("background") for c in item["captions"])
    # one image checked pixel for pixel against its stored bytes
    row = index.slice(5, 1).to_pylist()[0]
    stored = read_parquet(demo_root / "buckets" / str(RESOLUTION) / row["shard"]).slice(row["row"], 1).to_pylist()[0]
    pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(stored["image"])).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(dataset[[5]]["images"][0], pixels)
    unit = to_unit_range(pixels)
    assert unit.dtype == torch.float32 and unit.min() >= -1 and unit.max() <= 1
    assert torch.equal(to_unit_range(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([-1.0, 1.0]))


def test_open_shards_stay_bounded_and_reopen_on_demand(demo_root, monkeypatch):
    """The per-worker cache of open shards is an LRU: rows of evicted shards still read back right."""
    import trainer.data

    monkeypatch.setattr(trainer.data, "OPEN_SHARDS", 1)
    index = open_index(demo_root, RESOLUTION)
    assert len(set(index["shard"].to_pylist())) == 2
    dataset = BucketBatches(demo_root, RESOLUTION, index, detailed_caption_prob=0.5, seed=0)
    reference = BucketBatches(demo_root, RESOLUTION, index, detailed_caption_prob=0.5, seed=0)
    shards = index["shard"].to_pylist()
    first, second = (shards.index(name) for name in sorted(set(shards)))
    for row in [first, second, first + 1, second + 1, first]:  # alternate between the two shards
        assert torch.equal(dataset[[row]]["images"], reference[[row]]["images"])
        assert len(dataset._files) == 1


def test_rows_read_right_whatever_the_shard_column_encoding(demo_root):
    """An index's shard names as plain strings, or in chunks with dictionaries of their own (a concatenated
    or appended index), name the same shard rows as build_index's one dictionary."""
    index = open_index(demo_root, RESOLUTION)
    reference = BucketBatches(demo_root, RESOLUTION, index, detailed_caption_prob=0.5, seed=0)
    plain = index.set_column(0, "shard", index["shard"].cast(pa.string()))
    halves = [plain.slice(0, 20), plain.slice(20)]
    rechunked = pa.concat_tables(
        [t.set_column(0, "shard", t["shard"].combine_chunks().dictionary_encode()) for t in reversed(halves)]
    )
    rechunked = pa.concat_tables([rechunked.slice(index.num_rows - 20), rechunked.slice(0, index.num_rows - 20)])
    assert rechunked["shard"].num_chunks == 2 and rechunked["shard"].to_pylist() == index["shard"].to_pylist()
    for variant in (plain, rechunked):
        dataset = BucketBatches(demo_root, RESOLUTION, variant, detailed_caption_prob=0.5, seed=0)
        for row in range(index.num_rows):
            expected = reference[[row]]
            item = dataset[[row]]
            assert item["keys"] == expected["keys"] and torch.equal(item["images"], expected["images"])


def test_dataloader_workers_decode_the_same_batches(two_caption_root):
    index = open_index(two_caption_root, RESOLUTION)
    dataset = BucketBatches(two_caption_root, RESOLUTION, index, detailed_caption_prob=0.5, seed=0)
    sampler = BucketSampler(index, batch_size=4, seed=2)
    batches = take(sampler, sampler.batches_per_epoch + 3)
    assert batches[-1].epoch == 1  # the epoch reaches the workers with the batch: it decides the captions
    loader = DataLoader(dataset, sampler=BucketSampler(index, batch_size=4, seed=2), batch_size=None, num_workers=2)
    for batch, item in zip(batches, loader):
        expected = dataset[batch]
        assert item["keys"] == expected["keys"] and item["captions"] == expected["captions"]
        assert torch.equal(item["images"], expected["images"])


def test_caption_choice_is_half_and_half_deterministic_and_cleaned(two_caption_root):
    index = open_index(two_caption_root, RESOLUTION)
    rows = list(range(index.num_rows))
    dataset = BucketBatches(two_caption_root, RESOLUTION, index, detailed_caption_prob=0.5, seed=0)
    choices = [dataset[EpochBatch([r], epoch)]["captions"][0] for epoch in range(20) for r in rows]
    assert all(c.startswith(("detailed: a ", "short: a ")) and "  " not in c and c == c.strip() for c in choices)
    detailed = sum(c.startswith("detailed") for c in choices) / len(choices)
    assert 0.44 < detailed < 0.56
    again = BucketBatches(two_caption_root, RESOLUTION, index, detailed_caption_prob=0.5, seed=0)
    assert [again[EpochBatch([r], 3)]["captions"][0] for r in rows] == choices[3 * len(rows) : 4 * len(rows)]
    assert choices[: len(rows)] != choices[len(rows) : 2 * len(rows)]  # a key's choice changes across epochs
    bucket_of = list(zip(index["height"].to_pylist(), index["width"].to_pylist()))
    first_bucket = [r for r in rows if bucket_of[r] == bucket_of[0]]
    for prob, prefix in ((1.0, "detailed"), (0.0, "short")):
        always = BucketBatches(two_caption_root, RESOLUTION, index, detailed_caption_prob=prob, seed=0)
        assert all(c.startswith(prefix) for c in always[EpochBatch(first_bucket, 0)]["captions"])
    with pytest.raises(DataError, match="one bucket"):
        dataset[rows[: len(first_bucket) + 1]]


def test_clean_caption_collapses_whitespace_only():
    assert clean_caption("  A red\tcircle,\n\n on white.  ") == "A red circle, on white."


def test_a_missing_caption_falls_back_to_the_other_then_the_alt_text():
    row = {"recaption": None, "recaption_short": " short one ", "caption": "alt"}
    assert pick_caption(row, detailed=True) == "short one"
    assert pick_caption({"recaption": "  ", "recaption_short": None, "caption": "alt  text"}, detailed=False) == "alt text"


def test_a_replicas_vae_noise_is_not_a_validation_batchs(demo_root):
    """At seed 0 replica r's training stream and validation batch r's stream once started from the same
    seed: the model ranks then trained on the very noise draws their validation latents used."""
    cfg = load_train_config(REPO / "configs/train/demo.yaml",
                            [f"data.root={demo_root}", "train.batch_size=2", "train.seed=0", "data.num_workers=0"])
    index = open_index(demo_root, RESOLUTION)
    plan = plan_validation(index, images=8, batch_size=2)
    validation, training = [], []
    for replica in range(2):
        feeder = Feeder(cfg, index, 1, replica, 2, torch.device("cpu"))
        validation.append(feeder.encode_validation(plan, [replica])[0]["latents"])
        item = BucketBatches(demo_root, RESOLUTION, plan.index, cfg.data.detailed_caption_prob, seed=0)[plan.batches[replica]]
        training.append(feeder.encode(item)["latents"])  # the same images, through the replica's own stream
    for replica in range(2):
        assert not torch.equal(validation[replica], training[replica])
        assert torch.equal(validation[replica], Feeder(cfg, index, 1, replica, 2, torch.device("cpu"))
                           .encode_validation(plan, [replica])[0]["latents"])  # fixed whatever the replica


@pytest.mark.parametrize("override, message", [
    ("model.overrides.pooled_dim=100", "model.overrides.pooled_dim: 100 does not match the CLIP text encoder's projection width, 64"),
    ("model.overrides.in_channels=4", "model.overrides.in_channels: 4 does not match the VAE's latent channels, 16"),
])
def test_a_model_that_cannot_read_the_encoders_output_fails_at_the_loaders_start(demo_root, override, message):
    cfg = load_train_config(REPO / "configs/train/demo.yaml", [f"data.root={demo_root}", override])
    with pytest.raises(ConfigError, match=re.escape(message)):
        Feeder(cfg, open_index(demo_root, RESOLUTION), 1, 0, 1, torch.device("cpu"))
