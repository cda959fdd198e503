"""Recaption one shard: detailed caption, short caption, cleaning, failure detection, resumable chunks."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from PIL import Image

from etl.config import RecaptionConfig, to_mapping
from etl.recaption.backends import AltTextCaptioner, Captioner, get_captioner
from etl.recaption.postprocess import RULES_VERSION, Verdict, clean_alt_text, judge_detailed, judge_short, word_count
from etl.images import decode, open_image, to_rgb
from etl.recaption.resume import OUTCOMES, ResumeChunks, claimed, input_fingerprints
from etl.schema import StepResult, make_rejects

log = logging.getLogger(__name__)

STAGE = "recaption"
# Settings that change what a caption says; a change discards the chunks of an interrupted run.
_RUNTIME_ONLY = ("batch_size", "chunk_rows", "device", "vllm_gpu_memory_utilization")
# Failures that may say more about the backend at that moment (an OOM, an engine that died mid-chunk) than
# about the row: a later run captions such rows again instead of reusing the failure.
RETRIED_KINDS = frozenset({"backend_error"})
# In the detail of the rows of a batch that failed row by row as well: the backend more likely died than
# every row was odd, so their failing again is not excused (see _RowIsolation).
WHOLE_BATCH = "every row of its batch failed"


@dataclass
class RecaptionStats:
    """Per-shard figures for the asset's metadata (``as_metadata``)."""

    rows: int
    captioned: int
    resumed: int  # rows finished by an earlier, interrupted run and read back from work_dir
    # By kind: loop, too_few_words, empty, chatter, too_long, backend_error, undecodable, empty_caption.
    failures: dict[str, int]
    mean_words_detailed: float
    mean_words_short: float
    seconds: float
    rows_per_second: float  # rows finished by this run / seconds

    def as_metadata(self) -> dict:
        return {
            "rows_captioned": self.captioned,
            "rows_resumed": self.resumed,
            **{f"failed_{kind}": n for kind, n in sorted(self.failures.items())},
            "mean_words_recaption": round(self.mean_words_detailed, 2),
            "mean_words_recaption_short": round(self.mean_words_short, 2),
            "rows_per_second": round(self.rows_per_second, 3),
        }


@dataclass
class RecaptionResult(StepResult):
    stats: RecaptionStats


def _decode(data: bytes, max_side: int) -> Image.Image:
    """The image as the buckets will hold it (upright, alpha on white), its long side at most ``max_side``."""
    image = to_rgb(decode(open_image(data), at_least=(max_side, max_side)))  # JPEG: decoded at a reduced scale
    # VLM preprocessing of huge images starves the GPU; the long side is capped first.
    image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image


def _failed(key: str, kind: str, message: str, reason: str = "caption_failed") -> dict:
    return {"key": key, "recaption": None, "recaption_short": None, "reason": reason, "detail": f"{kind}: {message}"}


class _RowIsolation:
    """Runs a captioner call on a batch and, when the batch raises, on each of its rows alone: a row the
    model cannot take (a processor refusing an odd image, an OOM on one long prompt) then fails by itself,
    instead of failing the shard on every retry. While no row of the pass has worked, an error is the
    backend's (no GPU, a broken model, an engine that died), not a row's: it is raised, unless every row
    failing is one that failed alone in an earlier run too (``excused``), which says nothing of the backend.
    A row failed alone when another row of its batch worked (or its batch was that row): the rows of a
    batch that failed whole are marked WHOLE_BATCH and are never excused. One isolation serves one pass:
    the VLM having worked says nothing of the LLM."""

    def __init__(self, excused: frozenset[str]):
        self.excused = excused
        self.any_worked = False

    def __call__(self, keys: list[str], call: Callable[..., list[str]], *columns: list) -> list[str | Exception]:
        try:
            results = call(*columns)
            self.any_worked = True
            return results
        except Exception as err:  # noqa: BLE001 -- retried row by row below; raised if it is the backend's
            batch_error = err
        results = []
        for row in zip(*columns):
            try:
                results.append(call(*[[value] for value in row])[0])
                self.any_worked = True
            except Exception as err:  # noqa: BLE001 -- this row's failure, recorded as its rejection
                results.append(err)
        if not self.any_worked and not self.excused.issuperset(keys):
            raise batch_error
        if len(results) > 1 and all(isinstance(r, Exception) for r in results):
            results = [_WholeBatchFailed(f"{type(r).__name__}: {r} ({WHOLE_BATCH})") for r in results]
        log.warning("recaption: a batch of %d failed (%s: %s); %d of its rows failed alone", len(results),
                    type(batch_error).__name__, batch_error, sum(isinstance(r, Exception) for r in results))
        return results


class _WholeBatchFailed(Exception):
    """A row's failure in a batch whose every row failed; its message names the error."""


