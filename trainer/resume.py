"""Where each rank continues from on ``--resume``.

On the checkpoint's own topology every rank loads the state it saved, and the run continues bit for bit.
On another one (more or fewer ranks, another map, colocated or not: a node lost, nodes added) the shared
state loads as always on every model rank (weights, EMA, optimizer, schedule, step, wandb run); what
belonged to the old ranks is handed over instead:
  * the data position: every feeder continues from an old feeder's sampler position, which
    ``BucketSampler.load_state_dict`` re-plans for the new set of loaders;
  * the random streams (CPU RNG, t sampling and CFG dropout, VAE sampling): seeded afresh from the seed,
    the step and the rank, so two resumes on the same new topology still agree with each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.checkpoint import load_rank_state, read_json
from trainer.topology import Topology


@dataclass(frozen=True)
class ResumePoint:
    step_dir: Path
    step: int
    saved_topology: Topology | None  # None: a checkpoint written before topologies were recorded
    rank_state: dict | None  # this rank's own saved state; None on another topology
    images_per_step: int | None  # the saved run's global batch (None before it was recorded)

    @property
    def same_topology(self) -> bool:
        return self.rank_state is not None


def resume_point(step_dir: Path, topology: Topology, rank: int) -> ResumePoint:
    meta = read_json(step_dir, "meta.json")
    saved = Topology.from_record(meta["topology"]) if "topology" in meta else None
    own = load_rank_state(step_dir, rank) if saved is None or saved == topology else None
    return ResumePoint(step_dir, int(meta["step"]), saved, own, meta.get("images_per_step"))


def feeder_state(point: ResumePoint, accumulation_steps: int) -> dict:
    """What a feeder (a loader rank's, or a colocated rank's own) continues from: its own snapshot, or on
    another topology the first old feeder's sampler position with no generator state (see ``Feeder``)."""
    if point.same_topology:
        state = point.rank_state["feeder"]
    else:
        old = point.saved_topology
        first_feeder = old.model_ranks[0] if old.colocated else old.loader_ranks[0]
        state = {"sampler": load_rank_state(point.step_dir, first_feeder)["feeder"]["sampler"], "generator": None}
    # Counted from the step, not taken from the snapshot, so a changed accumulation_steps counts right.
    return {**state, "batches": point.step * accumulation_steps}


# The random streams a rank draws from, each seeded apart so no two of them repeat each other.
STREAMS = ("cpu", "model", "vae", "validation-vae")


def fresh_seed(seed: int, stream: str, position: int, rank: int) -> int:
    """A seed for ``rank``'s ``stream`` (one of STREAMS) continuing after ``position`` (a step or a batch
    count) on another topology: distinct per stream, rank and position, the same on every resume."""
    entropy = [seed, STREAMS.index(stream), position, rank]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def restore_rng(point: ResumePoint, seed: int, rank: int, device: torch.device) -> None:
    """The process's global RNGs (CPU, and the rank's GPU): as saved, or on another topology seeded afresh."""
    if not point.same_topology:
        torch.manual_seed(fresh_seed(seed, "cpu", point.step, rank))  # seeds every GPU too
        return
    torch.set_rng_state(point.rank_state["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in point.rank_state:
        torch.cuda.set_rng_state(point.rank_state["rng_cuda"], device)
