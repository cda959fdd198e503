"""Resume: finished rows persist in chunks; a run killed with SIGKILL mid-shard loses and duplicates nothing."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pytest
from PIL import Image

from etl.config import RecaptionConfig, to_mapping
from etl.recaption import recaption_shard
from etl.recaption.resume import OUTCOMES, ResumeChunks, WorkDirBusy, claimed
from etl.schema import CANONICAL, conform
from etl.storage import read_parquet, write_parquet_atomic
from tests.etl.tiny_captioners import save_tiny_captioners

REPO = Path(__file__).resolve().parents[2]
ROWS = 24

# The child recaptions the shard and announces each finished chunk; the test kills it mid-shard.
CHILD = """
import json, sys
from pathlib import Path
from etl.config import RecaptionConfig, from_mapping
from etl.recaption import recaption_shard
from etl.storage import read_parquet
shard, cfg, work, marker = sys.argv[1:]
cfg = from_mapping(RecaptionConfig, json.loads(Path(cfg).read_text()))
recaption_shard(read_parquet(shard), cfg, Path(work), progress=lambda done, total: Path(marker).write_text(str(done)))
"""


def _shard(rows: int) -> pa.Table:
    blobs = []
    for i in range(rows):
        buffer = io.BytesIO()
        Image.new("RGB", (40 + 7 * i, 90 - 2 * i), (10 * i % 256, 80, 200)).save(buffer, "PNG")
        blobs.append(buffer.getvalue())
    keys = [f"demo-{i:09d}" for i in range(rows)]
    alts = ["a red dog near the sea", "", "blue bus on a bridge", "a cat on a bed with a book"]
    return conform(
        pa.table({"key": keys, "url": [f"http://127.0.0.1/{k}" for k in keys],
                  "caption": [alts[i % 4] for i in range(rows)], "image": blobs}),
        CANONICAL,
    )


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> RecaptionConfig:
    vlm, llm = save_tiny_captioners(tmp_path_factory.mktemp("models"))
    return RecaptionConfig(
        backend="transformers", vlm=str(vlm), llm=str(llm), batch_size=2, chunk_rows=2,
        max_new_tokens=24, short_max_new_tokens=12, device="cpu",
    )


def _outcome_rows(result) -> dict:
    kept = {r["key"]: (r["recaption"], r["recaption_short"]) for r in result.kept.to_pylist()}
    failed = {r["key"]: (r["reason"], r["detail"]) for r in result.rejects.to_pylist()}
    return kept | failed


def test_a_sigkilled_run_resumes_without_lost_or_duplicated_rows(cfg, tmp_path):
    table = _shard(ROWS)
    write_parquet_atomic(table, tmp_path / "shard.parquet")
    (tmp_path / "cfg.json").write_text(json.dumps(to_mapping(cfg)))
    work, marker = tmp_path / "work", tmp_path / "progress"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, (tmp_path / "shard.parquet", tmp_path / "cfg.json", work, marker))],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not (marker.exists() and int(marker.read_text() or 0) >= 4):
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the child finished no chunk in time"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stderr.close()

    persisted = pa.concat_tables([read_parquet(p) for p in sorted(work.glob("chunk-*.parquet"))])
    assert 4 <= persisted.num_rows < ROWS, "killed mid-shard, after some chunks"

    resumed = recaption_shard(table, cfg, work)
    keys = resumed.kept["key"].to_pylist() + resumed.rejects["key"].to_pylist()
    assert sorted(keys) == table["key"].to_pylist(), "every row exactly once"
    assert resumed.stats.resumed == persisted.num_rows
    outcomes = _outcome_rows(resumed)
    for row in persisted.to_pylist():
        captioned = row["reason"] is None
        expected = (row["recaption"], row["recaption_short"]) if captioned else (row["reason"], row["detail"])
        assert outcomes[row["key"]] == expected, "finished rows are read back, not recomputed"
    assert len(list(work.glob("chunk-*.parquet"))) == 1, "compacted once the shard is done"

    # Greedy decoding is deterministic: the interrupted shard equals an uninterrupted one.
    fresh = recaption_shard(table, cfg, tmp_path / "fresh")
    assert _outcome_rows(fresh) == outcomes
    assert fresh.kept.equals(resumed.kept)


def test_a_finished_work_dir_needs_no_model(tmp_path):
    table = _shard(6)
    cfg = RecaptionConfig(chunk_rows=4)
    first = recaption_shard(table, cfg, tmp_path / "work")
    # An object without captioning methods would fail if any row were captioned again.
    again = recaption_shard(table, cfg, tmp_path / "work", captioner=object())
    assert again.kept.equals(first.kept) and again.rejects.equals(first.rejects)
    assert again.stats.resumed == 6 and again.stats.captioned == first.stats.captioned


def test_a_done_shard_keeps_one_chunk_and_rows_that_left_it_come_back_captioned(tmp_path):
    table, work = _shard(6), tmp_path / "work"
    first = recaption_shard(table, RecaptionConfig(chunk_rows=2), work)
    assert [p.name for p in work.glob("chunk-*.parquet")] == ["chunk-000003.parquet"]
    assert read_parquet(work / "chunk-000003.parquet").num_rows == 6
    # A stricter filter upstream drops two rows; relaxed again, they come back: no row is captioned twice.
    recaption_shard(table.slice(2), RecaptionConfig(chunk_rows=2), work, captioner=object())
    again = recaption_shard(table, RecaptionConfig(chunk_rows=2), work, captioner=object())
    assert again.kept.equals(first.kept) and again.rejects.equals(first.rejects)
    assert again.stats.resumed == 6


def test_a_crash_inside_compaction_loses_and_repeats_nothing(tmp_path):
    table, work = _shard(4), tmp_path / "work"
    first = recaption_shard(table, RecaptionConfig(chunk_rows=2), work)
    # As if killed after the compacted chunk was written and before the old ones were deleted.
    compacted = read_parquet(work / "chunk-000002.parquet")
    write_parquet_atomic(compacted.slice(0, 2), work / "chunk-000000.parquet")
    write_parquet_atomic(compacted.slice(2, 2), work / "chunk-000001.parquet")
    again = recaption_shard(table, RecaptionConfig(chunk_rows=2), work, captioner=object())
    assert again.kept.equals(first.kept) and again.rejects.equals(first.rejects)
    assert [p.name for p in work.glob("chunk-*.parquet")] == ["chunk-000003.parquet"]


def test_chunks_of_another_setup_are_discarded(tmp_path):
    table = _shard(4)
    recaption_shard(table, RecaptionConfig(chunk_rows=1), tmp_path / "work")
    assert len(list((tmp_path / "work").glob("chunk-*.parquet"))) == 1
    (tmp_path / "work" / ".chunk-000002.parquet.abc.tmp").write_bytes(b"half-written")
    chunks = ResumeChunks(tmp_path / "work", {"backend": "transformers"})
    assert chunks.paths() == [] and chunks.finished().num_rows == 0
    assert not list((tmp_path / "work").glob(".*.tmp"))


def test_a_shard_that_lost_rows_resumes_the_rows_it_still_has(tmp_path):
    table = _shard(4)
    first = recaption_shard(table, RecaptionConfig(chunk_rows=2), tmp_path / "work")
    fewer = table.slice(1)  # a row the filter now rejects (say, a new duplicate elsewhere)
    again = recaption_shard(fewer, RecaptionConfig(chunk_rows=2), tmp_path / "work", captioner=object())
    assert again.kept["key"].to_pylist() == [k for k in first.kept["key"].to_pylist() if k != table["key"][0].as_py()]
    assert again.stats.resumed == 3 and again.stats.rows == 3


def test_a_finished_row_whose_image_or_alt_text_changed_is_captioned_again(tmp_path):
    # Keys are row positions in a source: a rebuilt source gives a key another image or alt text.
    table = _shard(4)
    recaption_shard(table, RecaptionConfig(chunk_rows=2), tmp_path / "work")
    captions = table["caption"].to_pylist()
    changed = table.set_column(table.column_names.index("caption"), "caption",
                               pa.array(["a green frog on a leaf", *captions[1:]]))
    images = changed["image"].to_pylist()
    changed = changed.set_column(changed.column_names.index("image"), "image", pa.array([images[0], images[3], *images[2:]]))
    again = recaption_shard(changed, RecaptionConfig(chunk_rows=2), tmp_path / "work")
    assert again.stats.resumed == 2 and again.stats.captioned + again.rejects.num_rows == 4
    assert again.kept.filter(pa.compute.equal(again.kept["key"], table["key"][0]))["recaption"].to_pylist() == [
        "a green frog on a leaf"
    ]
    assert again.kept.equals(recaption_shard(changed, RecaptionConfig(), tmp_path / "fresh").kept)


def test_a_work_dir_none_of_whose_rows_remain_starts_afresh(tmp_path):
    recaption_shard(_shard(4), RecaptionConfig(), tmp_path / "work")
    other = _shard(2).set_column(0, "key", pa.array(["other-1", "other-2"]))
    result = recaption_shard(other, RecaptionConfig(), tmp_path / "work")
    assert result.stats.resumed == 0
    assert sorted(result.kept["key"].to_pylist() + result.rejects["key"].to_pylist()) == ["other-1", "other-2"]
    assert recaption_shard(other.slice(0, 0), RecaptionConfig(), tmp_path / "work").stats.rows == 0


def test_duplicate_keys_are_an_error(tmp_path):
    table = _shard(3)
    table = table.set_column(0, "key", pa.array(["a", "b", "a"]))
    with pytest.raises(ValueError, match="duplicate key 'a'"):
        recaption_shard(table, RecaptionConfig(), tmp_path / "work")


def test_chunk_files_hold_outcomes_not_images(tmp_path):
    recaption_shard(_shard(3), RecaptionConfig(chunk_rows=8), tmp_path / "work")
    (chunk,) = (tmp_path / "work").glob("chunk-*.parquet")
    assert read_parquet(chunk).schema == OUTCOMES


class RefusesOneImage:
    """A backend whose processor rejects one image (real ones do, on extreme aspect ratios) and, if told
    to, every image: the whole batch raises, as a transformers or vLLM batch does."""

    def __init__(self, refused_width: int | None):
        self.refused_width = refused_width

    def detailed(self, images, alt_texts):
        if self.refused_width is None or any(image.width == self.refused_width for image in images):
            raise ValueError(f"image of width {self.refused_width} not supported")
        return [f"A photo of {alt or 'something'} in bright colours." for alt in alt_texts]

    def shorten(self, captions):
        return [caption.replace("bright ", "") for caption in captions]


def test_a_row_the_backend_rejects_fails_alone_and_a_broken_backend_fails_the_shard(tmp_path):
    table = _shard(6)
    refused = Image.open(io.BytesIO(table["image"][2].as_py())).width
    cfg = RecaptionConfig(backend="transformers", batch_size=4, chunk_rows=6)
    result = recaption_shard(table, cfg, tmp_path / "work", captioner=RefusesOneImage(refused))
    assert result.kept.num_rows == 5 and result.rejects["key"].to_pylist() == [table["key"][2].as_py()]
    assert result.rejects["detail"][0].as_py().startswith("backend_error: ValueError: image of width")
    assert result.stats.failures == {"backend_error": 1}

    with pytest.raises(ValueError, match="not supported"):
        recaption_shard(table, cfg, tmp_path / "broken", captioner=RefusesOneImage(None))
    assert not list((tmp_path / "broken").glob("chunk-*.parquet"))


class LLMDiesAfter:
    """A backend whose VLM works and whose LLM answers ``calls`` calls (all of them if None), then raises on
    every one, as a vLLM engine that died or a CUDA OOM that stays does."""

    def __init__(self, calls: int | None):
        self.calls = calls

    def detailed(self, images, alt_texts):
        return [f"A photo of {alt or 'something'} in bright colours." for alt in alt_texts]

    def shorten(self, captions):
        if self.calls == 0:
            raise RuntimeError("CUDA out of memory")
        if self.calls is not None:
            self.calls -= 1
        return [caption.replace("bright ", "") for caption in captions]


def test_an_llm_failing_on_every_row_of_a_chunk_fails_the_run_after_the_vlm_worked(tmp_path):
    table, work = _shard(8), tmp_path / "work"
    cfg = RecaptionConfig(backend="transformers", batch_size=4, chunk_rows=4)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        recaption_shard(table, cfg, work, captioner=LLMDiesAfter(0))
    assert not list(work.glob("chunk-*.parquet"))
    # The first chunk done, the LLM dies on the second: the chunk done stays, the other is no one's rejection.
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        recaption_shard(table, cfg, work, captioner=LLMDiesAfter(1))
    assert read_parquet(next(work.glob("chunk-*.parquet")))["reason"].to_pylist() == [None] * 4
    result = recaption_shard(table, cfg, work, captioner=LLMDiesAfter(None))
    assert result.stats.resumed == 4 and result.kept.num_rows == 8 and result.rejects.num_rows == 0


def test_rows_failed_on_a_backend_error_are_captioned_again_by_a_later_run(tmp_path):
    table, work = _shard(8), tmp_path / "work"
    cfg = RecaptionConfig(backend="transformers", batch_size=4, chunk_rows=8)
    first = recaption_shard(table, cfg, work, captioner=LLMDiesAfter(1))  # dies mid-chunk, after one batch
    assert first.kept.num_rows == 4 and first.stats.failures == {"backend_error": 4}

    again = recaption_shard(table, cfg, work, captioner=LLMDiesAfter(None))
    assert again.rejects.num_rows == 0 and again.stats.resumed == 4 and again.stats.captioned == 8
    assert again.kept.equals(recaption_shard(table, cfg, tmp_path / "fresh", captioner=LLMDiesAfter(None)).kept)
    assert len(list(work.glob("chunk-*.parquet"))) == 1
    assert recaption_shard(table, cfg, work, captioner=object()).stats.resumed == 8


def test_a_backend_still_dead_fails_the_run_that_captions_its_failed_rows_again(tmp_path):
    table, work = _shard(8), tmp_path / "work"
    cfg = RecaptionConfig(backend="transformers", batch_size=4, chunk_rows=8)
    first = recaption_shard(table, cfg, work, captioner=LLMDiesAfter(1))  # the second batch failed whole
    assert all("every row of its batch failed" in detail for detail in first.rejects["detail"].to_pylist())
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        recaption_shard(table, cfg, work, captioner=LLMDiesAfter(0))
    assert recaption_shard(table, cfg, work, captioner=LLMDiesAfter(None)).kept.num_rows == 8


def test_a_row_that_fails_alone_again_is_rejected_again_not_the_shard(tmp_path):
    table = _shard(6)
    refused = Image.open(io.BytesIO(table["image"][2].as_py())).width
    cfg = RecaptionConfig(backend="transformers", batch_size=4, chunk_rows=6)
    first = recaption_shard(table, cfg, tmp_path / "work", captioner=RefusesOneImage(refused))
    # The refused row is the only one captioned again: its failure says nothing against the backend.
    again = recaption_shard(table, cfg, tmp_path / "work", captioner=RefusesOneImage(refused))
    assert again.stats.resumed == 5 and again.kept.equals(first.kept) and again.rejects.equals(first.rejects)


def test_a_shard_being_recaptioned_elsewhere_is_refused_and_its_chunks_kept(tmp_path):
    table = _shard(4)
    recaption_shard(table.slice(0, 2), RecaptionConfig(chunk_rows=2), tmp_path / "work")
    with claimed(tmp_path / "work"):  # what a second process running the same shard holds
        with pytest.raises(WorkDirBusy, match="in use by another run of this shard"):
            recaption_shard(table, RecaptionConfig(chunk_rows=2), tmp_path / "work")
    assert len(list((tmp_path / "work").glob("chunk-*.parquet"))) == 1
    assert recaption_shard(table, RecaptionConfig(chunk_rows=2), tmp_path / "work").stats.resumed == 2
