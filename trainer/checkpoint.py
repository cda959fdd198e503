"""The weights half of a checkpoint: where it lives, how it is written atomically, how it is found.

    <dir>/step_0001000/model/        MMDiT.save_pretrained (safetensors + config.json)
    <dir>/step_0001000/ema/          the EMA weights, same layout (optional)
    <dir>/step_0001000/encoders.json the EncodersConfig the model was trained with
    <dir>/step_0001000/meta.json     step, loss, dataset_version, ...
    <dir>/step_0001000/trainer_state.pt   optimizer, scheduler, scaler, step, wandb run id (model ranks')
    <dir>/step_0001000/ranks/rank_00003.pt every rank's RNG states and, on loader ranks, the sampler position
    <dir>/latest                     the name of the newest step folder

A step folder is written under a temporary name and renamed into place, so a crash mid-write leaves
the previous checkpoints untouched and never a half-written step folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from etl.storage import created_mode, fsync_path, write_atomic
from trainer.encoders import EncodersConfig
from trainer.model import MMDiT

log = logging.getLogger(__name__)

# The latest validation loss a checkpoint carries in its meta.json (trainer.loop), and so in Dagster.
VALIDATION_KEYS = ("val_loss", "val_loss_ema", "val_step")

LATEST = "latest"
STEP_PREFIX = "step_"


class CheckpointNotFoundError(FileNotFoundError):
    pass


def step_folder(checkpoint_dir: str | os.PathLike, step: int) -> Path:
    return Path(checkpoint_dir) / f"{STEP_PREFIX}{step:07d}"


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        fsync_path(path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


@contextlib.contextmanager
def atomic_step_folder(step_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it is fsynced, renamed to ``step_dir`` (replacing an
    older copy of the same step) and ``latest`` names it. The trainer writes its resumable state into
    the same folder, so weights and state always belong to the same step."""
    step_dir = Path(step_dir)
    step_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{step_dir.name}.", suffix=".tmp", dir=step_dir.parent))
    try:
        tmp.chmod(created_mode(directory=True))
        yield tmp
        _fsync_tree(tmp)
        if step_dir.exists():
            old = tmp.with_name(tmp.name + ".old")
            step_dir.rename(old)
            tmp.rename(step_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(step_dir)
        fsync_path(step_dir.parent)
        write_text_atomic(step_dir.parent / LATEST, step_dir.name + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_weights(folder: Path, model: MMDiT, ema: MMDiT | None, encoders_config: EncodersConfig, meta: dict) -> None:
    """Write the weights, the encoders used and ``meta`` into ``folder`` (not atomic on its own)."""
    model.save_pretrained(folder / "model", safe_serialization=True)
    if ema is not None:
        ema.save_pretrained(folder / "ema", safe_serialization=True)
    (folder / "encoders.json").write_text(json.dumps(encoders_config.to_config_dict(), indent=2))
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


def save_weights(
    step_dir: str | os.PathLike, model: MMDiT, ema: MMDiT | None, encoders_config: EncodersConfig, meta: dict
) -> Path:
    with atomic_step_folder(step_dir) as tmp:
        write_weights(tmp, model, ema, encoders_config, meta)
    return Path(step_dir)


def _is_step_folder(path: Path) -> bool:
    return (path / "model").is_dir()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step folder, or a checkpoint folder whose ``latest`` names one (else its newest step folder)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path} does not exist")
    if _is_step_folder(path):
        return path
    latest = path / LATEST
    steps = sorted((p for p in path.glob(f"{STEP_PREFIX}*") if _step_of(p) is not None and _is_step_folder(p)),
                   key=_step_of)
    if latest.is_file():
        named = path / latest.read_text().strip()
        if _is_step_folder(named):
            return named
        if not steps:
            raise CheckpointNotFoundError(f"{latest} names {named.name}, which is not a complete step folder")
        # Deleted by hand, or a crash while a step was saved again: the newest complete one, not a fresh start.
        log.warning("%s names %s, which is not a complete step folder: using %s", latest, named.name, steps[-1].name)
        return steps[-1]
    # A crash between renaming a step folder into place and writing `latest` leaves no `latest`.
    if steps:
        return steps[-1]
    raise CheckpointNotFoundError(
        f"no checkpoint in {path}: expected a step folder (with model/) or a folder of step folders with '{LATEST}'"
    )


def read_json(checkpoint: str | os.PathLike, name: str) -> dict:
    """``meta.json`` or ``encoders.json`` of a checkpoint (a step folder or a folder of them)."""
    step_dir = resolve_checkpoint(checkpoint)
    path = step_dir / name
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {step_dir} has no {name}")
    return json.loads(path.read_text())


def load_encoders_config(checkpoint: str | os.PathLike) -> EncodersConfig:
    return EncodersConfig.from_config_dict(read_json(checkpoint, "encoders.json"))


def load_model(
    step_dir: str | os.PathLike, prefer_ema: bool = True, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> MMDiT:
    """The MMDiT of a checkpoint (see ``resolve_checkpoint``) in eval mode: its EMA weights when present
    and preferred."""
    step_dir = resolve_checkpoint(step_dir)
    folder = step_dir / "ema" if prefer_ema and (step_dir / "ema").is_dir() else step_dir / "model"
    # diffusers' default low_cpu_mem_usage wants accelerate and warns on every load without it; loading is
    # as fast without (a 300M-parameter MMDiT: 0.03 s either way).
    # The attention backend is the training machine's choice, not the model's: a run trained with
    # attention="flash" must still sample where flash-attn or CUDA is missing.
    model = MMDiT.from_pretrained(folder, low_cpu_mem_usage=False, attention="auto").to_inference_dtype(dtype)
    return model.to(device).eval().requires_grad_(False)


# --- the resumable trainer state ---------------------------------------------------------------------
#
# Every rank (loader ranks included) writes its own state into a staging folder beside the step folders;
# model-group rank 0 waits for all of them, then writes the weights and the shared trainer state and moves
# the rank files into the same atomic step folder. Files, not an object collective, because
# torch.distributed's object collectives pickle; the checkpoint folder is shared by all ranks anyway.

TRAINER_STATE = "trainer_state.pt"
RANKS = "ranks"
STAGING_PREFIX = ".staging_"


class CheckpointWriteError(RuntimeError):
    pass


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def staging_folder(checkpoint_dir: str | os.PathLike, step: int) -> Path:
    return Path(checkpoint_dir) / f"{STAGING_PREFIX}{step:07d}"


def clean_stale_writes(checkpoint_dir: str | os.PathLike) -> None:
    """Remove what a killed run left half-done: staging folders and temporary step folders. Call from one
    rank before any rank starts training. A complete older copy of a step, moved aside by a run killed
    before it moved the new one in (``atomic_step_folder``), goes back in place."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return
    for path in sorted(checkpoint_dir.iterdir()):
        if path.name.startswith(f".{STEP_PREFIX}") and path.name.endswith(".tmp.old"):
            step_dir = checkpoint_dir / path.name[1:].split(".", 1)[0]
            if not step_dir.exists():
                path.rename(step_dir)
                fsync_path(checkpoint_dir)
                continue
        if path.name.startswith(STAGING_PREFIX) or (path.name.startswith(f".{STEP_PREFIX}") and ".tmp" in path.name):
            shutil.rmtree(path, ignore_errors=True)


def save_rank_state(checkpoint_dir: str | os.PathLike, step: int, rank: int, state: dict) -> None:
    """One rank's part of the checkpoint of ``step`` (RNG states, sampler position): tensors and plain values."""
    folder = staging_folder(checkpoint_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(folder / _rank_file(rank), _torch_bytes({"step": step, "rank": rank, **state}))


def wait_for_rank_states(checkpoint_dir: str | os.PathLike, step: int, world_size: int, timeout_s: float) -> list[Path]:
    """The staged state files of every rank for ``step``; raises CheckpointWriteError naming the ranks
    whose state did not arrive within ``timeout_s`` (a dead or stuck peer)."""
    folder = staging_folder(checkpoint_dir, step)
    paths = [folder / _rank_file(rank) for rank in range(world_size)]
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [rank for rank, path in enumerate(paths) if not path.is_file()]
        if not missing:
            return paths
        if time.monotonic() > deadline:
            raise CheckpointWriteError(
                f"checkpoint of step {step}: ranks {missing} did not write their state to {folder} within {timeout_s:.0f} s"
            )
        time.sleep(0.05)


def _step_of(path: Path) -> int | None:
    digits = path.name[len(STEP_PREFIX):]
    return int(digits) if digits.isdigit() else None


def prune_checkpoints(checkpoint_dir: str | os.PathLike, keep: int, saved_step: int | None = None) -> list[Path]:
    """Delete all but the ``keep`` newest step folders up to ``saved_step`` (never the one ``latest``
    names); returns those deleted. Folders of later steps are left alone: a run resumed from an earlier
    step (rolled back past a divergence) must not lose its own new checkpoints to the abandoned ones."""
    if keep < 1:
        raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
    checkpoint_dir = Path(checkpoint_dir)
    latest = checkpoint_dir / LATEST
    protected = latest.read_text().strip() if latest.is_file() else None
    numbered = [(_step_of(p), p) for p in checkpoint_dir.glob(f"{STEP_PREFIX}*") if p.is_dir()]
    steps = [p for step, p in sorted((s, p) for s, p in numbered if s is not None)
             if saved_step is None or step <= saved_step]
    doomed = [p for p in steps[:-keep] if p.name != protected]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def save_checkpoint(
    checkpoint_dir: str | os.PathLike, step: int, model: MMDiT, ema: MMDiT | None, encoders_config: EncodersConfig,
    meta: dict, trainer_state: dict, rank_state_files: list[Path], keep: int,
) -> Path:
    """Weights, ``trainer_state`` and the staged rank files as one atomic step folder; ``latest`` names it,
    then only the ``keep`` newest step folders up to it are kept."""
    step_dir = step_folder(checkpoint_dir, step)
    with atomic_step_folder(step_dir) as tmp:
        write_weights(tmp, model, ema, encoders_config, {"step": step, **meta})
        (tmp / TRAINER_STATE).write_bytes(_torch_bytes({"step": step, **trainer_state}))
        (tmp / RANKS).mkdir()
        for path in rank_state_files:
            shutil.copyfile(path, tmp / RANKS / path.name)
    shutil.rmtree(staging_folder(checkpoint_dir, step), ignore_errors=True)
    prune_checkpoints(checkpoint_dir, keep, saved_step=step)
    return step_dir


def _load_state(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path.parent} has no resumable state {path.name} (a weights-only checkpoint?)")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_trainer_state(step_dir: str | os.PathLike) -> dict:
    """Optimizer, scheduler, scaler, step, wandb run id of a checkpoint (see ``resolve_checkpoint``)."""
    return _load_state(resolve_checkpoint(step_dir) / TRAINER_STATE)


def load_rank_state(step_dir: str | os.PathLike, rank: int) -> dict:
    return _load_state(resolve_checkpoint(step_dir) / RANKS / _rank_file(rank))


def checkpoint_metadata(step_dir: str | os.PathLike) -> dict:
    """step, loss and dataset_version of a saved checkpoint, the resolution it trained at (which bucket_index
    partition it read; older checkpoints lack it) and its latest validation loss when the run has one (the
    Dagster ``checkpoint`` asset's metadata)."""
    meta = read_json(step_dir, "meta.json")
    missing = {"step", "loss", "dataset_version"} - meta.keys()
    if missing:
        raise CheckpointNotFoundError(f"{resolve_checkpoint(step_dir)}/meta.json lacks {sorted(missing)}")
    return {key: meta[key] for key in ("step", "loss", "dataset_version", "resolution", *VALIDATION_KEYS) if key in meta}
