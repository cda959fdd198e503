import io
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFilter

from etl.buckets import ROW_GROUP_BYTES, bucket_order, bucket_shard, bucket_size, encode_image, row_group_rows, write_bucketed
from etl.config import BucketConfig
from etl.images import ImageRejected, to_rgb
from etl.index import INDEX_COLUMNS
from etl.schema import CANONICAL, conform
from etl.storage import read_parquet
from tests.etl.bad_images import BAD_IMAGES, MARKER, UPRIGHT_HEIGHT, UPRIGHT_WIDTH, canonical_table

# What bucket_shard makes of each bad image at resolution 256 (no filter in front of it).
BUCKET_OUTCOMES = {
    name: "kept" if outcome == "kept" else outcome for name, (_data, _type, outcome) in BAD_IMAGES.items()
}
BUCKET_OUTCOMES["one_pixel_png"] = "too_small_for_bucket"
BUCKET_OUTCOMES["sliver_png"] = "too_small_for_bucket"  # 4000 x 40 -> 40 * 256/4000 = 2.6 px high


def test_bucket_is_height_then_width():
    assert bucket_size(1000, 500, 256) == (256, 128)  # portrait
    assert bucket_size(500, 1000, 256) == (128, 256)  # landscape


@pytest.mark.parametrize(
    "height, width, resolution, expected",
    [
        (1024, 1024, 256, (256, 256)),
        (100, 50, 256, (96, 48)),  # already small: nearest multiples, never upscaled
        (250, 250, 256, (240, 240)),  # nearest would be 256 > 250: round down instead
        (600, 800, 512, (384, 512)),
        (1000, 1500, 512, (336, 512)),  # 341.3 -> nearest 336
        (1000, 1300, 512, (400, 512)),  # 393.8 -> nearest 400
        (4000, 40, 256, None),  # 2.56 px rounds to 0: rejected, never stretched
        (1, 1, 256, None),
        (24, 17, 256, (16, 16)),
        (15, 300, 256, None),
    ],
)
def test_bucket_size_cases(height, width, resolution, expected):
    assert bucket_size(height, width, resolution) == expected


def test_bucket_size_properties_over_many_sizes():
    rng = random.Random(0)
    for _ in range(5000):
        height, width, resolution = rng.randint(1, 6000), rng.randint(1, 6000), rng.choice([256, 512, 1024])
        bucket = bucket_size(height, width, resolution)
        scale = min(1.0, resolution / max(height, width))
        if bucket is None:
            assert min(height, width) * scale < 8 + 1e-9  # only when a side would round to 0
            continue
        for side, original in zip(bucket, (height, width)):
            assert side % 16 == 0 and 0 < side <= min(resolution, original)
            assert abs(side - original * scale) < 16


def _decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_every_bad_image_through_bucket_shard():
    table = canonical_table({name: data for name, (data, _type, _outcome) in BAD_IMAGES.items()})
    result = bucket_shard(table, 256, BucketConfig())
    outcomes = {key: "kept" for key in result.kept["key"].to_pylist()}
    outcomes.update(zip(result.rejects["key"].to_pylist(), result.rejects["reason"].to_pylist()))
    assert outcomes == BUCKET_OUTCOMES
    assert result.kept.num_rows + result.rejects.num_rows == table.num_rows
    assert set(result.rejects["stage"].to_pylist()) == {"bucket_256"}
    assert result.kept.schema == CANONICAL

    originals = {row["key"]: row for row in table.to_pylist()}
    for row in result.kept.to_pylist():
        img = _decoded(row["image"])
        assert img.format == "PNG" and img.mode == "RGB", row["key"]
        assert (img.width, img.height) == (row["width"], row["height"]), row["key"]
        assert row["width"] % 16 == 0 and row["height"] % 16 == 0
        assert max(row["width"], row["height"]) <= 256
        original = originals[row["key"]]
        for name in ("original_width", "original_height", "sha256", "caption", "url"):
            assert row[name] == original[name], (row["key"], name)  # the hash of the downloaded bytes stays


