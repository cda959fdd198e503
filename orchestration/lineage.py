"""Recording trained checkpoints in Dagster, downstream of the data that made them.

The trainer is launched by torchrun, not by Dagster, so a checkpoint is reported as a runless
materialization of the external `checkpoint` asset; the UI then shows which bucket index (and so which
shards, filters and captions) a model was trained on.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

CHECKPOINT = dg.AssetSpec(
    "checkpoint",
    deps=["bucket_index"],
    group_name="training",
    description="MMDiT checkpoints written by trainer/train.py (model + EMA safetensors, resumable state).",
    kinds={"safetensors"},
)


def why_not_recorded(dagster_home: str | os.PathLike | None = None) -> str | None:
    """Why checkpoints cannot be recorded (None: they can). The trainer does not create a Dagster home: one
    it made would hold no data pipeline run for a checkpoint to be downstream of."""
    home = dagster_home or os.environ.get("DAGSTER_HOME")
    if not home:
        return "DAGSTER_HOME is not set; export the one `sd3 data run` used (./.dagster unless set)"
    if not Path(home).is_dir():
        return f"DAGSTER_HOME {home} is not a folder"
    return None


def record_checkpoint(step_dir: Path, metadata: dict, dagster_home: str | os.PathLike | None = None) -> bool:
    """Report one saved checkpoint; returns False (and records nothing) when there is no Dagster home."""
    if why_not_recorded(dagster_home):
        return False
    os.environ["DAGSTER_HOME"] = str(Path(dagster_home or os.environ["DAGSTER_HOME"]).resolve())
    values = {k: v for k, v in metadata.items() if isinstance(v, (int, float, str))}
    values["path"] = dg.MetadataValue.path(str(step_dir))
    with dg.DagsterInstance.get() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=CHECKPOINT.key, metadata=values))
    return True
