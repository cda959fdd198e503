"""The weights half of a checkpoint: where it lives, how it is written atomically, how it is found.

    <dir>/step_0001000/model/        MMDiT.save_pretrained (safetensors + config.json)
    <dir>/step_0001000/ema/          the EMA weights, same layout (optional)
    <dir>/step_0001000/encoders.json the EncodersConfig the model was trained with
    <dir>/step_0001000/meta.json     step, loss, dataset_version, ...
    <dir>/latest                     the name of the newest step folder

A step folder is written under a temporary name and renamed into place, so a crash mid-write leaves
the previous checkpoints untouched and never a half-written step folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from trainer.encoders import EncodersConfig
from trainer.model import MMDiT

LATEST = "latest"
STEP_PREFIX = "step_"


class CheckpointNotFoundError(FileNotFoundError):
    pass


def step_folder(checkpoint_dir: str | os.PathLike, step: int) -> Path:
    return Path(checkpoint_dir) / f"{STEP_PREFIX}{step:07d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        _fsync(path)


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_step_folder(step_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it is fsynced, renamed to ``step_dir`` (replacing an
    older copy of the same step) and ``latest`` names it. The trainer writes its resumable state into
    the same folder, so weights and state always belong to the same step."""
    step_dir = Path(step_dir)
    step_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{step_dir.name}.", suffix=".tmp", dir=step_dir.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if step_dir.exists():
            old = tmp.with_name(tmp.name + ".old")
            step_dir.rename(old)
            tmp.rename(step_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(step_dir)
        _fsync(step_dir.parent)
        _write_text_atomic(step_dir.parent / LATEST, step_dir.name + "\n")
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
    if latest.is_file():
        named = path / latest.read_text().strip()
        if not _is_step_folder(named):
            raise CheckpointNotFoundError(f"{latest} names {named.name}, which is not a complete step folder")
        return named
    # A crash between renaming a step folder into place and writing `latest` leaves no `latest`.
    steps = sorted(p for p in path.glob(f"{STEP_PREFIX}*") if _is_step_folder(p))
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
    model = MMDiT.from_pretrained(folder, torch_dtype=dtype)
    return model.to(device).eval().requires_grad_(False)
