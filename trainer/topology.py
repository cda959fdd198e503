"""Which rank does what: loader ranks decode and encode data for the model ranks they feed.

The map ``{loader rank: [model ranks]}`` comes from the config (the reference's ``loader_to_model_gpu``)
or is derived from WORLD_SIZE: per group of ``1 + models_per_loader`` consecutive ranks, the first one
loads. It is checked against WORLD_SIZE before any rank does work, with errors that name the ranks.
In a ``colocated`` topology every rank is a model rank that encodes its own data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

import torch.distributed as dist

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # the config pulls in the encoders (transformers): too slow for every spawned rank to import
    from trainer.config import TopologySection


class TopologyError(ValueError):
    pass


def derive_map(world_size: int, models_per_loader: int) -> dict[int, list[int]]:
    """Per group of ``1 + models_per_loader`` consecutive ranks the first loads: 8, 3 -> {0: [1, 2, 3], 4: [5, 6, 7]}.

    Fewer ranks than one group make one loader feeding the rest (2, 3 -> {0: [1]}). A larger WORLD_SIZE the
    groups do not divide is an error: every loader feeds as many model ranks (``_check_map``).
    """
    if models_per_loader < 1:
        raise TopologyError(f"models_per_loader must be at least 1, got {models_per_loader}")
    group = 1 + models_per_loader
    if world_size < group:  # fewer ranks than one group: one loader feeds the rest
        return {0: list(range(1, world_size))}
    if world_size % group:
        raise TopologyError(
            f"WORLD_SIZE {world_size} is not a multiple of 1 + models_per_loader = {group}: every loader must feed "
            f"{models_per_loader} model ranks; use a WORLD_SIZE that is, another models_per_loader, or topology.colocated"
        )
    return {start: list(range(start + 1, start + group)) for start in range(0, world_size, group)}


def _check_map(loader_to_model: dict[int, list[int]], world_size: int) -> None:
    if world_size < 1:
        raise TopologyError(f"WORLD_SIZE must be at least 1, got {world_size}")
    if not loader_to_model:
        raise TopologyError("topology.loader_to_model is empty: give at least one loader rank and its model ranks")
    loaders = set(loader_to_model)
    fed_by: dict[int, int] = {}
    for loader, models in loader_to_model.items():
        if not models:
            raise TopologyError(f"loader rank {loader} has no model ranks")
        for model in models:
            if model in loaders:
                raise TopologyError(f"rank {model} is both a loader and a model rank (fed by loader {loader})")
            if model in fed_by:
                raise TopologyError(
                    f"model rank {model} has two loaders: {fed_by[model]} and {loader}"
                    if fed_by[model] != loader
                    else f"model rank {model} appears twice in loader {loader}'s list"
                )
            fed_by[model] = loader
    named = loaders | set(fed_by)
    beyond = sorted(r for r in named if not 0 <= r < world_size)
    if beyond:
        raise TopologyError(
            f"ranks {beyond} in topology.loader_to_model do not exist with WORLD_SIZE {world_size} "
            f"(ranks 0..{world_size - 1})"
        )
    missing = sorted(set(range(world_size)) - named)
    if missing:
        raise TopologyError(
            f"ranks {missing} of WORLD_SIZE {world_size} are neither loaders nor model ranks with a loader: "
            f"add them to topology.loader_to_model or launch {len(named)} processes"
        )
    sizes = {loader: len(models) for loader, models in loader_to_model.items()}
    if len(set(sizes.values())) > 1:
        # The loaders take turns through one order of loader batches (trainer/data.py): batches of different
        # sizes would cut different orders, whose shares overlap, and some images would go unseen.
        raise TopologyError(
            f"every loader must feed as many model ranks as the others, got {sizes} (loader: model ranks): "
            f"give each loader the same number, or use topology.colocated"
        )


@dataclass(frozen=True)
class Topology:
    loader_to_model: dict[int, list[int]]  # empty when colocated
    world_size: int
    colocated: bool = False

    def __post_init__(self):
        if self.colocated:
            if self.world_size < 1:
                raise TopologyError(f"WORLD_SIZE must be at least 1, got {self.world_size}")
            if self.loader_to_model:
                raise TopologyError("a colocated topology has no loader_to_model map: every rank feeds itself")
        else:
            _check_map(self.loader_to_model, self.world_size)

    @classmethod
    def from_config(cls, cfg: TopologySection, world_size: int) -> Topology:
        if cfg.colocated:
            if cfg.loader_to_model:
                # Say so: `topology.colocated=true` on the command line over a recipe's map is how one runs a
                # recipe on one GPU, but a config that means the map should not train colocated unnoticed.
                log.warning("topology.colocated is set: topology.loader_to_model %s is not used", cfg.loader_to_model)
            return cls({}, world_size, colocated=True)
        if cfg.loader_to_model is not None:
            mapping = cfg.loader_to_model
        else:
            if world_size < 2:
                raise TopologyError(
                    f"WORLD_SIZE {world_size} leaves no rank to train next to a loader: launch at least 2 processes "
                    f"or set topology.colocated"
                )
            mapping = derive_map(world_size, cfg.models_per_loader)
        return cls({int(k): [int(r) for r in v] for k, v in sorted(mapping.items())}, world_size)

    @property
    def loader_ranks(self) -> list[int]:
        return [] if self.colocated else sorted(self.loader_to_model)

    @property
    def model_ranks(self) -> list[int]:
        if self.colocated:
            return list(range(self.world_size))
        return sorted(r for models in self.loader_to_model.values() for r in models)

    def role(self, rank: int) -> Literal["loader", "model"]:
        self._check_rank(rank)
        return "loader" if rank in self.loader_to_model else "model"

    def runs_feeder(self, rank: int) -> bool:
        """Whether ``rank`` runs a feeder (a loader, or a colocated rank) rather than receiving batches."""
        return self.colocated or self.role(rank) == "loader"

    def loader_of(self, model_rank: int) -> int:
        """The rank that feeds ``model_rank`` (itself when colocated)."""
        if self.role(model_rank) != "model":
            raise TopologyError(f"rank {model_rank} is a loader, not a model rank")
        if self.colocated:
            return model_rank
        return next(loader for loader, models in self.loader_to_model.items() if model_rank in models)

    def models_of(self, loader_rank: int) -> list[int]:
        """The model ranks ``loader_rank`` feeds, in the map's order (the order a loader splits its batch)."""
        self._check_rank(loader_rank)
        if self.colocated:
            return [loader_rank]
        if loader_rank not in self.loader_to_model:
            raise TopologyError(f"rank {loader_rank} is a model rank, not a loader")
        return list(self.loader_to_model[loader_rank])

    def to_record(self) -> dict:
        """JSON values (saved with each checkpoint); ``from_record`` rebuilds the topology."""
        return {"world_size": self.world_size, "colocated": self.colocated,
                "loader_to_model": {str(loader): models for loader, models in self.loader_to_model.items()}}

    @classmethod
    def from_record(cls, record: dict) -> Topology:
        mapping = {int(loader): [int(r) for r in models] for loader, models in record["loader_to_model"].items()}
        return cls(dict(sorted(mapping.items())), int(record["world_size"]), colocated=bool(record["colocated"]))

    def describe(self) -> str:
        if self.colocated:
            return f"colocated: {self.world_size} ranks, each encodes its own data"
        return f"loader -> model ranks {self.loader_to_model} (WORLD_SIZE {self.world_size})"

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank {rank} does not exist with WORLD_SIZE {self.world_size}")


def new_groups(topology: Topology, timeout: timedelta | None = None) -> dist.ProcessGroup | None:
    """The model ranks' process group for DDP; None on loader ranks.

    Every rank must call this, in the same order as every other ``dist.new_group`` call.
    """
    group = dist.new_group(ranks=topology.model_ranks, timeout=timeout)
    return group if dist.get_rank() in topology.model_ranks else None