def test_one_pixel_image_is_never_upscaled_into_a_bucket():
    table = canonical_table({"dot": BAD_IMAGES["one_pixel_png"][0]})
    assert bucket_shard(table, 256, BucketConfig()).rejects["reason"].to_pylist() == ["too_small_for_bucket"]


def _kept_image(name: str, resolution: int = 256, **cfg) -> Image.Image:
    table = canonical_table({name: BAD_IMAGES[name][0]})
    result = bucket_shard(table, resolution, BucketConfig(**cfg))
    assert result.rejects.num_rows == 0, result.rejects.to_pylist()
    return _decoded(result.kept["image"][0].as_py())


@pytest.mark.parametrize("name", ["exif_rotated_jpeg", "exif_rotated_tiff", "cmyk_jpeg", "webp", "animated_gif",
                                  "rgba_png"])
def test_stored_upright_portrait_with_the_marker_top_left(name):
    img = _kept_image(name)
    assert (img.height, img.width) == (UPRIGHT_HEIGHT, UPRIGHT_WIDTH)  # 144 x 96 is already a bucket
    top_left = np.asarray(img)[4:20, 4:16].reshape(-1, 3).mean(0)
    assert np.abs(top_left - MARKER).max() < 40, (name, top_left)
    bottom_right = np.asarray(img)[-20:-4, -16:-4].reshape(-1, 3).mean(0)
    assert np.abs(bottom_right - MARKER).max() > 100, (name, bottom_right)


def test_alpha_is_composited_on_white_and_16_bit_is_rescaled():
    rgba = np.asarray(_kept_image("rgba_png"))
    assert (rgba[UPRIGHT_HEIGHT // 2 + 2 :] == 255).all()  # the transparent half
    grey = np.asarray(_kept_image("grey16_png"))
    assert (grey[..., 0] == grey[..., 1]).all() and grey.std() > 30  # a ramp, not clipped to white
    palette = np.asarray(_kept_image("palette_transparent_png"))
    assert palette.shape == (UPRIGHT_HEIGHT, UPRIGHT_WIDTH, 3)


def test_animated_gif_keeps_the_first_frame():
    img = np.asarray(_kept_image("animated_gif"))
    assert not (np.abs(img.astype(int) - (0, 0, 255)).max(-1) < 30).all()  # not the blue second frame


@pytest.mark.parametrize("fmt, pil_format", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(fmt, pil_format):
    img = _kept_image("exif_rotated_jpeg", resolution=64, format=fmt, quality=90)
    assert img.format == pil_format and img.mode == "RGB" and img.size == (48, 64)  # 96x144 scaled by 64/144


def test_encode_image_rejects_an_unknown_format():
    with pytest.raises(ValueError, match="gif"):
        encode_image(Image.new("RGB", (16, 16)), "gif", 90)


def _photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(30):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.rectangle([x, y, x + int(rng.integers(10, 200)), y + int(rng.integers(10, 200))], outline=(255, 255, 255), width=3)
        draw.text((x, y), "bucket", fill=(0, 0, 0))
    return img.filter(ImageFilter.GaussianBlur(0.7))


def test_fast_path_matches_a_full_resolution_lanczos_resize():
    photo = _photo_like(1600, 1200)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=92)
    data = buffer.getvalue()
    result = bucket_shard(canonical_table({"photo": data}), 256, BucketConfig(format="png"))
    ours = np.asarray(_decoded(result.kept["image"][0].as_py()), dtype=np.float64)
    assert ours.shape == (192, 256, 3)
    reference = np.asarray(_decoded(data).resize((256, 192), Image.Resampling.LANCZOS), dtype=np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((ours - reference) ** 2))
    assert psnr >= 35, psnr


def test_a_mode_pillow_cannot_convert_is_a_rejection_not_a_crash():
    with pytest.raises(ImageRejected) as raised:
        to_rgb(Image.new("La", (16, 16)))  # premultiplied alpha: Pillow has no La -> RGB path
    assert raised.value.reason == "undecodable" and "La" in raised.value.detail


def _shard_of(image_bytes: int, rows: int):
    rng = np.random.default_rng(0)
    return conform(pa.table({"key": [f"k{i}" for i in range(rows)], "image": [rng.bytes(image_bytes) for _ in range(rows)],
                             "height": pa.array([256] * rows, pa.int32()), "width": pa.array([256] * rows, pa.int32()),
                             "recaption": ["a long detailed caption of the picture " * 5] * rows}), CANONICAL)


@pytest.mark.parametrize("image_kib, expected_rows", [(2, 128), (256, 32), (3000, 4)])
def test_bucketed_shards_hold_about_row_group_bytes_of_images_a_row_group(tmp_path, image_kib, expected_rows):
    """Rows a group follow the images' size within the bounds; only the images and the index build's columns
    skip zstd; only the bucket sizes keep statistics. The rows themselves come back unchanged."""
    table = _shard_of(image_kib * 1024, 40)
    assert row_group_rows(table) == expected_rows == min(max(round(ROW_GROUP_BYTES / (image_kib * 1024)), 4), 128)
    path = write_bucketed(table, tmp_path / "00000.parquet")
    meta = pq.ParquetFile(path).metadata
    assert meta.row_group(0).num_rows == min(expected_rows, 40)
    columns = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i) for i in range(meta.num_columns)}
    assert sorted(name for name, chunk in columns.items() if chunk.compression == "UNCOMPRESSED") == sorted(
        ["image", *INDEX_COLUMNS])
    assert columns["recaption"].compression == "ZSTD"
    assert [name for name, chunk in columns.items() if chunk.is_stats_set] == ["width", "height"]
    assert read_parquet(path).equals(table.take(bucket_order(table)))