def _backend_error(err: Exception) -> Verdict:
    message = str(err) if isinstance(err, _WholeBatchFailed) else f"{type(err).__name__}: {err}"
    return Verdict(None, "backend_error", message)


def caption_rows(rows: list[dict], captioner: Captioner, cfg: RecaptionConfig,
                 excused: frozenset[str] = frozenset()) -> list[dict]:
    """Outcome rows (``OUTCOMES`` less the input fingerprint) for rows with key, caption and image, in order.

    ``excused``: the keys whose captioning failed alone on a backend error in an earlier run; their
    failing again is their own rejection, not the shard's failure.
    """
    outcomes: dict[str, dict] = {}
    alts = {row["key"]: clean_alt_text(row["caption"]) for row in rows}
    smoke = isinstance(captioner, AltTextCaptioner)

    images, keys = [], []
    for row in rows:
        if smoke:
            images.append(None)
            keys.append(row["key"])
            continue
        try:
            images.append(_decode(row["image"], cfg.max_image_side))
            keys.append(row["key"])
        except Exception as err:  # noqa: BLE001 -- any decoder error is this row's rejection, not the shard's
            outcomes[row["key"]] = _failed(row["key"], "undecodable", f"{type(err).__name__}: {err}")

    isolated = _RowIsolation(excused)
    detailed: dict[str, str] = {}
    for start in range(0, len(keys), cfg.batch_size):
        batch = keys[start : start + cfg.batch_size]
        raw = isolated(batch, captioner.detailed, images[start : start + cfg.batch_size], [alts[k] for k in batch])
        if smoke:
            # Smoke runs keep any alt text: only an empty one is unusable.
            verdicts = [Verdict(text) if text else Verdict(None, "empty", "no usable alt text") for text in raw]
        else:
            verdicts = _judged(raw, judge_detailed)
        for key, verdict in zip(batch, verdicts, strict=True):
            if verdict.caption is not None:
                detailed[key] = verdict.caption
            elif smoke:
                outcomes[key] = _failed(key, verdict.kind, verdict.message, reason="empty_caption")
            else:
                outcomes[key] = _failed(key, verdict.kind, f"{verdict.message} (detailed caption)")

    keys = list(detailed)
    isolated = _RowIsolation(excused)
    for start in range(0, len(keys), cfg.batch_size):
        batch = keys[start : start + cfg.batch_size]
        raw = isolated(batch, captioner.shorten, [detailed[k] for k in batch])
        verdicts = [Verdict(text) for text in raw] if smoke else _judged(raw, judge_short)
        for key, verdict in zip(batch, verdicts, strict=True):
            if verdict.caption is None:
                outcomes[key] = _failed(key, verdict.kind, f"{verdict.message} (short caption)")
            else:
                outcomes[key] = {
                    "key": key,
                    "recaption": detailed[key],
                    "recaption_short": verdict.caption,
                    "reason": None,
                    "detail": None,
                }
    return [outcomes[row["key"]] for row in rows]


def _judged(raw: list[str | Exception], judge: Callable[[list[str]], list[Verdict]]) -> list[Verdict]:
    verdicts = iter(judge([text for text in raw if not isinstance(text, Exception)]))
    return [_backend_error(text) if isinstance(text, Exception) else next(verdicts) for text in raw]


def _setup(cfg: RecaptionConfig) -> dict:
    return {**{k: v for k, v in to_mapping(cfg).items() if k not in _RUNTIME_ONLY}, "rules": RULES_VERSION}


