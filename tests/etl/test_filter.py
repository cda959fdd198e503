import io

import pytest
from PIL import Image

from etl.config import FilterConfig
from etl.filter import HASH_CANDIDATE_COLUMNS, duplicate_winners, filter_shard, hash_candidates
from etl.schema import CANONICAL
from tests.etl.bad_images import BAD_IMAGES, UPRIGHT_HEIGHT, UPRIGHT_WIDTH, canonical_table, webp


def _photo(colour: tuple[int, int, int], size=(80, 100)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def _outcomes(result) -> dict[str, str]:
    outcomes = {key: "kept" for key in result.kept["key"].to_pylist()}
    for key, reason in zip(result.rejects["key"].to_pylist(), result.rejects["reason"].to_pylist()):
        assert key not in outcomes, f"{key} both kept and rejected, or rejected twice"
        outcomes[key] = reason
    return outcomes


def test_every_bad_image_gets_its_expected_outcome():
    table = canonical_table({name: data for name, (data, _type, _outcome) in BAD_IMAGES.items()})
    result = filter_shard(table, None, FilterConfig())
    assert _outcomes(result) == {name: outcome for name, (_data, _type, outcome) in BAD_IMAGES.items()}
    assert sum(result.counts.values()) == table.num_rows
    assert result.rejects["stage"].to_pylist() == ["filter"] * result.rejects.num_rows
    assert all(result.rejects["detail"].to_pylist()), "every rejection explains itself"


def test_kept_rows_carry_the_upright_size_and_are_otherwise_unchanged():
    kept_names = [name for name, (_d, _t, outcome) in BAD_IMAGES.items() if outcome == "kept"]
    table = canonical_table({name: BAD_IMAGES[name][0] for name in kept_names})
    result = filter_shard(table, None, FilterConfig())
    assert result.kept.schema == CANONICAL
    assert result.kept["width"].to_pylist() == [UPRIGHT_WIDTH] * len(kept_names)
    assert result.kept["height"].to_pylist() == [UPRIGHT_HEIGHT] * len(kept_names)
    # the EXIF-rotated JPEG is stored lying down; only width/height change, the bytes stay the original
    rotated = kept_names.index("exif_rotated_jpeg")
    assert table["width"][rotated].as_py() == UPRIGHT_HEIGHT
    for name in set(CANONICAL.names) - {"width", "height"}:
        assert result.kept[name].equals(table[name]), name


def test_metadata_thresholds_nulls_pass_and_none_disables():
    images = {f"k{i}": _photo((i, 0, 0)) for i in range(5)}
    table = canonical_table(
        images,
        punsafe=[0.1, 0.9, None, 0.5, 0.1],
        pwatermark=[0.1, 0.1, 0.95, None, 0.8],
    )
    cfg = FilterConfig(min_side=16, max_punsafe=0.5, max_pwatermark=0.8)
    assert _outcomes(filter_shard(table, None, cfg)) == {
        "k0": "kept", "k1": "punsafe", "k2": "pwatermark", "k3": "kept", "k4": "kept"
    }
    assert hash_candidates(table, cfg)["key"].to_pylist() == ["k0", "k3", "k4"]
    # What the content_hashes asset reads of a shard: the same candidates without the images.
    assert hash_candidates(table.select(HASH_CANDIDATE_COLUMNS), cfg).equals(hash_candidates(table, cfg))
    no_limits = FilterConfig(min_side=16, max_punsafe=None, max_pwatermark=None)
    assert set(_outcomes(filter_shard(table, None, no_limits)).values()) == {"kept"}
    assert hash_candidates(table, no_limits).num_rows == 5


def test_nan_scores_are_unknown_for_the_thresholds_and_the_dedup_alike():
    same = _photo((7, 7, 7))
    table = canonical_table({"k0": same, "k1": same, "k2": _photo((9, 0, 0))},
                            punsafe=[float("nan"), float("nan"), 0.9], pwatermark=[float("nan")] * 3)
    cfg = FilterConfig(min_side=16, max_punsafe=0.5, max_pwatermark=0.8)
    winners = duplicate_winners([hash_candidates(table, cfg)])
    assert _outcomes(filter_shard(table, winners, cfg)) == {"k0": "kept", "k1": "duplicate", "k2": "punsafe"}


@pytest.mark.parametrize("name", ["exif_rotated_jpeg", "exif_rotated_tiff"])
def test_min_side_and_the_recorded_size_are_upright(name):
    table = canonical_table({"rotated": BAD_IMAGES[name][0]})
    assert _outcomes(filter_shard(table, None, FilterConfig(min_side=100))) == {"rotated": "too_small"}
    kept = filter_shard(table, None, FilterConfig(min_side=96)).kept
    assert (kept["width"].to_pylist(), kept["height"].to_pylist()) == ([96], [144])


def _two_shards():
    red, green, blue = _photo((255, 0, 0)), _photo((0, 255, 0)), _photo((0, 0, 255))
    shard_a = canonical_table({"b-2": red, "a-1": green, "a-3": green}, punsafe=[0.0, 0.0, 0.0])
    # "0-unsafe" has the smallest key of all blue copies but is punsafe: it must not win and take the others down
    shard_b = canonical_table({"a-2": red, "0-unsafe": blue, "c-1": blue, "c-2": blue}, punsafe=[0.0, 0.9, 0.0, 0.0])
    return shard_a, shard_b


def test_duplicates_are_removed_across_shards_whatever_the_order():
    shard_a, shard_b = _two_shards()
    cfg = FilterConfig(min_side=16)
    candidates = [hash_candidates(shard_a, cfg), hash_candidates(shard_b, cfg)]
    winners = duplicate_winners(candidates)
    assert winners.equals(duplicate_winners(reversed(candidates)))

    forward = {**_outcomes(filter_shard(shard_a, winners, cfg)), **_outcomes(filter_shard(shard_b, winners, cfg))}
    backward = {**_outcomes(filter_shard(shard_b, winners, cfg)), **_outcomes(filter_shard(shard_a, winners, cfg))}
    assert forward == backward == {
        "b-2": "duplicate", "a-2": "kept",  # red: smallest key wins even in the other shard
        "a-1": "kept", "a-3": "duplicate",  # green: within one shard
        "0-unsafe": "punsafe", "c-1": "kept", "c-2": "duplicate",
    }
    details = filter_shard(shard_a, winners, cfg).rejects["detail"].to_pylist()
    assert "same bytes as a-2" in details


def test_no_dedup_without_winners_or_when_disabled():
    shard_a, shard_b = _two_shards()
    cfg = FilterConfig(min_side=16)
    winners = duplicate_winners([hash_candidates(shard_a, cfg), hash_candidates(shard_b, cfg)])
    assert "duplicate" not in _outcomes(filter_shard(shard_a, None, cfg)).values()
    disabled = FilterConfig(min_side=16, dedup=False)
    assert "duplicate" not in _outcomes(filter_shard(shard_a, winners, disabled)).values()


def test_duplicate_winners_of_nothing_is_empty():
    assert duplicate_winners([]).num_rows == 0
    assert duplicate_winners([]).column_names == ["sha256", "key"]


def test_null_hash_is_not_a_duplicate_candidate():
    table = canonical_table({"x": webp(), "y": webp()}, sha256=[None, None])
    cfg = FilterConfig()
    assert hash_candidates(table, cfg).num_rows == 0
    winners = duplicate_winners([hash_candidates(table, cfg)])
    assert _outcomes(filter_shard(table, winners, cfg)) == {"x": "kept", "y": "kept"}


def test_empty_shard():
    table = canonical_table({})
    result = filter_shard(table, None, FilterConfig())
    assert result.kept.num_rows == 0 and result.rejects.num_rows == 0


def test_a_copy_with_an_alt_text_wins_over_a_smaller_key_without_one():
    # The alt text is the caption (alt-text backend) or the VLM's hint: a winner without one would be
    # rejected at recaption, after its captioned copies were dropped as its duplicates.
    same = _photo((3, 3, 3))
    table = canonical_table({"s-0": same, "s-1": same, "s-2": same, "s-3": _photo((4, 4, 4))},
                            caption=["", "a red fox in the snow", "a red fox", None])
    cfg = FilterConfig(min_side=16)
    winners = duplicate_winners([hash_candidates(table, cfg)])
    assert _outcomes(filter_shard(table, winners, cfg)) == {"s-0": "duplicate", "s-1": "kept", "s-2": "duplicate",
                                                            "s-3": "kept"}
    html_only = canonical_table({"t-0": same, "t-1": same}, caption=["<b> </b>", "&nbsp;"])  # nothing once cleaned
    assert duplicate_winners([hash_candidates(html_only, cfg)])["key"].to_pylist() == ["t-0"]
