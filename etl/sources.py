"""URL lists in (LAION parquet, CC12M TSV) -> numbered URL shards out; already-downloaded img2dataset
output in -> one shard per img2dataset shard file.

Keys come from a row's position in its source list, so a longer list later only adds shards; an
img2dataset sample keeps its own key (``<source>-<img2dataset key>``).
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from etl.config import PipelineConfig, SourceConfig
from etl.download import img2dataset_shards, img2dataset_url_rows
from etl.schema import OPTIONAL_FLOAT_COLUMNS, URLS, conform
from etl.storage import CorruptShardError, read_parquet, write_parquet_atomic

log = logging.getLogger(__name__)


def _read_raw(source: SourceConfig) -> tuple[pa.Table, list[str]]:
    """The configured columns that the file has, and the names of all the columns it has."""
    path = Path(source.path)
    if not path.is_file():
        raise FileNotFoundError(f"source '{source.name}': URL list not found: {path}")
    try:
        if source.kind == "laion_parquet":
            # LAION metadata carries many columns we do not need: read only the configured ones.
            present = pq.read_schema(path).names
            wanted = [source.url_col, source.caption_col, *source.extra_cols]
            return pq.read_table(path, columns=[name for name in dict.fromkeys(wanted) if name in present]), present
        if path.stat().st_size == 0:
            return pa.table({}), []
        table = _read_tsv(path, source)
        return table, table.column_names
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as err:
        raise ValueError(f"source '{source.name}': cannot read {source.kind} file {path}: {err}") from err


def _headerless_columns(source: SourceConfig) -> list[str] | None:
    """The column names of a TSV without a header row: the configured ones, in order."""
    return None if source.header else list(dict.fromkeys([source.url_col, source.caption_col, *source.extra_cols]))


def _tsv_options(source: SourceConfig, malformed: list | None = None) -> dict:
    return {
        "read_options": pacsv.ReadOptions(column_names=_headerless_columns(source)),
        # CC12M captions hold quote characters freely: quoting would swallow tabs and newlines.
        "parse_options": pacsv.ParseOptions(
            delimiter="\t", quote_char=False,
            invalid_row_handler=None if malformed is None else lambda row: malformed.append(row) or "skip"),
        "convert_options": pacsv.ConvertOptions(
            column_types={source.url_col: pa.string(), source.caption_col: pa.string()}),
    }


def _one_line_break(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b" ")


class _LineBreaks(io.RawIOBase):
    r"""A file read with \r\n as \n and any other \r as a space. pyarrow's CSV reader also ends a line at a
    lone \r, which captions hold: a caption would be cut in two rows, and every later row's key shifted."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._out = b""  # translated, not yet read
        self._cr = False  # the last byte read was a \r, whose meaning waits on the next byte
        self.line_ends = 0  # \n and \r\n read so far, counted until the first
        self.lone_crs = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            data = self._raw.read(len(buffer))
            if not data:
                self.lone_crs += self._cr
                self._out, self._cr = b" " if self._cr else b"", False
                break
            data = b"\r" * self._cr + data
            self._cr = data.endswith(b"\r")
            data = data[:-1] if self._cr else data
            if not self.line_ends:  # all that _refuse_cr_line_ends asks is whether a file has any
                self.line_ends += data.count(b"\n")
                self.lone_crs += data.count(b"\r") - data.count(b"\r\n")
            self._out = _one_line_break(data)
        n = min(len(buffer), len(self._out))
        buffer[:n], self._out = self._out[:n], self._out[n:]
        return n


def _read_tsv(path: Path, source: SourceConfig) -> pa.Table:
    r"""The TSV as a table with a row for every non-empty line, in order, so that row keys stay put.

    Only \n and \r\n end a line; a lone \r is a space. A line with more tabs than columns has a tab inside
    its caption: the fields around the caption column keep their places and the surplus joins the caption,
    with spaces. A line with fewer gets empty fields. pyarrow's fast reader finds those lines; only a file
    holding any is read again, line by line, to repair them where they stand.
    """
    malformed: list = []
    # pyarrow opens a .gz or .bz2 list by its name, as its CSV reader does given a path.
    with pa.input_stream(str(path), compression="detect") as raw:
        lines = _LineBreaks(raw)
        try:
            table = pacsv.read_csv(io.BufferedReader(lines), **_tsv_options(source, malformed))
        finally:  # a header alone on its only line fails to parse: the line ends are what to report
            _refuse_cr_line_ends(lines, path, source)
    if not malformed:
        return table
    # Split at \n alone, as pyarrow's reader does once _one_line_break is done: not at str.splitlines' \u2028.
    with pa.input_stream(str(path), compression="detect") as raw:
        data = raw.read()
    lines = [line for line in _one_line_break(data).decode("utf-8-sig").split("\n") if line]
    names = lines[0].split("\t") if source.header else _headerless_columns(source)
    if source.caption_col not in names:
        return table  # read_url_list names the missing column
    caption, after = names.index(source.caption_col), len(names) - names.index(source.caption_col) - 1
    repaired = []
    for line in lines:
        fields = line.split("\t")
        if len(fields) > len(names):
            fields = [*fields[:caption], " ".join(fields[caption:len(fields) - after]), *fields[len(fields) - after:]]
        repaired.append("\t".join(fields + [""] * (len(names) - len(fields))))
    log.warning("source '%s': %d lines of %s do not have its %d columns; repaired (a tab too many joined into "
                "the caption, missing fields empty), e.g. %r", source.name, len(malformed), path, len(names),
                malformed[0].text[:200])
    return pacsv.read_csv(io.BytesIO("\n".join(repaired).encode("utf-8")), **_tsv_options(source))


