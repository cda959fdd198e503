"""Download a URL shard with img2dataset and map its per-sample status onto kept rows and rejects.

img2dataset records every sample it was given, successes and failures alike (status + error_message),
in its output parquet; we join those records back to our keys, so every input row is accounted for.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from etl.accounting import check_accounting
from etl.config import DownloadConfig
from etl.schema import CANONICAL, OPTIONAL_FLOAT_COLUMNS, URLS, StepResult, conform, empty_rejects, make_rejects
from etl.storage import read_parquet

STAGE = "download"
KEY_COLUMN = "sample_key"  # img2dataset reserves "key" for its own numbering; ours travels under this name

# img2dataset's error_message is urllib's exception text (or its decoder's); first match wins.
_REASONS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"HTTP Error (\d{3})"), r"http_\1"),
    (re.compile(r"timed out|timeout", re.I), "timeout"),
    (re.compile(r"unknown url type|no host given|control characters|invalid url", re.I), "invalid_url"),
    (re.compile(r"X-Robots-Tag"), "robots_disallowed"),
    (re.compile(r"SSL|CERTIFICATE", re.I), "ssl_error"),
    (re.compile(r"decod|cannot identify image", re.I), "decode_error"),
    (re.compile(r"^no image"), "missing_image"),  # our own message for a webdataset sample without an image
    (
        re.compile(r"urlopen error|connection|remote end closed|IncompleteRead|Name or service|getaddrinfo", re.I),
        "connection_error",
    ),
]


# Outcomes that say nothing about the URL, only about the network or the host at that moment.
TRANSIENT_REASONS = frozenset({"timeout", "connection_error", "http_429", "http_502", "http_503", "http_504"})
# What a shard downloaded again fetches anew: those, and the samples img2dataset lost.
RETRIED_REASONS = TRANSIENT_REASONS | {"not_recorded"}
# A pass killed a moment ago holds its lock until its last thread has exited, and a big address space takes
# a while to tear down (seconds on a loaded machine): a lock held for longer belongs to a live pass.
EXITING_PASS_S = 10.0


def reason_for(message: str | None) -> str:
    """A short machine-readable reason for one of img2dataset's error messages."""
    for pattern, reason in _REASONS:
        match = pattern.search(message or "")
        if match:
            return match.expand(reason)
    return "other"


def is_fetchable(url: str | None) -> bool:
    if not url:
        return False
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def identify_image(data: bytes | None) -> tuple[int, int] | tuple[str, str]:
    """(width, height) from the image header, or (reason, detail) when the bytes are not an image.

    Header-level only: the filter stage decodes fully and rejects truncated pixel data.
    """
    if not data:
        return "empty_body", "zero bytes of image data"
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Image.DecompressionBombError as err:
        return "decompression_bomb", str(err)
    except UnidentifiedImageError:
        return "decode_error", f"not an image format Pillow knows; the body starts with {data[:24]!r}"
    except Exception as err:  # Pillow's format plugins raise many exception types on malformed headers
        return "decode_error", f"{type(err).__name__}: {err}"


# Run by path with -P: the script's folder (etl/, whose module names are generic) stays off sys.path.
_IMG2DATASET_CHILD = Path(__file__).with_name("img2dataset_child.py")


