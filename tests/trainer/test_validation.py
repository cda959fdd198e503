import numpy as np
import pyarrow as pa
import pytest
import torch

from etl.config import ConfigError
from trainer.config import load_train_config
from trainer.model import MMDiT
from trainer.validation import (
    ValidationSet,
    evenly_spaced_t,
    held_out,
    key_hashes,
    plan_validation,
    split_holdout,
)

MASK = 2**64 - 1


def reference_hash(key: str) -> int:
    """FNV-1a 64 then murmur3's fmix64, one key at a time in plain Python: what key_hashes vectorises."""
    h = 0xCBF29CE484222325
    for byte in key.encode():
        h = ((h ^ byte) * 0x100000001B3) & MASK
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & MASK
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & MASK
    return h ^ (h >> 33)


def index_of(keys: list[str], sizes: list[tuple[int, int]] | None = None) -> pa.Table:
    sizes = sizes or [(64, 64)] * len(keys)
    return pa.table({"shard": ["s.parquet"] * len(keys), "row": list(range(len(keys))), "key": keys,
                     "height": [h for h, _ in sizes], "width": [w for _, w in sizes]})


def test_key_hashes_equal_the_plain_definition_for_any_keys_and_array_layout():
    keys = ["", "a", "demo-000000001", "laion/0000123_4", "é€😀", "x" * 40, "demo-000000002"]
    expected = [reference_hash(k) for k in keys]
    assert key_hashes(pa.array(keys)).tolist() == expected
    # chunked, sliced (a non-zero offset into the buffers) and 32-bit-offset strings hash the same
    assert key_hashes(pa.chunked_array([keys[:3], keys[3:]])).tolist() == expected
    assert key_hashes(pa.array(["pad", *keys]).slice(1)).tolist() == expected
    assert key_hashes(pa.array(keys, pa.large_string())).tolist() == expected
    # pinned: the split must never move between releases
    assert key_hashes(pa.array(["demo-000000000"])).tolist() == [9116760190882901945]


def test_the_held_out_share_matches_the_fraction_and_stays_as_the_index_grows_or_is_reordered():
    keys = [f"img-{i:08d}" for i in range(20000)]
    mask = held_out(index_of(keys), 0.05)
    assert 0.045 < mask.mean() < 0.055
    grown = held_out(index_of(keys + [f"new-{i}" for i in range(5000)]), 0.05)
    assert np.array_equal(grown[: len(keys)], mask)  # no old key changes side
    shuffled = np.random.default_rng(0).permutation(len(keys))
    assert np.array_equal(held_out(index_of([keys[i] for i in shuffled]), 0.05), mask[shuffled])
    assert not held_out(index_of(keys), 0.0).any()


def test_split_holdout_accounts_for_every_row():
    index = index_of([f"k{i}" for i in range(500)])
    train, held = split_holdout(index, 0.2)
    assert train.num_rows + held.num_rows == 500
    assert set(train["key"].to_pylist()).isdisjoint(held["key"].to_pylist())


def test_validation_plan_takes_the_smallest_hashes_in_one_bucket_batches_dealt_to_every_model_rank():
    sizes = [(64, 64), (64, 32), (32, 64)]
    keys = [f"v{i}" for i in range(40)]
    held = index_of(keys, [sizes[i % 3] for i in range(40)])
    plan = plan_validation(held, images=25, batch_size=4)
    hashes = key_hashes(held["key"])
    chosen = sorted(row for batch in plan.batches for row in batch)
    assert chosen == sorted(np.argsort(hashes)[:25].tolist())
    for batch in plan.batches:
        assert 1 <= len(batch) <= 4 and len({sizes[row % 3] for row in batch}) == 1
    shares = plan.shares([2, 3, 5])
    assert sorted(i for ids in shares.values() for i in ids) == list(range(len(plan.batches)))
    assert shares[2][:2] == [0, 3]
    everything = plan_validation(held, images=40, batch_size=4).fingerprint
    assert plan_validation(held.take(np.arange(39, -1, -1)), images=40, batch_size=4).fingerprint == everything
    assert plan_validation(held.slice(0, 39), images=40, batch_size=4).fingerprint != everything
    with pytest.raises(ValueError, match="holdout_fraction"):
        plan_validation(held.slice(0, 0), 8, 4)


def _encoded_batches(model: MMDiT, sizes: list[tuple[int, int, int]]) -> tuple[list[dict], list[np.ndarray]]:
    cfg, generator = model.mmdit_config, torch.Generator().manual_seed(0)
    batches, hashes = [], []
    for n, (count, h, w) in enumerate(sizes):
        batches.append({"latents": torch.randn(count, cfg.in_channels, h, w, generator=generator),
                        "text": torch.randn(count, cfg.text_len, cfg.text_dim, generator=generator),
                        "pooled": torch.randn(count, cfg.pooled_dim, generator=generator)})
        hashes.append(np.arange(count, dtype=np.uint64) + np.uint64(1000 * n + 2**63))
    return batches, hashes


def test_validation_loss_depends_on_the_weights_only_not_on_how_batches_are_shared():
    torch.manual_seed(0)
    model = MMDiT.from_preset("tiny", num_blocks=1, max_res=64, max_res_orig=64)
    for p in model.parameters():  # away from the zero-initialised start, so the output depends on the input
        p.data.add_(0.02 * torch.randn_like(p))
    batches, hashes = _encoded_batches(model, [(3, 8, 8), (2, 8, 4), (1, 4, 8)])
    timesteps = evenly_spaced_t(4)
    assert timesteps == [0.125, 0.375, 0.625, 0.875]
    whole = ValidationSet(batches, hashes, timesteps).loss_sums(model, torch.device("cpu"), None)
    assert whole[-1] == 6 and torch.all(whole[:-1] > 0)
    again = ValidationSet(batches, hashes, timesteps).loss_sums(model, torch.device("cpu"), None)
    assert torch.equal(whole, again)  # fixed noise: no randomness left
    shares = [ValidationSet([batches[i]], [hashes[i]], timesteps).loss_sums(model, torch.device("cpu"), None)
              for i in range(3)]
    assert torch.allclose(sum(shares), whole, rtol=1e-12, atol=0)
    noise_changed = [h + np.uint64(1) for h in hashes]
    assert not torch.equal(ValidationSet(batches, noise_changed, timesteps).loss_sums(model, torch.device("cpu"), None), whole)
    with torch.no_grad():
        model.final.linear.bias.add_(0.5)
    assert not torch.equal(ValidationSet(batches, hashes, timesteps).loss_sums(model, torch.device("cpu"), None), whole)


def test_validation_settings_are_checked(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("data: {root: data, resolution: 64}\ntrain: {total_steps: 2, batch_size: 2}\n"
                      "checkpoint: {dir: run, every: 1}\n")
    with pytest.raises(ConfigError, match="holdout_fraction"):
        load_train_config(config, ["log.val_every=10"])
    with pytest.raises(ConfigError, match="holdout_fraction"):
        load_train_config(config, ["data.holdout_fraction=1.0"])
    with pytest.raises(ConfigError, match="val_images"):
        load_train_config(config, ["data.holdout_fraction=0.1", "log.val_every=10", "log.val_images=0"])
    cfg = load_train_config(config, ["data.holdout_fraction=0.1", "log.val_every=10"])
    assert (cfg.log.val_images, cfg.log.val_timesteps) == (256, 8)
