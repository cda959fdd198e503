"""The loader rank's data: the bucket index, a bucket sampler, and a Dataset that decodes whole batches.

Every batch comes from one (height, width) bucket, so images stack without padding or cropping. Each
epoch shuffles every bucket's rows, cuts them into full batches (the remainder of a bucket waits for the
next epoch's shuffle) and shuffles the batches of all buckets together: a bucket is drawn in proportion
to its size. Everything derives from (seed, epoch), so the position (epoch, batches used) is the state.
"""

from __future__ import annotations

import collections
import hashlib
import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset

from etl.layout import DataLayout
from etl.storage import VERIFY, read_parquet

INDEX_COLUMNS = ("shard", "row", "key", "height", "width")
SHARD_COLUMNS = ["key", "image", "caption", "recaption", "recaption_short"]
# Open shards per DataLoader worker: a footer is about 1 KB per row group (some 100 KB-2.5 MB per 10k-row
# shard), so an unbounded cache would grow with the dataset in every worker of every loader. Reopening
# costs a footer parse, ~7 us per row group.
OPEN_SHARDS = 128
_WHITESPACE = re.compile(r"\s+")
SHUFFLES = ("rows", "row_groups")
# What fixes an epoch's order of batches (with the index itself, named by data_version).
_ORDER_KEYS = ("seed", "shuffle", "batch_size", "data_version")


class DataError(ValueError):
    pass


def open_index(root: str | Path, resolution: int) -> pa.Table:
    """``<root>/index/<resolution>.parquet``, with errors that say what is missing and what exists."""
    layout = DataLayout(Path(root))
    if not layout.root.is_dir():
        raise DataError(f"data.root {layout.root} does not exist: build it with the data pipeline "
                        "(sd3 data run --config <pipeline.yaml>; `make demo` builds the demo's)")
    path = layout.index(resolution)
    if not path.exists():
        built = sorted(int(p.stem) for p in (layout.root / "index").glob("*.parquet") if p.stem.isdigit())
        bucketed = (layout.root / "buckets" / str(resolution)).is_dir()
        hint = "its buckets exist, so materialize the bucket index" if bucketed else "add it to buckets.resolutions"
        raise DataError(
            f"no index for resolution {resolution} at {path} (indexed resolutions: {built or 'none'}); {hint}"
        )
    index = read_parquet(path)
    missing = [c for c in INDEX_COLUMNS if c not in index.column_names]
    if missing:
        raise DataError(f"index {path} lacks columns {missing}: rebuild it")
    if index.num_rows == 0:
        raise DataError(
            f"index {path} has no rows: every image of resolution {resolution} was rejected or none was downloaded"
        )
    return index


def shard_codes(column: pa.ChunkedArray) -> tuple[list[str], np.ndarray]:
    """(the shard names, each row's position among them): the index's dictionary-encoded shard column."""
    shards = column.combine_chunks()
    if not pa.types.is_dictionary(shards.type):
        shards = shards.dictionary_encode()
    return shards.dictionary.to_pylist(), shards.indices.to_numpy()


class EpochBatch(list):
    """A batch of index row numbers that knows its epoch (the caption choice depends on it)."""

    def __init__(self, rows, epoch: int):
        super().__init__(rows)
        self.epoch = epoch