def run_img2dataset(arguments: dict, pass_fds: tuple[int, ...] = ()) -> None:
    """Run ``img2dataset.download`` in a fresh interpreter; ``pass_fds`` stay open in it as long as it runs.

    img2dataset installs a SIGINT handler (only allowed on the main thread), starts a logger process
    and a spawn pool; a child interpreter keeps all of that out of the caller (tests, Dagster steps)
    and lets it be called any number of times. It runs in its own process group so that an interrupted
    caller can stop it together with the worker processes it started, and the group stops itself once
    its caller is gone. (PR_SET_PDEATHSIG would need a preexec_fn, unsafe in a caller with threads, and
    would stop the interpreter without its workers.)
    """
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    with subprocess.Popen(
        [sys.executable, "-P", str(_IMG2DATASET_CHILD), str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
        pass_fds=pass_fds,
    ) as process:
        try:
            log, _ = process.communicate(json.dumps(arguments))
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    if process.returncode != 0:
        raise RuntimeError(f"img2dataset failed (exit code {process.returncode}):\n{log[-4000:]}")


def _img2dataset_arguments(url_list: Path, output: Path, rows: int, cfg: DownloadConfig) -> dict:
    processes = max(1, min(cfg.processes, rows))
    original = cfg.encode_format == "original"
    return {
        "url_list": str(url_list),
        "output_folder": str(output),
        "input_format": "parquet",
        "output_format": "parquet",
        "url_col": "url",
        "caption_col": None,
        "save_additional_columns": [KEY_COLUMN],
        "processes_count": processes,
        "thread_count": cfg.threads,
        "number_sample_per_shard": math.ceil(rows / processes),
        "timeout": cfg.timeout,
        "retries": cfg.retries,
        "resize_mode": "no",
        "encode_format": "jpg" if original else cfg.encode_format,
        "disable_all_reencoding": original,
        "extract_exif": False,
        "compute_hash": "sha256",
        # The output folder is always fresh, so "extend" (start at shard 0, skip nothing) means no incremental
        # mode; "overwrite" would delete the _tmp folder img2dataset has just made inside it, and then hang.
        "incremental_mode": "extend",
        "enable_wandb": False,
        "user_agent_token": cfg.user_agent_token,
        "disallowed_header_directives": list(cfg.disallowed_header_directives),
    }


def _read_records(output: Path) -> pa.Table:
    files = sorted(output.glob("*.parquet"))
    if not files:
        return pa.table({KEY_COLUMN: pa.array([], pa.string())})
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def resize_reason(message: str | None) -> str:
    """A reason for img2dataset's "failed_to_resize" status: its size limits, else OpenCV failed to decode."""
    message = message or ""
    if "buf.empty()" in message:
        return "empty_body"
    return {
        "image too small": "too_small",
        "image area too large": "too_large",
        "aspect ratio too large": "aspect_ratio",
    }.get(message, "decode_error")


def sample_outcome(record: dict, image_column: str) -> tuple:
    """One img2dataset record -> ("kept", image, width, height, original_width, original_height, sha256)
    or ("rejected", reason, detail)."""
    status, message = record.get("status"), record.get("error_message")
    if status == "failed_to_resize":
        return "rejected", resize_reason(message), message
    if status != "success":
        return "rejected", reason_for(message), message
    image = record.get(image_column)
    identified = identify_image(image)
    if isinstance(identified[0], str):
        return ("rejected", *identified)
    width, height = identified
    # img2dataset leaves the original size empty when it does not decode (disable_all_reencoding)
    original_width = record.get("original_width") or width
    original_height = record.get("original_height") or height
    # img2dataset hashes the bytes as downloaded, before any re-encoding
    sha256 = record.get("sha256") or hashlib.sha256(image).hexdigest()
    return "kept", image, width, height, original_width, original_height, sha256


def _lock_exclusively(lock, within_s: float) -> bool:
    """Whether ``lock`` could be taken exclusively within ``within_s`` seconds: False when another pass
    holds it all that time, or the filesystem has no flock."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        except OSError:
            return False


@contextlib.contextmanager
def _scratch_folder(work_dir: Path) -> Iterator[tuple[Path, int]]:
    """A fresh folder in ``work_dir`` for one img2dataset pass, removed after it, and the fd of the lock
    that says the pass is live. The folders that passes killed outright left go first, unless another
    pass over this shard (another run) is live: its folder looks the same, and img2dataset hangs when its
    folder goes from under it."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / "lock", "w") as lock:  # opened for writing: NFS locks it exclusively only then
        if _lock_exclusively(lock, within_s=EXITING_PASS_S):
            for stale in work_dir.glob("img2dataset-*"):
                shutil.rmtree(stale, ignore_errors=True)
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_SH)
        scratch = Path(tempfile.mkdtemp(prefix="img2dataset-", dir=work_dir))
        try:
            yield scratch, lock.fileno()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _fetch(urls: pa.Table, rows: list[int], work_dir: Path, cfg: DownloadConfig) -> dict[int, tuple]:
    """One img2dataset pass over the given rows of ``urls``: {row: sample_outcome(...)} for each of them."""
    with _scratch_folder(work_dir) as (scratch, lock):
        url_list = scratch / "urls.parquet"
        to_send = urls.take(rows)
        pq.write_table(pa.table({KEY_COLUMN: to_send["key"], "url": to_send["url"]}), url_list)
        output = scratch / "output"
        # img2dataset holds the lock too: a caller killed outright frees it, and its img2dataset stops a moment later
        run_img2dataset(_img2dataset_arguments(url_list, output, len(rows), cfg), pass_fds=(lock,))
        # img2dataset names the image column after its encode_format (with no re-encoding: "jpg", original bytes)
        image_column = "jpg" if cfg.encode_format == "original" else cfg.encode_format
        row_of_key = dict(zip(to_send["key"].to_pylist(), rows))
        outcomes: dict[int, tuple] = {}
        for record in _read_records(output).to_pylist():
            row = row_of_key.get(record[KEY_COLUMN])
            if row is None or row in outcomes:
                raise RuntimeError(f"img2dataset returned an unexpected or repeated key {record[KEY_COLUMN]!r}")
            outcomes[row] = sample_outcome(record, image_column)
    for row in rows:
        outcomes.setdefault(row, ("rejected", "not_recorded", "img2dataset wrote no record for this sample (see its log)"))
    return outcomes


