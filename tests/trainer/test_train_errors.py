"""Every error in issue 5's list ends every rank non-zero, within a bounded time, with a message that names
the problem. Subprocess timeouts bound each run: a hang fails the test instead of passing slowly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.trainer.test_train_run import (
    REPO,
    TRAIN,
    base_config,
    child_env,
    data_root,  # noqa: F401 - the module-scoped fixture
    free_port,
    kill_everything,
    kill_rank,
    node_ranks,
    run,
    start_nodes,
    torchrun_command,
    write_config,
)
from trainer.metrics import read_metrics

SETUP_ERRORS = {
    "world_size_mismatch": (2, {"topology": {"loader_to_model": {0: [1, 2, 3]}}},
                            r"ranks [2, 3] in topology.loader_to_model do not exist with WORLD_SIZE 2"),
    "rank_both_loader_and_model": (2, {"topology": {"loader_to_model": {0: [1], 1: [0]}}},
                                   "is both a loader and a model rank"),
    "model_rank_without_loader": (3, {"topology": {"loader_to_model": {0: [1]}}},
                                  "ranks [2] of WORLD_SIZE 3 are neither loaders nor model ranks with a loader"),
    "batch_larger_than_every_bucket": (2, {"train": {"batch_size": 18}}, "batch of 18 is larger than every bucket"),
    "missing_resolution": (2, {"data": {"resolution": 128}}, "no index for resolution 128"),
    "missing_init_from": (2, {"checkpoint": {"init_from": "/nonexistent/run"}}, "/nonexistent/run"),
    "config_value": (2, {"train": {"lr": -1}}, "train.lr: must be positive, got -1"),
}


def _merge(config: dict, changes: dict) -> dict:
    for section, values in changes.items():
        config[section] = {**config.get(section, {}), **values}
    return config


def launch_ranks(world_size: int, config_path, stderr=subprocess.PIPE) -> list[subprocess.Popen]:
    """Every rank as its own process, as torchrun would start them but without its agent, which would
    tear the other ranks down as soon as one fails and so hide whether they end on their own."""
    port, ranks = free_port(), []
    for rank in range(world_size):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        ranks.append(subprocess.Popen([sys.executable, TRAIN, "--config", str(config_path)], cwd=REPO, env=env,
                                      stdout=subprocess.DEVNULL, stderr=stderr, text=True, start_new_session=True))
    return ranks


def _config_with(data_root, tmp_path, changes: dict):
    config = _merge(base_config(data_root, tmp_path / "run"), changes)
    if "loader_to_model" in changes.get("topology", {}):
        config["topology"].pop("models_per_loader")
    return write_config(tmp_path / "train.yaml", config)


@pytest.mark.parametrize("case", SETUP_ERRORS)
def test_setup_error_ends_every_rank_with_its_reason(case, data_root, tmp_path):  # noqa: F811
    world_size, changes, message = SETUP_ERRORS[case]
    ranks = launch_ranks(world_size, _config_with(data_root, tmp_path, changes))
    for rank, process in enumerate(ranks):
        _, stderr = process.communicate(timeout=180)
        assert process.returncode != 0
        assert f"rank {rank} failed" in stderr and message in stderr, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]  # the message says what to fix; a traceback would bury it
    assert not (tmp_path / "run" / "latest").exists()


def test_a_fresh_start_in_a_checkpoint_dir_that_holds_a_run_is_refused(data_root, tmp_path):  # noqa: F811
    (tmp_path / "run" / "step_0000004" / "model").mkdir(parents=True)  # what an earlier run left there
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    ranks = launch_ranks(2, _config_with(data_root, tmp_path, {}))
    for rank, process in enumerate(ranks):
        _, stderr = process.communicate(timeout=180)
        assert process.returncode != 0
        assert f"rank {rank} failed" in stderr and "already holds a run (its last checkpoint: step_0000004): " \
            "pass --resume" in stderr, stderr[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_world_size_mismatch_under_torchrun(data_root, tmp_path):  # noqa: F811
    config = _config_with(data_root, tmp_path, {"topology": {"loader_to_model": {0: [1, 2, 3], 4: [5, 6, 7]}}})
    result = run(torchrun_command(4, config), timeout=180)
    assert result.returncode != 0
    message = "ranks [4, 5, 6, 7] in topology.loader_to_model do not exist with WORLD_SIZE 4"
    assert message in result.stderr
    # torchrun's own summary names the error too (each rank writes torchelastic's error file)
    assert message in result.stderr.split("Root Cause (first observed failure)")[1]


def test_unknown_override_key_is_named(data_root, tmp_path):  # noqa: F811
    config = write_config(tmp_path / "train.yaml", base_config(data_root, tmp_path / "run"))
    result = run([sys.executable, TRAIN, "--config", str(config), "train.learning_rate=0.1"], timeout=180)
    assert result.returncode != 0 and "learning_rate" in result.stderr


def _endless_config(data_root, tmp_path):
    """A run that trains until it is killed, with no checkpoint on the way."""
    config = base_config(data_root, tmp_path / "run")
    config["train"]["total_steps"] = config["checkpoint"]["every"] = 10_000
    return write_config(tmp_path / "train.yaml", config)


def _wait_for_steps(run_dir, processes: list[subprocess.Popen], timeout: float, steps: int = 2) -> None:
    deadline = time.monotonic() + timeout
    while len(read_metrics(run_dir)) < steps:
        assert all(p.poll() is None for p in processes), "a process ended before training started"
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.05)


def test_dead_loader_ends_its_model_ranks(data_root, tmp_path):  # noqa: F811
    """The model ranks notice on their own that their loader died (see ``launch_ranks``)."""
    run_dir = tmp_path / "run"
    ranks = launch_ranks(4, _endless_config(data_root, tmp_path))
    try:
        _wait_for_steps(run_dir, ranks, timeout=90)
        os.killpg(ranks[0].pid, signal.SIGKILL)  # the loader and its DataLoader workers
        messages = []
        for rank, process in enumerate(ranks[1:], start=1):
            _, stderr = process.communicate(timeout=180)  # timeout_s is 20
            assert process.returncode != 0
            assert f"rank {rank} failed" in stderr, stderr[-3000:]
            messages.append(stderr)
        # The model ranks that see the loader die say so; the others then lose their DDP peers.
        assert any("from rank 0 failed (did that rank die?)" in m or "no batch header from rank 0" in m for m in messages), [m[-1500:] for m in messages]
    finally:
        for process in ranks:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_a_dead_node_ends_the_other_node(data_root, tmp_path):  # noqa: F811
    """Two "nodes" of 2 ranks (scripts/train_node.sh); one is SIGKILLed mid-training, agent and ranks at
    once: the other's ranks see their peers gone, and its torchrun agent exits non-zero, in bounded time."""
    config_path, endpoint = _endless_config(data_root, tmp_path), f"127.0.0.1:{free_port()}"
    logs = [tmp_path / "node-a.txt", tmp_path / "node-b.txt"]
    nodes = start_nodes(config_path, endpoint, logs)  # node-a hosts the store: the killed node-b does not
    try:
        _wait_for_steps(tmp_path / "run", nodes, timeout=300)
        kill_everything(nodes[1])
        assert nodes[0].wait(timeout=180) != 0  # timeout_s is 20
        survivors = node_ranks(logs[0])
        text = logs[0].read_text()
        assert any(f"rank {rank} failed" in text for rank in survivors), text[-5000:]
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_everything(node)


