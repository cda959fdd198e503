"""Where every stage's output lives under the pipeline root: a contract the trainer and tools rely on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataLayout:
    root: Path

    def urls(self, shard: str) -> Path:
        return self.root / "urls" / f"{shard}.parquet"

    def shards(self) -> list[str]:
        """Shard keys written by the last `url_shards` materialization, in order."""
        return sorted(p.stem for p in (self.root / "urls").glob("*.parquet"))

    def downloaded(self, shard: str) -> Path:
        return self.root / "downloaded" / f"{shard}.parquet"

    def duplicate_winners(self) -> Path:
        return self.root / "hashes" / "winners.parquet"

    def filtered(self, shard: str) -> Path:
        return self.root / "filtered" / f"{shard}.parquet"

    def recaptioned(self, shard: str) -> Path:
        return self.root / "recaptioned" / f"{shard}.parquet"

    def bucketed(self, resolution: int, shard: str) -> Path:
        return self.root / "buckets" / str(resolution) / f"{shard}.parquet"

    def index(self, resolution: int) -> Path:
        return self.root / "index" / f"{resolution}.parquet"

    def rejects(self, stage: str, shard: str) -> Path:
        return self.root / "rejects" / stage / f"{shard}.parquet"

    def work(self, stage: str, shard: str) -> Path:
        """Work space of one stage for one shard: img2dataset's output, removed when done (that of a download
        killed outright, by the next download of the shard); the recaption chunks, kept (text only), so that
        no image is captioned twice by the same setup."""
        return self.root / "work" / stage / shard