def settled_outcomes(urls: pa.Table, previous: StepResult) -> dict[int, tuple]:
    """{row of ``urls``: its outcome} for the rows that ``previous``, an earlier download of this shard with
    the same settings, settled for good at the same key and URL: downloaded, or rejected for a reason that
    another try would not change. The others (transient failures, new rows, changed URLs) are to fetch."""
    pairs = zip(urls["key"].to_pylist(), urls["url"].to_pylist())
    row_of = {(key, url): row for row, (key, url) in enumerate(pairs) if is_fetchable(url)}
    settled: dict[int, tuple] = {}
    image = ["image", "width", "height", "original_width", "original_height", "sha256"]  # a kept outcome's order
    for record in previous.kept.select(["key", "url", *image]).to_pylist():
        row = row_of.get((record["key"], record["url"]))
        if row is not None:
            settled[row] = ("kept", *(record[name] for name in image))
    rejects = previous.rejects
    for key, url, reason, detail in zip(*(rejects[name].to_pylist() for name in ("key", "url", "reason", "detail"))):
        row = row_of.get((key, url))
        if row is not None and reason not in RETRIED_REASONS:
            settled[row] = ("rejected", reason, detail)
    return settled


def download_shard(urls: pa.Table, work_dir: Path, cfg: DownloadConfig,
                   settled: dict[int, tuple] | None = None) -> StepResult:
    """Download ``urls`` (etl.schema.URLS rows) with img2dataset; returns CANONICAL kept rows + rejects.

    After the first pass, the rows that failed for a transient reason are tried again, up to
    ``cfg.transient_passes`` more passes; their rejects say how many passes they had. The rows in
    ``settled`` (``settled_outcomes`` of an earlier download) are not fetched: their outcome stands.
    """
    for name in ("key", "url"):
        if name not in urls.column_names:
            raise ValueError(f"download_shard: the URL table has no '{name}' column (it has {urls.column_names})")
    keys = urls["key"].to_pylist()
    if len(set(keys)) != len(keys) or None in keys:
        raise ValueError("download_shard: keys must be unique and not null")
    url_values = urls["url"].to_pylist()
    fetchable = [i for i, url in enumerate(url_values) if is_fetchable(url)]
    settled = settled or {}
    to_fetch = [i for i in fetchable if i not in settled]

    kept_rows: list[tuple] = []  # (input row, image, width, height, original_width, original_height, sha256)
    reject_rows: list[tuple[int, str, str]] = [  # (input row, reason, detail)
        (i, "invalid_url", f"not an http(s) URL: {url_values[i]!r}")
        for i in sorted(set(range(len(keys))) - set(fetchable))
    ]
    outcomes = {i: settled[i] for i in fetchable if i in settled}
    if to_fetch:
        fetched = _fetch(urls, to_fetch, Path(work_dir), cfg)
        for attempt in range(2, cfg.transient_passes + 2):
            again = [row for row, (status, *rest) in fetched.items() if status == "rejected" and rest[0] in TRANSIENT_REASONS]
            if not again:
                break
            for row, outcome in _fetch(urls, again, Path(work_dir), cfg).items():
                if outcome[0] == "rejected":
                    outcome = (*outcome[:2], f"{outcome[2] or outcome[1]} (pass {attempt} of {cfg.transient_passes + 1})")
                fetched[row] = outcome
        outcomes.update(fetched)
    for row, outcome in outcomes.items():
        (kept_rows if outcome[0] == "kept" else reject_rows).append((row, *outcome[1:]))

    result = StepResult(kept=_kept_table(urls, kept_rows), rejects=_rejects_table(urls, reject_rows))
    check_accounting(keys, result, "download")
    return result


