"""Training metrics from rank 0 of the model group: one JSON line per optimizer step in
``<checkpoint.dir>/metrics.jsonl``, a point every ``log.every`` steps to wandb (disabled / offline /
online), and a tqdm progress bar on the console.

On ``--resume`` the lines of steps after the resumed checkpoint (written by the run that crashed) are
dropped, so metrics.jsonl reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tqdm import tqdm

from trainer.checkpoint import write_text_atomic

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
KEYS = ("step", "loss", "lr", "grad_norm", "images_per_s", "data_wait_frac")
WANDB_MODES = ("disabled", "offline", "online")


class WandbWindow:
    """What goes to wandb: a point every ``every`` steps (the seed's ``log_steps``) summing up the steps
    since the last point: loss and grad_norm averaged, images_per_s and data_wait_frac over the window's
    time (a slow step weighs more), lr as of the point's step. A step with other values (a validation
    loss, an evaluation) or the last step makes a point too, so the window never hides one."""

    def __init__(self, every: int, last_step: int):
        self.every, self.last_step, self.window = every, last_step, []

    def add(self, values: dict) -> dict | None:
        """The point to log at ``values["step"]``, or None."""
        self.window.append(values)
        step = values["step"]
        if step % self.every and step != self.last_step and values.keys() <= set(KEYS):
            return None
        window, self.window = self.window, []
        seconds = [1.0 / v["images_per_s"] for v in window]  # a step's time, in units of its constant image count
        point = {k: v for k, v in values.items() if k != "step"}
        point["loss"] = sum(v["loss"] for v in window) / len(window)
        point["grad_norm"] = sum(v["grad_norm"] for v in window) / len(window)
        point["images_per_s"] = len(window) / sum(seconds)
        point["data_wait_frac"] = sum(v["data_wait_frac"] * t for v, t in zip(window, seconds)) / sum(seconds)
        return point


def _records(path: Path) -> list[tuple[str, dict]]:
    """(line, its record) of each complete line. A crash while a line was appended (a node lost, a full
    disk) leaves it cut short: it is left out, with a warning, so the run can still resume."""
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records.append((line, record | {"step": int(record["step"])}))
        except (ValueError, TypeError, KeyError):
            log.warning("%s line %d is not a complete metrics record (cut short by a crash?): left out: %.80r",
                        path, number, line)
    return records


def read_metrics(checkpoint_dir: str | os.PathLike) -> list[dict]:
    path = Path(checkpoint_dir) / METRICS_FILE
    return [record for _, record in _records(path)] if path.is_file() else []


def truncate_metrics(checkpoint_dir: Path, last_step: int) -> None:
    """Keep only the lines of steps <= last_step (atomically)."""
    path = checkpoint_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for line, record in _records(path) if record["step"] <= last_step]
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


class MetricsLogger:
    def __init__(self, checkpoint_dir: Path, total_steps: int, start_step: int, wandb_mode: str, wandb_project: str,
                 wandb_run_id: str | None, run_config: dict, progress: bool, every: int, wandb_step_offset: int = 0):
        """``wandb_run_id`` resumes that wandb run (None starts a new one; read ``run_id`` to save it); its
        steps are logged ``wandb_step_offset`` later (a finetune going on in its source run's wandb run)."""
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"log.wandb_mode must be one of {list(WANDB_MODES)}, got {wandb_mode!r}")
        self.checkpoint_dir, self.every, self.wandb_step_offset = checkpoint_dir, every, wandb_step_offset
        self._window = WandbWindow(every, total_steps)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(checkpoint_dir, start_step)
        self._file = open(checkpoint_dir / METRICS_FILE, "a")
        self._wandb = None
        self.run_id = wandb_run_id
        if wandb_mode != "disabled":
            import wandb  # only runs that log to wandb pay for importing it

            self._wandb = wandb.init(
                project=wandb_project, mode=wandb_mode, id=wandb_run_id, resume="allow" if wandb_run_id else None,
                dir=str(checkpoint_dir), config=run_config,
            )
            self.run_id = self._wandb.id
        self._bar = tqdm(total=total_steps, initial=start_step, disable=not progress, dynamic_ncols=True, unit="step")

    def log_step(self, values: dict) -> None:
        missing = set(KEYS) - values.keys()
        if missing:
            raise KeyError(f"metrics lack {sorted(missing)}")
        self._file.write(json.dumps(values) + "\n")
        self._file.flush()
        point = self._window.add(values)
        if self._wandb is not None and point is not None:
            self._wandb.log(point, step=values["step"] + self.wandb_step_offset)
        self._bar.update(1)
        if values["step"] % self.every == 0:
            self._bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                                  wait=f"{values['data_wait_frac']:.2f}")

    def log_images(self, step: int, images: list, captions: list[str]) -> None:
        if self._wandb is None:
            return
        import wandb

        self._wandb.log({"samples": [wandb.Image(img, caption=c) for img, c in zip(images, captions)]},
                        step=step + self.wandb_step_offset)

    def close(self, failed: bool = False) -> None:
        """``failed``: the run ends on an error, which wandb records (its exit hooks never see it: a
        failing rank leaves through os._exit)."""
        self._bar.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)
