import json

import pytest

from trainer.config import TopologySection
from trainer.topology import Topology, TopologyError, derive_map


def test_derived_map_puts_a_loader_first_in_each_group():
    assert derive_map(8, 3) == {0: [1, 2, 3], 4: [5, 6, 7]}
    assert derive_map(4, 3) == {0: [1, 2, 3]}
    assert derive_map(6, 1) == {0: [1], 2: [3], 4: [5]}
    assert derive_map(2, 3) == {0: [1]}  # fewer ranks than a group: one loader for the rest
    with pytest.raises(TopologyError, match="WORLD_SIZE 7 is not a multiple of 1 \\+ models_per_loader = 4"):
        derive_map(7, 3)  # the last loader would feed 2 model ranks, the first 3


def test_reference_map_roles_and_lookups():
    topology = Topology.from_config(TopologySection(loader_to_model={0: [2, 3, 4], 1: [5, 6, 7]}), 8)
    assert topology.loader_ranks == [0, 1]
    assert topology.model_ranks == [2, 3, 4, 5, 6, 7]
    assert [topology.role(r) for r in range(8)] == ["loader"] * 2 + ["model"] * 6
    assert [topology.loader_of(r) for r in topology.model_ranks] == [0, 0, 0, 1, 1, 1]
    assert topology.models_of(1) == [5, 6, 7]
    with pytest.raises(TopologyError, match="rank 0 is a loader"):
        topology.loader_of(0)
    with pytest.raises(TopologyError, match="rank 3 is a model rank"):
        topology.models_of(3)
    with pytest.raises(TopologyError, match="rank 8 does not exist"):
        topology.role(8)


def test_from_config_derives_the_map_from_world_size():
    topology = Topology.from_config(TopologySection(models_per_loader=3), 8)
    assert topology.loader_to_model == {0: [1, 2, 3], 4: [5, 6, 7]}
    assert not topology.colocated


def test_seed_readme_32_gpu_map_validates():
    seed_map = {0: [2, 3, 4], 1: [5, 6, 7], 8: [10, 11, 12], 9: [13, 14, 15],
                16: [18, 19, 20], 17: [21, 22, 23], 24: [26, 27, 28], 25: [29, 30, 31]}
    topology = Topology.from_config(TopologySection(loader_to_model=seed_map), 32)
    assert len(topology.model_ranks) == 24 and topology.loader_of(29) == 25


def test_colocated_every_rank_feeds_itself():
    topology = Topology.from_config(TopologySection(colocated=True), 3)
    assert topology.model_ranks == [0, 1, 2] and topology.loader_ranks == []
    assert [topology.role(r) for r in range(3)] == ["model"] * 3
    assert topology.loader_of(2) == 2 and topology.models_of(1) == [1]
    assert all(topology.runs_feeder(r) for r in range(3))


def test_a_topology_round_trips_through_its_json_record():
    """Checkpoints record their topology as JSON (map keys become strings); resuming compares it."""
    for topology in [Topology.from_config(TopologySection(loader_to_model={1: [5, 6, 7], 0: [2, 3, 4]}), 8),
                     Topology.from_config(TopologySection(colocated=True), 3)]:
        record = json.loads(json.dumps(topology.to_record()))
        assert Topology.from_record(record) == topology
    reference = Topology.from_config(TopologySection(loader_to_model={0: [2, 3, 4], 1: [5, 6, 7]}), 8)
    assert [reference.runs_feeder(r) for r in range(8)] == [True] * 2 + [False] * 6
    assert Topology.from_config(TopologySection(models_per_loader=3), 8) != reference


@pytest.mark.parametrize(
    "mapping, world_size, message",
    [
        ({0: [1, 2, 3]}, 8, r"ranks \[4, 5, 6, 7\] of WORLD_SIZE 8 are neither loaders nor model ranks"),
        ({0: [1, 2, 3], 4: [5, 6, 7]}, 4, r"ranks \[4, 5, 6, 7\] .* do not exist with WORLD_SIZE 4"),
        ({0: [1, 2], 2: [3]}, 4, r"rank 2 is both a loader and a model rank"),
        ({0: [2], 1: [2, 3]}, 4, r"model rank 2 has two loaders: 0 and 1"),
        ({0: [1, 1, 2]}, 3, r"model rank 1 appears twice in loader 0's list"),
        ({0: [], 1: [2, 3]}, 4, r"loader rank 0 has no model ranks"),
        ({}, 4, r"loader_to_model is empty"),
        # Loader batches of 3 and 2 model batches would cut different orders, whose shares overlap.
        ({0: [1, 2, 3], 4: [5, 6]}, 7, r"every loader must feed as many model ranks as the others, got \{0: 3, 4: 2\}"),
    ],
)
def test_bad_maps_name_the_ranks(mapping, world_size, message):
    with pytest.raises(TopologyError, match=message):
        Topology.from_config(TopologySection(loader_to_model=mapping), world_size)


def test_derived_maps_that_cannot_work_are_errors():
    with pytest.raises(TopologyError, match="WORLD_SIZE 5 is not a multiple"):
        Topology.from_config(TopologySection(models_per_loader=3), 5)
    with pytest.raises(TopologyError, match="WORLD_SIZE 1 .* topology.colocated"):
        Topology.from_config(TopologySection(), 1)


def test_colocated_over_a_map_says_the_map_is_not_used(caplog):
    with caplog.at_level("WARNING", logger="trainer.topology"):
        topology = Topology.from_config(TopologySection(loader_to_model={0: [1, 2, 3]}, colocated=True), 4)
    assert topology.colocated and topology.loader_to_model == {}
    assert "topology.loader_to_model {0: [1, 2, 3]} is not used" in caplog.text