def _kept_table(urls: pa.Table, kept_rows: list) -> pa.Table:
    if not kept_rows:
        return conform(urls.slice(0, 0), CANONICAL)
    kept_rows = sorted(kept_rows, key=lambda r: r[0])
    rows, images, widths, heights, original_widths, original_heights, hashes = zip(*kept_rows)
    table = urls.take(list(rows))
    for name, values, type_ in [
        ("image", images, pa.binary()),
        ("width", widths, pa.int32()),
        ("height", heights, pa.int32()),
        ("original_width", original_widths, pa.int32()),
        ("original_height", original_heights, pa.int32()),
        ("sha256", hashes, pa.string()),
    ]:
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(pa.field(name, type_), pa.array(values, type_))
    return conform(table, CANONICAL)


def _rejects_table(urls: pa.Table, reject_rows: list) -> pa.Table:
    if not reject_rows:
        return empty_rejects()
    reject_rows = sorted(reject_rows, key=lambda r: r[0])
    rows = [r[0] for r in reject_rows]
    taken = urls.take(rows)
    reasons, details = [r[1] for r in reject_rows], [r[2] for r in reject_rows]
    return make_rejects(taken["key"].to_pylist(), taken["url"].to_pylist(), STAGE, reasons, details)


# --- already-downloaded img2dataset / webdataset output ---------------------------------------

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# webdataset's sample convention (as webdataset.tariterators.base_plus_ext): the key is the path up to
# the first dot of the file name, the rest is the field ("000001.jpg", "dir/000001.json").
_TAR_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _image_field(sample: dict) -> str | None:
    return next((ext for ext in IMAGE_EXTENSIONS if sample.get(ext) is not None), None)


def img2dataset_shards(folder: Path) -> list[Path]:
    """The shard files of an img2dataset output folder: its webdataset tars (img2dataset's status parquet
    beside each, or plain tars from elsewhere), and its parquet shards."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"img2dataset output folder not found: {folder}")
    tars = sorted(folder.glob("*.tar"))
    parquets = [p for p in sorted(folder.glob("*.parquet")) if p.with_suffix(".tar") not in tars]
    if not tars and not parquets:
        raise ValueError(f"no img2dataset output (*.parquet or *.tar shards) in {folder}")
    return sorted(tars + parquets)


def img2dataset_stamp(shard: Path) -> str:
    """Size and mtime of a shard file (and of its status parquet): what says it was rewritten, without
    reading its gigabytes."""
    files = [shard, shard.with_suffix(".parquet")] if shard.suffix == ".tar" else [shard]
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files if p.exists())


def _read_tar(path: Path, images: bool) -> dict[str, dict[str, bytes | None]]:
    """{sample key: {field: bytes}}; without ``images`` an image field is there with None for its bytes."""
    samples: dict[str, dict[str, bytes | None]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                match = _TAR_MEMBER.match(member.name)
                if not (member.isfile() and match):
                    continue
                field = match.group(2).lower()
                sample = samples.setdefault(match.group(1), {})
                sample[field] = tar.extractfile(member).read() if images or field not in IMAGE_EXTENSIONS else None
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(f"cannot read webdataset tar {path}: {err}") from err
    return samples


def _records_from_tar(tar_path: Path, images: bool) -> list[dict]:
    """img2dataset writes every sample's status to a parquet beside the tar; tars from elsewhere carry only
    successes, with their metadata in each sample's json."""
    status_file = tar_path.with_suffix(".parquet")
    if status_file.exists():
        records = read_parquet(status_file).to_pylist()
        if not images:  # the status file is the whole list of samples
            return records
        samples = _read_tar(tar_path, images)
        for record in records:
            sample = samples.get(record["key"], {})
            field = _image_field(sample)
            record["image"] = sample[field] if field else None
            if record.get("status") == "success" and field is None:
                record.update(status="failed_to_download", error_message=f"no image for this key in {tar_path.name}")
        return records
    records = []
    for key, sample in _read_tar(tar_path, images).items():
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
        field = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        # Such tars often number their samples from 0 each: the tar's name keeps keys apart across tars.
        record = {**meta, "key": f"{tar_path.stem}-{key}", "image": sample[field] if field else None}
        if record.get("caption") is None and "txt" in sample:
            record["caption"] = sample["txt"].decode("utf-8", errors="replace")
        record.setdefault("status", "success" if field else "failed_to_download")
        if field is None:
            record["error_message"] = record.get("error_message") or f"no image in the sample's files {sorted(sample)}"
        records.append(record)
    return records