class BucketSampler:
    """Infinite batches of index rows, one bucket per batch; ``num_replicas`` loaders split each epoch.

    ``shuffle="rows"`` permutes each bucket's rows; ``"row_groups"`` permutes the parquet row groups of each
    bucket and takes their rows in that order, so a batch holds a few whole groups and each group is read
    about once an epoch (up to twice: a batch boundary can cut a group), instead of once per image. The
    rows of a group then share a batch in every epoch; ``etl.buckets.bucket_order`` made each group a
    random pick of its shard's bucket.

    Iterating does not move the state: the caller calls ``advance()`` for each batch it actually used,
    so ``state_dict()`` never counts batches that were prefetched but not trained on.

    ``data_version`` names the index (``etl.index.dataset_version``): with the seed, the shuffle and the
    batch size it fixes the epoch's order of batches, which ``load_state_dict`` uses to continue a state
    saved by a different set of loaders.
    """

    def __init__(self, index: pa.Table, batch_size: int, seed: int, rank_offset: int = 0, num_replicas: int = 1,
                 shuffle: str = "rows", data_version: str = ""):
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        if not 0 <= rank_offset < num_replicas:
            raise DataError(f"rank_offset {rank_offset} must be in [0, num_replicas={num_replicas})")
        if shuffle not in SHUFFLES:
            raise DataError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")
        self.batch_size, self.seed, self.shuffle, self.data_version = batch_size, seed, shuffle, data_version
        self.rank_offset, self.num_replicas = rank_offset, num_replicas
        if index.num_rows == 0:
            raise DataError("no images to train on: the index is empty, or data.holdout_fraction holds every image out")
        heights = index["height"].to_numpy().astype(np.int64)
        widths = index["width"].to_numpy().astype(np.int64)
        buckets, inverse, counts = np.unique(heights << 32 | widths, return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable").astype(np.int32 if len(inverse) < 2**31 else np.int64)
        rows_of = np.split(order, np.cumsum(counts)[:-1])
        names = [f"{b >> 32}x{b & 0xFFFFFFFF}" for b in buckets.tolist()]
        self.dropped_buckets = {name: int(n) for name, n in zip(names, counts) if n < batch_size}
        kept = [rows for rows, n in zip(rows_of, counts) if n >= batch_size]
        if not kept:
            largest = max(zip(counts, names))
            raise DataError(
                f"batch of {batch_size} is larger than every bucket (largest: {largest[1]} with {largest[0]} rows): "
                f"lower train.batch_size or use more data"
            )
        # Per kept bucket: its rows, and where each of its row groups starts among them ("rows": one group).
        if shuffle == "row_groups":
            groups = _row_group_keys(index)
            self._buckets = [_by_row_group(groups, rows) for rows in kept]
        else:
            self._buckets = [(rows, np.zeros(1, np.int64)) for rows in kept]
        self.batches_per_epoch = sum(len(r) // batch_size for r in kept) // num_replicas
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{num_replicas} loaders cannot each get a batch of {batch_size} per epoch: too little data"
            )
        self.epoch, self.batches_used = 0, 0
        self._cached_epoch: tuple[int, np.ndarray] | None = None

    def _epoch_batches(self, epoch: int) -> np.ndarray:
        """(batches_per_epoch, batch_size) index rows of this replica for ``epoch``."""
        if self._cached_epoch is not None and self._cached_epoch[0] == epoch:
            return self._cached_epoch[1]
        rng = np.random.default_rng([self.seed, epoch])
        chunks = []
        for rows, group_starts in self._buckets:
            full = len(rows) // self.batch_size * self.batch_size
            if self.shuffle == "rows":
                chunks.append(rng.permutation(rows)[:full].reshape(-1, self.batch_size))
            else:
                taken = rows[_permute_runs(group_starts, len(rows), rng)][:full].reshape(-1, self.batch_size)
                # Within a batch, the groups are mixed: each model rank's part holds rows of several groups.
                chunks.append(rng.permuted(taken, axis=1))
        batches = np.concatenate(chunks)[rng.permutation(sum(len(c) for c in chunks))]
        mine = batches[self.rank_offset :: self.num_replicas][: self.batches_per_epoch]
        self._cached_epoch = (epoch, mine)
        return mine

    def __iter__(self):
        epoch, start = self.epoch, self.batches_used
        while True:
            for rows in self._epoch_batches(epoch)[start:]:
                yield EpochBatch(rows.tolist(), epoch)
            epoch, start = epoch + 1, 0

    def advance(self, batches: int = 1) -> None:
        """Count ``batches`` more as used (in iteration order)."""
        position = self.epoch * self.batches_per_epoch + self.batches_used + batches
        self.epoch, self.batches_used = divmod(position, self.batches_per_epoch)

    def state_dict(self) -> dict[str, int | str]:
        return {"epoch": self.epoch, "batches_used": self.batches_used, "batches_per_epoch": self.batches_per_epoch,
                "num_replicas": self.num_replicas, **dict(zip(_ORDER_KEYS, self._order()))}

    def load_state_dict(self, state: dict[str, int | str]) -> str | None:
        """Continue from a saved position: exactly when this sampler has the saved one's order and loader
        count, and returns None; otherwise re-planned as below, and returns a sentence saying how.

        - Another number of loaders, same order: the loaders took turns through one order of batches and each
          used as many, so the epoch continues after the batches used by all; each loader skips fewer than one
          turn of them.
        - Another order (batch size, seed, shuffle or data changed): the epoch is re-drawn in the new order and
          continues at the share of it already used, so within this epoch some images repeat and some are left
          out; later epochs are whole."""
        epoch, saved_used, saved_per_epoch = int(state["epoch"]), int(state["batches_used"]), int(state["batches_per_epoch"])
        used = saved_used
        saved_order = tuple(state.get(key) for key in _ORDER_KEYS)
        saved_replicas = state.get("num_replicas")
        note = None
        if saved_order != self._order():
            # Integer arithmetic: a float share times the batch count could round up past a whole batch.
            used = -(-used * self.batches_per_epoch // saved_per_epoch)
            changed = ", ".join(f"{key} {a} -> {b}" for key, a, b in zip(_ORDER_KEYS, saved_order, self._order()) if a != b)
            note = (f"{changed}: epoch {epoch} is re-drawn and continues at the share already used "
                    f"({saved_used} of {saved_per_epoch} batches per loader -> {used} of "
                    f"{self.batches_per_epoch}); within this epoch some images repeat and some are left out")
        elif saved_replicas != self.num_replicas:
            consumed = used * int(saved_replicas)
            used = -(-consumed // self.num_replicas)
            if used >= self.batches_per_epoch:  # the new loaders' share of the epoch is all used: the next one
                note = (f"{saved_replicas} loaders -> {self.num_replicas}: the {consumed} batches of epoch {epoch} "
                        f"already used cover this many loaders' share of it; epoch {epoch + 1} starts")
                used = self.batches_per_epoch
            else:
                note = (f"{saved_replicas} loaders -> {self.num_replicas}: epoch {epoch} continues after the {consumed} "
                        f"batches of its order already used ({used * self.num_replicas - consumed} skipped)")
        self.epoch, self.batches_used = epoch + used // self.batches_per_epoch, used % self.batches_per_epoch
        return note

    def _order(self) -> tuple:
        return self.seed, self.shuffle, self.batch_size, self.data_version


def _row_group_keys(index: pa.Table) -> np.ndarray:
    """One int64 per index row naming its (shard, row group)."""
    if "row_group" not in index.column_names:
        raise DataError("the index has no row_group column (it was built before the column existed): "
                        "rebuild it (materialize bucket_index) or use data.shuffle=rows")
    _, shards = shard_codes(index["shard"])
    return shards.astype(np.int64) << 32 | index["row_group"].to_numpy()


def _by_row_group(groups: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` ordered by their row group (``_row_group_keys``), and where each group starts among them."""
    key = groups[rows]
    ordered = np.argsort(key, kind="stable")
    key = key[ordered]
    return rows[ordered], np.flatnonzero(np.r_[True, key[1:] != key[:-1]])


def _permute_runs(starts: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Positions 0..total-1 with the runs beginning at ``starts`` put in a random order, each run kept whole."""
    lengths = np.diff(np.r_[starts, total])
    pick = rng.permutation(len(starts))
    lengths, first = lengths[pick], starts[pick]
    run_start = np.cumsum(lengths) - lengths
    return np.arange(total) - np.repeat(run_start - first, lengths)


def clean_caption(text: str) -> str:
    """Outer whitespace stripped and inner runs collapsed to one space; the text is otherwise kept as written."""
    return _WHITESPACE.sub(" ", text).strip()


def choose_detailed(seed: int, key: str, epoch: int, detailed_prob: float) -> bool:
    """Whether ``key`` trains on its detailed caption in ``epoch``: a hash, so any worker decides the same."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < detailed_prob


def pick_caption(row: dict, detailed: bool) -> str:
    """The chosen caption, else the other one, else the alt text: a row never trains on an empty caption
    when any of its texts is non-empty."""
    first, second = ("recaption", "recaption_short") if detailed else ("recaption_short", "recaption")
    for name in (first, second, "caption"):
        text = clean_caption(row.get(name) or "")
        if text:
            return text
    return ""


def decode_image(data: bytes, height: int, width: int, where: str) -> torch.Tensor:
    """(3, height, width) uint8 RGB of the image ``where`` names; a wrong size means the index and the shards
    disagree. The bucket step checked every image whole, so one that does not decode is a damaged shard."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # what PIL's decoders raise
        raise DataError(f"image {where} cannot be decoded ({err}): rebuild that bucketed partition and the index") from err
    if rgb.size != (width, height):
        raise DataError(
            f"image {where} is {rgb.width}x{rgb.height} (w x h) but the index says {width}x{height}: rebuild the index"
        )
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1]. Batches stay uint8 until they reach the encoders' device: the
    worker-to-loader handoff (shared memory) and the host-to-GPU copy move a quarter of the bytes, and the
    conversion runs there instead of in the decode workers."""
    return pixels.float().div(127.5).sub(1.0)


class BucketBatches(Dataset):
    """item: a list of index rows (one bucket) -> {"images": (B, 3, H, W) uint8, "captions", "keys"}.

    Shard files open lazily in each DataLoader worker; the OPEN_SHARDS last used stay open (each keeps its
    parsed footer). A shard is read one row group at a time: ``etl.buckets.write_bucketed`` keeps them small.
    """

    def __init__(self, root: str | Path, resolution: int, index: pa.Table, detailed_caption_prob: float, seed: int):
        self.layout = DataLayout(Path(root))
        self.resolution = resolution
        self.detailed_caption_prob, self.seed = detailed_caption_prob, seed
        # Columns stay Arrow/numpy buffers: a Python object per row would cost ~120 bytes a row (3 GiB at 25M
        # rows) in the loader and again in each forked worker, whose reference counting copies the pages.
        self._shard_names, self._shard = shard_codes(index["shard"])
        self._row = index["row"].to_numpy()
        self._key = index["key"].combine_chunks()
        self._height = index["height"].to_numpy()
        self._width = index["width"].to_numpy()
        self._files: collections.OrderedDict[str, tuple[pq.ParquetFile, np.ndarray]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._row)

    def _open(self, shard: str) -> tuple[pq.ParquetFile, np.ndarray]:
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        path = self.layout.root / "buckets" / str(self.resolution) / shard
        if not path.exists():
            raise DataError(f"shard {path} named by the index is missing: rebuild the index")
        try:
            file = pq.ParquetFile(path, **VERIFY)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"bucket shard {path} cannot be read ({err}): rebuild it (materialize its bucketed "
                            f"partition) and the index") from err
        starts = np.cumsum([0] + [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)])
        self._files[shard] = (file, starts)
        if len(self._files) > OPEN_SHARDS:
            self._files.popitem(last=False)[1][0].close()
        return self._files[shard]

    def _read_rows(self, shard: str, rows: list[int]) -> list[dict]:
        file, starts = self._open(shard)
        groups = np.searchsorted(starts, rows, side="right") - 1
        found = {}
        for group in np.unique(groups):
            wanted = [r for r, g in zip(rows, groups) if g == group]
            try:
                table = file.read_row_group(int(group), columns=SHARD_COLUMNS)
            except (pa.ArrowInvalid, OSError) as err:
                raise DataError(f"bucket shard {self.resolution}/{shard}: row group {group} cannot be read ({err}): "
                                f"rebuild it (materialize its bucketed partition) and the index") from err
            taken = table.take(pa.array([r - starts[group] for r in wanted], pa.int64())).to_pylist()
            found.update(zip(wanted, taken))
        return [found[r] for r in rows]

    def __getitem__(self, rows) -> dict:
        epoch = getattr(rows, "epoch", 0)  # a plain list of rows counts as epoch 0
        rows = [int(r) for r in rows]
        buckets = {(int(self._height[r]), int(self._width[r])) for r in rows}
        if len(buckets) != 1:
            raise DataError(f"a batch must come from one bucket, these rows span {sorted(buckets)}")
        by_shard: dict[int, list[int]] = {}
        for r in rows:
            by_shard.setdefault(int(self._shard[r]), []).append(r)
        records = {}
        for shard, index_rows in by_shard.items():
            read = self._read_rows(self._shard_names[shard], [int(self._row[r]) for r in index_rows])
            records.update(zip(index_rows, read))
        images, captions, keys = [], [], []
        for r in rows:
            record, key = records[r], self._key[r].as_py()
            if record["key"] != key:
                raise DataError(
                    f"index row {r} names key {key} but its shard row holds {record['key']}: rebuild the index"
                )
            where = f"{key} (bucket shard {self.resolution}/{self._shard_names[self._shard[r]]}, row {self._row[r]})"
            images.append(decode_image(record["image"], int(self._height[r]), int(self._width[r]), where))
            detailed = choose_detailed(self.seed, key, epoch, self.detailed_caption_prob)
            captions.append(pick_caption(record, detailed))
            keys.append(key)
        return {"images": torch.stack(images), "captions": captions, "keys": keys}
