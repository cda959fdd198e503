"""One GPU per recaption step.

`sd3 data run` and the daemon run as many recaption steps at once as the machine has GPUs (the
`recaption` pool), each in its own process. Each step claims a free GPU slot, an exclusive lock on a file
in a machine-local folder, for as long as it captions, and puts its models on that GPU. The kernel drops
the lock of a process that dies, so a killed step frees its GPU.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from etl.config import RecaptionConfig

# Machine-local (the GPUs are), shared by every pipeline run on the machine (so are they).
SLOTS_DIR = Path(tempfile.gettempdir()) / "sd3-recaption-gpus"
POLL_S = 1.0


@contextmanager
def claim_gpu(count: int, slots_dir: Path = SLOTS_DIR) -> Iterator[int]:
    """Hold one of ``count`` GPU slots (0 .. count-1) until the block ends; wait while every slot is taken."""
    slots_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for slot in range(count):
            lock = open(slots_dir / f"gpu-{slot}.lock", "a")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            try:
                yield slot
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
                lock.close()
            return
        time.sleep(POLL_S)


def on_gpu(cfg: RecaptionConfig, slot: int) -> RecaptionConfig:
    """``cfg`` with its models on GPU ``slot`` of those visible to this process.

    transformers takes the device; vLLM's engine picks its GPUs from CUDA_VISIBLE_DEVICES, which is narrowed
    to the slot's GPU here (the step's process is its own, so this touches no other step)."""
    if cfg.backend == "vllm":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else None
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot] if gpus else str(slot)
        return dataclasses.replace(cfg, device="cuda")
    return dataclasses.replace(cfg, device=f"cuda:{slot}")


@contextmanager
def on_a_free_gpu(cfg: RecaptionConfig) -> Iterator[RecaptionConfig]:
    """``cfg`` on a GPU of its own for the block when its models go to CUDA with no GPU named; else ``cfg``."""
    if cfg.backend == "alt-text" or cfg.device not in ("auto", "cuda"):
        yield cfg
        return
    import torch

    if not torch.cuda.is_available():
        yield cfg
        return
    with claim_gpu(torch.cuda.device_count()) as slot:
        yield on_gpu(cfg, slot)