def _records_from_parquet(path: Path, images: bool) -> list[dict]:
    if not images:
        names = [n for n in pq.read_schema(path).names if n not in IMAGE_EXTENSIONS]
        return read_parquet(path, columns=names).to_pylist()
    records = read_parquet(path).to_pylist()
    for record in records:
        field = _image_field(record)
        record["image"] = record[field] if field else None
    return records


def _img2dataset_records(shard: Path, images: bool) -> list[dict]:
    records = _records_from_tar(shard, images) if shard.suffix == ".tar" else _records_from_parquet(shard, images)
    if any(record.get("key") is None for record in records):
        raise ValueError(f"{shard}: a record has no 'key'; is this img2dataset output?")
    keys = [record["key"] for record in records]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{shard}: a sample key repeats")
    return records


def _text(value) -> str | None:
    return None if value is None else str(value)


def _number(value) -> float | None:
    """A score from a sample's json, which may hold it as a string, or hold something else: null then."""
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def _record_rows(records: list[dict], source: str) -> pa.Table:
    """The URL-list rows (etl.schema.URLS) of img2dataset records: keys ``<source>-<img2dataset key>``.
    Metadata from json files from elsewhere is coerced per value (a caption 42, a punsafe "0.1")."""
    return conform(pa.table({
        "key": pa.array([f"{source}-{record['key']}" for record in records], pa.string()),
        "url": pa.array([_text(record.get("url")) for record in records], pa.string()),
        "caption": pa.array([_text(record.get("caption")) for record in records], pa.string()),
        "source": pa.array([source] * len(records), pa.string()),
        **{name: pa.array([_number(record.get(name)) for record in records], pa.float64())
           for name in OPTIONAL_FLOAT_COLUMNS},
    }), URLS)


def img2dataset_url_rows(shard: Path, source: str) -> pa.Table:
    """The samples of one img2dataset shard file as URL-list rows, read without their images."""
    return _record_rows(_img2dataset_records(shard, images=False), source)


def import_img2dataset_shard(shard: Path, source: str) -> StepResult:
    """One img2dataset shard file (a webdataset tar, or a parquet shard) as the download stage's output:
    CANONICAL rows for its images, a reject with a reason for every other sample."""
    records = _img2dataset_records(shard, images=True)
    meta = _record_rows(records, source)
    kept_rows, reject_rows = [], []
    for row, record in enumerate(records):
        outcome = sample_outcome(record, "image")
        (kept_rows if outcome[0] == "kept" else reject_rows).append((row, *outcome[1:]))
    result = StepResult(kept=_kept_table(meta, kept_rows), rejects=_rejects_table(meta, reject_rows))
    check_accounting(meta["key"], result, "download")
    return result