def test_a_torchrun_restart_on_its_shared_store_fails_fast_naming_the_switch(data_root, tmp_path):  # noqa: F811
    """Plain torchrun with restarts but torch's shared rendezvous store: the restarted ranks would hang
    connecting to the dead ranks' addresses; instead they fail at once and name the switch that fixes it."""
    run_dir = tmp_path / "run"
    command = torchrun_command(4, _endless_config(data_root, tmp_path))
    command.insert(command.index(TRAIN), "--max-restarts=1")
    env = {k: v for k, v in child_env().items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    log = tmp_path / "torchrun.txt"
    with open(log, "w") as out:
        agent = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_steps(run_dir, [agent], timeout=300)
        kill_rank(agent, 2)
        assert agent.wait(timeout=180) != 0
    finally:
        if agent.poll() is None:
            kill_everything(agent)
    text = log.read_text()
    assert "torchrun restarted this rank (restart 1)" in text and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text, text[-5000:]


def test_a_stuck_model_rank_ends_every_other_rank_by_timeout(data_root, tmp_path):  # noqa: F811
    """SIGSTOP, not SIGKILL: the stuck rank's connections stay open (a hung GPU, a partitioned node), so
    nothing fails fast and only the timeouts (topology.timeout_s, 20 s here) can end its peers."""
    run_dir = tmp_path / "run"
    ranks = launch_ranks(4, _endless_config(data_root, tmp_path))
    try:
        # Past the loader's first sends to each rank, which may wait topology.startup_timeout_s (30 min) while
        # the rank builds its model: the most validation batches of a rank + prefetch 2 + 2 + accumulation 1
        # (``run_loader``). Rank 2 in step 10 holds training batch 10, so the loader, sending it, had waited
        # for batch 8 and its validation batches: past those early sends whatever the validation shares.
        _wait_for_steps(run_dir, ranks, timeout=120, steps=10)
        os.killpg(ranks[2].pid, signal.SIGSTOP)
        for rank in (0, 1, 3):
            _, stderr = ranks[rank].communicate(timeout=240)
            assert ranks[rank].returncode != 0
            # each failed by its own timeout (a send, a receive or the DDP all-reduce), not by a closed connection.
            # gloo reports a second op on a pair that one op's timeout closed as "Application timeout caused pair
            # closure"; which op reports first depends on the threads' timing.
            timed_out = "Timed out waiting 20000ms" in stderr or "Application timeout caused pair closure" in stderr
            assert f"rank {rank} failed" in stderr and timed_out, stderr[-3000:]
    finally:
        for process in ranks:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