def _refuse_cr_line_ends(lines: _LineBreaks, path: Path, source: SourceConfig) -> None:
    """A list whose lines all end in a lone \r (classic Mac OS) would be read as one row: refused instead."""
    if lines.line_ends == 0 and lines.lone_crs > 0:
        raise ValueError(f"source '{source.name}': {path} ends its lines with a lone \\r ({lines.lone_crs} of them, "
                         "and no \\n): only \\n and \\r\\n end a line here, as a lone \\r may sit inside a caption; "
                         "convert the file, e.g. `tr '\\r' '\\n' < list.tsv > list-lf.tsv`")


def _cast(raw: pa.Table, name: str, to: pa.DataType, source: SourceConfig, what: str) -> pa.ChunkedArray:
    try:
        return raw[name].cast(to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ValueError(f"source '{source.name}': column '{name}' in {source.path} is not {what}: {err}") from err


def read_url_list(source: SourceConfig) -> pa.Table:
    """Columns: url, caption, source, punsafe/pwatermark/similarity (float64, null unless listed), other extras."""
    raw, available = _read_raw(source)
    wanted = [source.url_col, source.caption_col, *source.extra_cols]
    missing = [name for name in wanted if name not in available]
    if missing and not available:  # a zero-byte TSV: an empty list, not a malformed one
        raw = pa.table({name: pa.array([], pa.string()) for name in wanted})
    elif missing:
        raise ValueError(
            f"source '{source.name}': column '{missing[0]}' not found in {source.path} "
            f"(it has: {', '.join(available)})"
        )
    columns = {
        "url": _cast(raw, source.url_col, pa.string(), source, "text"),
        "caption": _cast(raw, source.caption_col, pa.string(), source, "text"),
        "source": pa.array([source.name] * raw.num_rows, pa.string()),
    }
    for name in OPTIONAL_FLOAT_COLUMNS:
        if name in source.extra_cols:
            columns[name] = _cast(raw, name, pa.float64(), source, "numeric")
        else:
            columns[name] = pa.nulls(raw.num_rows, pa.float64())
    for name in source.extra_cols:
        if name not in columns:
            columns[name] = raw[name]
    return pa.table(columns)


def shard_url_list(table: pa.Table, source_name: str, shard_size: int) -> list[tuple[str, pa.Table]]:
    """Shard i holds rows [i*shard_size, (i+1)*shard_size) under key ``<source>-<i:05d>``."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    keys = pa.array([f"{source_name}-{row:09d}" for row in range(table.num_rows)], pa.string())
    keyed = conform(table.append_column("key", keys), URLS)
    return [
        (f"{source_name}-{i:05d}", keyed.slice(start, shard_size))
        for i, start in enumerate(range(0, keyed.num_rows, shard_size))
    ]


def _same_content(path: Path, table: pa.Table) -> bool:
    if not path.exists():
        return False
    try:
        return read_parquet(path).equals(table)
    except CorruptShardError:
        return False


def img2dataset_source_shards(source: SourceConfig) -> list[tuple[str, Path]]:
    """(shard key, shard file) of an already-downloaded source: one pipeline shard per img2dataset shard file,
    keyed ``<source>-<file stem>``, so its download stage imports that file instead of fetching URLs."""
    return [(f"{source.name}-{path.stem}", path) for path in img2dataset_shards(source.path)]


def imported_shards(config: PipelineConfig) -> dict[str, tuple[SourceConfig, Path]]:
    """{shard key: (its source, the img2dataset shard file it is imported from)}; the other shards' URLs
    are fetched."""
    return {key: (source, path) for source in config.all_sources() if source.kind == "img2dataset"
            for key, path in img2dataset_source_shards(source)}


def _check_unique(keys: list[str], what: str) -> None:
    counts = Counter(keys)
    repeated = sorted(key for key, n in counts.items() if n > 1)
    if repeated:
        raise ValueError(f"{what} {repeated[0]!r} is made {counts[repeated[0]]} times ({len(repeated)} keys repeat): "
                         "rename a source or a shard file so that no row is written over")


def _source_shards(source: SourceConfig, shard_size: int) -> list[tuple[str, pa.Table]]:
    if source.kind == "img2dataset":
        return [(key, img2dataset_url_rows(path, source.name)) for key, path in img2dataset_source_shards(source)]
    return shard_url_list(read_url_list(source), source.name, shard_size)


def write_url_shards(config: PipelineConfig) -> tuple[list[str], list[str]]:
    """Write ``<root>/urls/<shard_key>.parquet`` for every source; identical files are left untouched.

    Returns (the shard keys, the keys removed): a shard file no source produces any more (a shorter list,
    a source taken out, another ``shard_size``) is deleted, so that its rows leave the books and the index.
    What was made from it stays on disk, outside them. Every source is read before anything is written."""
    shards = []
    for source in config.all_sources():
        made = _source_shards(source, config.shard_size)
        if source.kind == "img2dataset":  # a URL list's keys are row numbers, unique by construction
            _check_unique([key for _, rows in made for key in rows["key"].to_pylist()], f"source {source.name!r}: row key")
        shards += made
    _check_unique([key for key, _ in shards], "shard key")  # source 'a-b' and source 'a''s file b-00000
    folder = Path(config.root) / "urls"
    for key, shard in shards:
        path = folder / f"{key}.parquet"
        if not _same_content(path, shard):
            write_parquet_atomic(shard, path)
    keys = [key for key, _ in shards]
    current = set(keys)
    removed = sorted(p.stem for p in folder.glob("*.parquet") if p.stem not in current)
    for key in removed:
        (folder / f"{key}.parquet").unlink()
    return keys, removed