def recaption_shard(
    table: pa.Table,
    cfg: RecaptionConfig,
    work_dir: Path,
    captioner: Captioner | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RecaptionResult:
    """Recaption a CANONICAL shard; finished rows are persisted in ``work_dir`` so a re-run resumes.

    ``progress(rows_finished, rows_total)`` is called after each chunk. ``work_dir`` is left with one
    chunk of every row finished: a later run over the same rows (a crash before the result was recorded,
    a changed filter upstream) captions only the rows it lacks.
    """
    missing = {"key", "url", "caption", "image"} - set(table.column_names)
    if missing:
        raise ValueError(f"recaption: input shard lacks columns {sorted(missing)}")
    keys = table["key"].to_pylist()
    if len(set(keys)) != len(keys):
        duplicated = next(k for k, n in Counter(keys).items() if n > 1)
        raise ValueError(f"recaption: duplicate key {duplicated!r} in the input shard")

    with claimed(Path(work_dir)):
        return _recaption_claimed(table, keys, cfg, Path(work_dir), captioner, progress)


def _recaption_claimed(table: pa.Table, keys: list[str], cfg: RecaptionConfig, work_dir: Path,
                       captioner: Captioner | None, progress: Callable[[int, int], None] | None) -> RecaptionResult:
    chunks = ResumeChunks(work_dir, _setup(cfg))
    fingerprints = dict(zip(keys, input_fingerprints(table), strict=True))
    earlier = chunks.finished()
    earlier_rows = list(zip(earlier["key"].to_pylist(), earlier["input"].to_pylist()))
    latest = [row for row in _current_outcomes(earlier, fingerprints).to_pylist() if row["key"] in fingerprints]
    retried = frozenset(row["key"] for row in latest if _failure_kind(row) in RETRIED_KINDS)
    excused = frozenset(row["key"] for row in latest if row["key"] in retried and WHOLE_BATCH not in row["detail"])
    done = {row["key"] for row in latest} - retried
    if retried:
        log.info("recaption: %d rows of %s failed on a backend error before; captioned again", len(retried), work_dir)
    changed = {key for key, fingerprint in earlier_rows if key in fingerprints and fingerprints[key] != fingerprint}
    if changed:
        # Keys are row positions in a source: a rebuilt source may give a key another image or alt text.
        log.warning("recaption: %d finished rows in %s hold another image or alt text now; captioned afresh",
                    len(changed - done), work_dir)

    todo = [i for i, key in enumerate(keys) if key not in done]
    started = time.perf_counter()
    if todo:
        captioner = captioner or get_captioner(cfg)
        for start in range(0, len(todo), cfg.chunk_rows):
            rows = table.select(["key", "caption", "image"]).take(todo[start : start + cfg.chunk_rows]).to_pylist()
            outcomes = [{**outcome, "input": fingerprints[outcome["key"]]}
                        for outcome in caption_rows(rows, captioner, cfg, excused)]
            chunks.append(pa.Table.from_pylist(outcomes, schema=OUTCOMES))
            if progress:
                progress(len(done) + min(start + cfg.chunk_rows, len(todo)), len(keys))
    seconds = time.perf_counter() - started

    outcomes = _current_outcomes(chunks.finished(), fingerprints)
    if len(chunks.paths()) > 1 or outcomes.num_rows < earlier.num_rows + len(todo):
        chunks.compact(outcomes)  # one file per shard, and the rows made for another image or alt text gone
    return _assemble(table, outcomes, fingerprints, resumed=len(done), seconds=seconds, ran=len(todo))


def _current_outcomes(finished: pa.Table, fingerprints: dict[str, str]) -> pa.Table:
    """One row per key: the last one made for the shard's image and alt text; a key the shard no longer has
    keeps its last row."""
    last: dict[str, int] = {}
    for row, (key, fingerprint) in enumerate(zip(finished["key"].to_pylist(), finished["input"].to_pylist())):
        if fingerprints.get(key, fingerprint) == fingerprint:
            last[key] = row
    return finished.take(pa.array(sorted(last.values()), pa.int64()))


def _failure_kind(outcome: dict) -> str | None:
    """A failed row's kind (``RecaptionStats.failures``); None for a captioned row."""
    if outcome["reason"] is None:
        return None
    return "empty_caption" if outcome["reason"] == "empty_caption" else outcome["detail"].split(":", 1)[0]


def _assemble(table: pa.Table, outcomes: pa.Table, fingerprints: dict[str, str], resumed: int, seconds: float,
              ran: int) -> RecaptionResult:
    by_key = {row["key"]: row for row in outcomes.to_pylist() if fingerprints.get(row["key"]) == row["input"]}
    rows = [by_key[key] for key in table["key"].to_pylist()]
    ok = [i for i, row in enumerate(rows) if row["reason"] is None]
    failed = [i for i, row in enumerate(rows) if row["reason"] is not None]

    kept = table.take(pa.array(ok, pa.int64()))
    for name in ("recaption", "recaption_short"):
        column = pa.array([rows[i][name] for i in ok], pa.string())
        if name in kept.column_names:
            kept = kept.set_column(kept.column_names.index(name), name, column)
        else:
            kept = kept.append_column(name, column)
    bad = [rows[i] for i in failed]
    rejects = make_rejects(
        [row["key"] for row in bad],
        table["url"].take(pa.array(failed, pa.int64())).to_pylist(),
        STAGE,
        [row["reason"] for row in bad],
        [row["detail"] for row in bad],
    )

    failures = Counter(_failure_kind(row) for row in bad)
    detailed_words = [word_count(rows[i]["recaption"]) for i in ok]
    short_words = [word_count(rows[i]["recaption_short"]) for i in ok]
    stats = RecaptionStats(
        rows=table.num_rows,
        captioned=len(ok),
        resumed=resumed,
        failures=dict(sorted(failures.items())),
        mean_words_detailed=sum(detailed_words) / len(ok) if ok else 0.0,
        mean_words_short=sum(short_words) / len(ok) if ok else 0.0,
        seconds=seconds,
        rows_per_second=ran / seconds if seconds > 0 else 0.0,
    )
    return RecaptionResult(kept=kept, rejects=rejects, stats=stats)