def test_bucketed_shards_are_sorted_by_bucket_and_spread_within_it(tmp_path):
    """Each bucket's rows are one run (so a row group holds one bucket), in an order that is not the
    source's but is the same on every write; no row is lost or changed."""
    buckets = [(256, 192), (192, 256), (256, 256)]
    table = _shard_of(2048, 300)
    for side, name in enumerate(("height", "width")):
        values = pa.array([buckets[i % 3][side] for i in range(300)], pa.int32())
        table = table.set_column(table.schema.get_field_index(name), name, values)
    stored = read_parquet(write_bucketed(table, tmp_path / "00000.parquet"))
    sizes = list(zip(stored["height"].to_pylist(), stored["width"].to_pylist()))
    assert sizes == sorted(sizes)
    assert sorted(stored.to_pylist(), key=lambda r: r["key"]) == sorted(table.to_pylist(), key=lambda r: r["key"])
    first_bucket = [k for k, size in zip(stored["key"].to_pylist(), sizes) if size == (192, 256)]
    assert first_bucket != sorted(first_bucket, key=lambda k: int(k[1:]))  # not the source order
    assert read_parquet(write_bucketed(table, tmp_path / "again.parquet")).equals(stored)


def test_a_16_bit_grey_png_keeps_its_transparent_value_and_a_float_tiff_its_brightness():
    raw = np.full((8, 8), 40000, np.uint16)
    raw[:4] = 1000  # the tRNS value: the top half is see-through
    buffer = io.BytesIO()
    Image.fromarray(raw).save(buffer, "PNG", transparency=1000)
    rgb = np.asarray(to_rgb(Image.open(io.BytesIO(buffer.getvalue()))))
    assert (rgb[:4] == 255).all() and (rgb[4:] == 40000 >> 8).all()  # on white; the rest keeps its grey

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(buffer, "TIFF")
    assert (np.asarray(to_rgb(Image.open(io.BytesIO(buffer.getvalue())))) == 128).all()
