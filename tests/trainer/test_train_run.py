"""The trainer end to end: torchrun (or plain processes) over gloo on CPU, tiny presets, the demo data at 64 px.

One uninterrupted 4-process run (1 loader : 3 model ranks) is the reference: the checkpoint it writes,
the weights its model ranks hold, its metrics, its lineage record, sampling from it, and the losses that
runs killed with SIGKILL and resumed must reproduce bitwise.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.processes import kill_tree
from tests.trainer.demo_dataset import build_demo_dataset
from trainer.checkpoint import (TRAINER_STATE, checkpoint_metadata, load_model, load_rank_state, load_trainer_state,
                                resolve_checkpoint)
from trainer.data import BucketSampler, open_index
from trainer.loop import weights_sha256
from trainer.metrics import KEYS, read_metrics
from trainer.validation import split_holdout

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "trainer" / "train.py")
TRAIN_NODE = str(REPO / "scripts" / "train_node.sh")
TOTAL_STEPS = 6


def base_config(data_root: Path, run_dir: Path) -> dict:
    """2 images per model rank, a checkpoint every 2 steps, a short timeout so faults end runs quickly; 5 of the
    48 images held out, 4 of them the validation set, evaluated every 3 steps at 2 timesteps."""
    return {
        "data": {"root": str(data_root), "resolution": 64, "num_workers": 1, "holdout_fraction": 0.05},
        "train": {"total_steps": TOTAL_STEPS, "batch_size": 2, "lr": 1e-3, "warmup_steps": 2, "lr_schedule": "cosine",
                  "min_lr": 1e-4, "precision": "fp32"},
        "checkpoint": {"dir": str(run_dir), "every": 2, "keep": 2},
        "topology": {"models_per_loader": 3, "prefetch": 2, "timeout_s": 20},
        "model": {"preset": "tiny", "overrides": {"num_blocks": 2, "max_res": 64, "max_res_orig": 64}},
        "encoders": {"preset": "tiny"},
        "ema": {"every": 2, "decay": 0.9},
        "log": {"progress": False, "val_every": 3, "val_images": 4, "val_timesteps": 2},
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def child_env(**extra: str) -> dict[str, str]:
    """One thread per process on the shared cores; no Dagster home unless a test gives one."""
    env = {name: value for name, value in os.environ.items() if name != "DAGSTER_HOME"}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def torchrun_command(nproc: int, config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAIN,
            "--config", str(config), *args]


def start_node(config: Path, endpoint: str, log: Path, *args: str, nnodes: int = 2, nproc: int = 2,
               **env: str) -> subprocess.Popen:
    """One "node" on this machine: ``scripts/train_node.sh`` (what each Slurm node runs), ``nproc`` ranks,
    meeting the other nodes' torchrun agents through the c10d rendezvous at ``endpoint``."""
    env = child_env(NNODES=str(nnodes), NPROC_PER_NODE=str(nproc), RDZV_ENDPOINT=endpoint, RDZV_ID=f"test-{endpoint}",
                    LOGLEVEL="INFO", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env)
    with open(log, "w") as out:
        return subprocess.Popen(["bash", TRAIN_NODE, str(config), *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill_rank(agent: subprocess.Popen, rank: int) -> None:
    """SIGKILL the one worker of a torchrun agent whose RANK is ``rank``: a crashed rank."""
    for pid in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split():
        if f"RANK={rank}" in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0"):
            os.kill(int(pid), signal.SIGKILL)
            return
    raise AssertionError(f"torchrun (pid {agent.pid}) has no worker with RANK={rank}")


def node_ranks(log: Path) -> list[int]:
    """The global ranks the torchrun agent of a node started (its rendezvous report, logged at INFO)."""
    found = re.findall(r"global_ranks=\[([0-9, ]*)\]", log.read_text())
    assert found, log.read_text()[-3000:]
    return [int(r) for r in found[-1].split(",")]


def run(command: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=child_env(**env), capture_output=True, text=True, timeout=timeout)


def kill_everything(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and every process it started, all at once: a crashed node."""
    kill_tree(process.pid)
    process.wait(timeout=30)


def losses(run_dir: Path) -> list[tuple]:
    return [(m["step"], m["loss"], m["lr"], m["grad_norm"], m.get("val_loss"), m.get("val_loss_ema"))
            for m in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return build_demo_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference_run(data_root, tmp_path_factory):
    """An uninterrupted 4-process run, its Dagster home recording the checkpoints."""
    root = tmp_path_factory.mktemp("reference")
    run_dir, dagster_home = root / "run", root / "dagster"
    dagster_home.mkdir()
    config = write_config(root / "train.yaml", base_config(data_root, run_dir))
    result = run(torchrun_command(4, config), DAGSTER_HOME=str(dagster_home))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return run_dir, config, dagster_home


def test_four_process_run_checkpoints_identical_model_ranks(reference_run):
    run_dir, _, _ = reference_run
    step_dir = resolve_checkpoint(run_dir)
    assert step_dir.name == f"step_{TOTAL_STEPS:07d}"
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_0000004", "step_0000006"]  # keep: 2
    saved = weights_sha256(load_model(step_dir, prefer_ema=False))
    # Each model rank hashed the weights it held at the checkpoint.
    assert [load_rank_state(step_dir, rank)["weights_sha256"] for rank in (1, 2, 3)] == [saved] * 3
    loader = load_rank_state(step_dir, 0)
    assert loader["role"] == "loader" and loader["feeder"]["batches"] == TOTAL_STEPS
    assert loader["feeder"]["sampler"]["epoch"] * loader["feeder"]["sampler"]["batches_per_epoch"] + \
        loader["feeder"]["sampler"]["batches_used"] == TOTAL_STEPS
    ema = load_model(step_dir, prefer_ema=True)
    assert any(not torch.equal(a, b) for a, b in zip(ema.parameters(), load_model(step_dir, prefer_ema=False).parameters()))
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, TOTAL_STEPS + 1))
    assert all(set(KEYS) <= m.keys() for m in metrics)
    assert all(0.0 <= m["data_wait_frac"] <= 1.0 and m["images_per_s"] > 0 for m in metrics)
    validated = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in validated] == [3, 6]
    for m in validated:
        assert m.keys() >= {"val_loss_ema", "val_loss/t0.250", "val_loss/t0.750"}
        assert m["val_loss"] == pytest.approx((m["val_loss/t0.250"] + m["val_loss/t0.750"]) / 2)
        assert 0 < m["val_loss"] < 10 and 0 < m["val_loss_ema"] < 10
    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["step"] == TOTAL_STEPS and meta["loss"] == metrics[-1]["loss"] and meta["dataset_version"]
    assert meta["topology"] == {"world_size": 4, "colocated": False, "loader_to_model": {"0": [1, 2, 3]}}
    assert meta["images_per_step"] == 3 * 2


def test_two_loaders_each_feed_their_own_model_ranks_as_in_the_reference_map(data_root, tmp_path):
    """The reference's shape of map (loaders 0 and 1 first, model ranks after) at 6 processes: four model
    ranks train one DDP model, each loader draws its own share of every epoch for its two, here in the
    row_groups shuffle."""
    run_dir = tmp_path / "run"
    config = base_config(data_root, run_dir)
    config["data"]["shuffle"] = "row_groups"
    config["topology"] = {"loader_to_model": {0: [2, 3], 1: [4, 5]}, "prefetch": 2, "timeout_s": 30}
    config["train"]["total_steps"] = 4
    result = run(torchrun_command(6, write_config(tmp_path / "train.yaml", config)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "loader -> model ranks {0: [2, 3], 1: [4, 5]} (WORLD_SIZE 6)" in result.stderr
    # two checkpoints, no Dagster home: said once
    assert result.stderr.count("checkpoints are not recorded in Dagster's lineage: DAGSTER_HOME is not set") == 1
    step_dir = resolve_checkpoint(run_dir)
    saved = weights_sha256(load_model(step_dir, prefer_ema=False))
    assert [load_rank_state(step_dir, rank)["weights_sha256"] for rank in (2, 3, 4, 5)] == [saved] * 4
    loaders = [load_rank_state(step_dir, rank) for rank in (0, 1)]
    assert all(state["role"] == "loader" and state["feeder"]["batches"] == 4 for state in loaders)
    assert all(state["feeder"]["sampler"]["shuffle"] == "row_groups" for state in loaders)
    # each loader's epoch is its half of the 4-image batches (2 model ranks x 2 images) of the rows not held out
    train_rows, _ = split_holdout(open_index(data_root, 64), config["data"]["holdout_fraction"])
    whole = BucketSampler(train_rows, 4, seed=0).batches_per_epoch
    assert [state["feeder"]["sampler"]["batches_per_epoch"] for state in loaders] == [whole // 2] * 2
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["images_per_s"] > 0 and m["loss"] > 0 for m in metrics)


def test_two_nodes_through_the_rendezvous_train_exactly_like_one(reference_run, data_root, tmp_path):
    """The same 4 ranks started as 2 nodes x 2 by scripts/train_node.sh: the loader's batches cross
    "nodes" to model ranks on both, DDP spans them, and every loss equals the single-node run's bit for bit."""
    reference_dir, _, _ = reference_run
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "train.yaml", base_config(data_root, run_dir))
    endpoint = f"127.0.0.1:{free_port()}"
    logs = [tmp_path / "node-a.txt", tmp_path / "node-b.txt"]
    nodes = start_nodes(config, endpoint, logs)
    try:
        for node, log in zip(nodes, logs):
            assert node.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_everything(node)
    assert sorted(node_ranks(logs[0]) + node_ranks(logs[1])) == [0, 1, 2, 3]
    assert len(node_ranks(logs[0])) == 2
    assert losses(run_dir) == losses(reference_dir)
    step_dir = resolve_checkpoint(run_dir)
    assert load_rank_state(step_dir, 3)["weights_sha256"] == load_rank_state(reference_dir / step_dir.name, 3)["weights_sha256"]


def test_checkpoints_recorded_in_dagster(reference_run):
    from dagster import AssetKey, DagsterInstance

    run_dir, _, dagster_home = reference_run
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    try:
        with DagsterInstance.get() as instance:
            event = instance.get_latest_materialization_event(AssetKey("checkpoint"))
    finally:
        del os.environ["DAGSTER_HOME"]
    metadata = event.asset_materialization.metadata
    assert metadata["step"].value == TOTAL_STEPS
    assert metadata["dataset_version"].value == json.loads((resolve_checkpoint(run_dir) / "meta.json").read_text())["dataset_version"]
    # the checkpoint at step 6 carries the validation loss of step 6; the one at step 4 that of step 3
    validated = {m["step"]: m for m in read_metrics(run_dir) if "val_loss" in m}
    assert metadata["val_loss"].value == validated[6]["val_loss"] and metadata["val_step"].value == 6
    older = json.loads((run_dir / "step_0000004" / "meta.json").read_text())
    assert (older["val_loss_ema"], older["val_step"]) == (validated[3]["val_loss_ema"], 3)


def test_checkpoint_samples_with_the_cli(reference_run, tmp_path):
    run_dir, _, _ = reference_run
    out = tmp_path / "sample.png"
    result = run([sys.executable, "-m", "orchestration.cli", "sample", "--checkpoint", str(run_dir), "--prompt",
                  "a red circle", "--steps", "2", "--width", "64", "--height", "32", "--seed", "0", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (64, 32)


def _start(config: Path, run_dir: Path, *args: str) -> subprocess.Popen:
    log = open(run_dir.parent / f"log-{time.monotonic_ns()}.txt", "w")
    return subprocess.Popen(torchrun_command(4, config, *args), cwd=REPO, env=child_env(), stdout=log, stderr=log)


def _resume_and_compare(config: Path, run_dir: Path, reference_dir: Path) -> None:
    result = run(torchrun_command(4, config, "--resume"))
    assert result.returncode == 0, result.stderr[-5000:]
    assert losses(run_dir) == losses(reference_dir)  # bitwise: floats compared exactly
    for step in ("step_0000004", "step_0000006"):  # with the validation loss each carries
        assert checkpoint_metadata(run_dir / step) == checkpoint_metadata(reference_dir / step)


def _kill_when(process: subprocess.Popen, ready, timeout: float = 300, kill=kill_everything) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "the run never reached the point to kill it at"
        time.sleep(0.002)
    kill(process)


@pytest.mark.slow
def test_resume_after_sigkill_at_a_random_step_matches_an_uninterrupted_run(reference_run, data_root, tmp_path):
    reference_dir, _, _ = reference_run
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "train.yaml", base_config(data_root, run_dir))
    kill_after = random.Random().randint(1, TOTAL_STEPS - 1)
    process = _start(config, run_dir)
    _kill_when(process, lambda: len(read_metrics(run_dir)) >= kill_after)
    assert len(read_metrics(run_dir)) < TOTAL_STEPS, "the run finished before the kill"
    _resume_and_compare(config, run_dir, reference_dir)


@pytest.mark.slow
def test_resume_after_sigkill_during_a_checkpoint_write(reference_run, data_root, tmp_path):
    reference_dir, _, _ = reference_run
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "train.yaml", base_config(data_root, run_dir))
    process = _start(config, run_dir)
    # The model ranks stage their state for step 4 when they reach it (the loader's comes earlier, as it
    # runs ahead); from then until its step folder is renamed into place, step 4 is being written.
    def writing_step_4() -> bool:
        staged = (run_dir / ".staging_0000004" / "rank_00001.pt").exists() or any(run_dir.glob(".step_0000004.*.tmp"))
        return staged and not (run_dir / "step_0000004").exists()

    _kill_when(process, writing_step_4)
    assert resolve_checkpoint(run_dir).name == "step_0000002"
    _resume_and_compare(config, run_dir, reference_dir)


@pytest.mark.slow
def test_torchrun_restarts_every_rank_when_one_dies_and_they_continue_exactly(reference_run, data_root, tmp_path):
    """MAX_RESTARTS=1: a model rank is SIGKILLed after the first checkpoint; torchrun stops the others and
    starts all four again, which resume from the last checkpoint (train_node.sh adds --resume), so the
    losses equal the uninterrupted run's bit for bit and the job succeeds without a resubmission."""
    reference_dir, _, _ = reference_run
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "train.yaml", base_config(data_root, run_dir))
    log = tmp_path / "node.txt"
    node = start_node(config, f"127.0.0.1:{free_port()}", log, nnodes=1, nproc=4, MAX_RESTARTS="1")
    try:
        _kill_when(node, (run_dir / "step_0000002").exists, kill=lambda agent: kill_rank(agent, 2))
        assert len(read_metrics(run_dir)) < TOTAL_STEPS, "the run finished before the kill"
        assert node.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        if node.poll() is None:
            kill_everything(node)
    text = log.read_text()
    assert "exitcode: -9" in text and re.search(r"resuming from \S+/step_000000[24]", text), text[-5000:]
    assert losses(run_dir) == losses(reference_dir)


def test_colocated_single_process_run_without_torchrun_samples_while_training(data_root, tmp_path):
    """With train.compile: the compiled blocks train and score the validation set (the EMA copy samples)."""
    run_dir = tmp_path / "run"
    config = base_config(data_root, run_dir)
    config["topology"] = {"colocated": True, "prefetch": 1, "timeout_s": 20}
    config["train"].update(total_steps=3, accumulation_steps=2, compile=True)
    config["data"]["vae_memo_mb"] = 1
    config["log"].update(sample_every=2, sample_prompts=["a red circle", "a blue square"], sample_steps=2)
    result = run([sys.executable, TRAIN, "--config", str(write_config(tmp_path / "train.yaml", config)),
                  "checkpoint.every=3"])
    assert result.returncode == 0, result.stderr[-5000:]
    step_dir = resolve_checkpoint(run_dir)
    assert step_dir.name == "step_0000003"
    state = load_rank_state(step_dir, 0)
    assert state["role"] == "model" and state["feeder"]["batches"] == 3 * 2  # 2 micro-batches a step
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3]
    assert read_metrics(run_dir)[-1]["val_loss"] > 0  # the colocated rank encoded its own validation batches
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_0000002_0.png", "step_0000002_1.png"]
    assert "loading the encoders for samples" not in result.stderr  # the samples used the feeder's
    # Its feeder's memo served the 4 validation images and the 3 x 2 micro-batches of 2, all of them new.
    assert re.search(r"VAE memo: 16 images kept \([\d.]+ MB\); 16 of the 16 images it served went", result.stderr)


def test_resume_on_another_topology_hands_over_the_data_position_and_the_training_state(reference_run, data_root,
                                                                                         tmp_path):
    """The reference run's last checkpoint (1 loader : 3 model ranks, 2 images each) continues in one colocated
    process drawing all 6 images itself: the weights, EMA, optimizer, schedule and step go on, the loader's
    sampler position is handed over (same order, so the data continues exactly), the random streams restart."""
    reference_dir, _, _ = reference_run
    run_dir = tmp_path / "run"
    shutil.copytree(reference_dir, run_dir, symlinks=True)
    config = base_config(data_root, run_dir)
    config["topology"] = {"colocated": True, "prefetch": 1, "timeout_s": 20}
    config["train"].update(total_steps=TOTAL_STEPS + 2, batch_size=6)
    result = run([sys.executable, TRAIN, "--config", str(write_config(tmp_path / "train.yaml", config)), "--resume"])
    assert result.returncode == 0, result.stderr[-5000:]
    assert (f"step {TOTAL_STEPS} was saved on another topology (loader -> model ranks {{0: [1, 2, 3]}} (WORLD_SIZE 4))"
            in result.stderr)
    assert "the data continues on a new plan" not in result.stderr
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, TOTAL_STEPS + 3))
    step_dir = resolve_checkpoint(run_dir)
    assert step_dir.name == f"step_{TOTAL_STEPS + 2:07d}"
    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["topology"] == {"world_size": 1, "colocated": True, "loader_to_model": {}}
    assert meta["images_per_step"] == 6  # 1 rank x 6 images, as 3 ranks x 2 before: no warning about it
    assert "images per optimizer step" not in result.stderr
    sampler = load_rank_state(step_dir, 0)["feeder"]["sampler"]
    assert sampler["epoch"] * sampler["batches_per_epoch"] + sampler["batches_used"] == TOTAL_STEPS + 2
    adam = load_trainer_state(step_dir)["optimizer"]["state"]
    assert {int(s["step"]) for s in adam.values()} == {TOTAL_STEPS + 2}  # the optimizer went on from step 6


def start_nodes(config: Path, endpoint: str, logs: list[Path]) -> list[subprocess.Popen]:
    """One node per log, the first hosting the rendezvous store: it is started alone and listening before
    the others start (on one machine, whichever agent binds the port first hosts it)."""
    first = start_node(config, endpoint, logs[0])
    host, port = endpoint.rsplit(":", 1)
    deadline = time.monotonic() + 120
    while True:
        assert first.poll() is None and time.monotonic() < deadline, logs[0].read_text()[-3000:]
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    return [first, *(start_node(config, endpoint, log) for log in logs[1:])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_finetune_from_a_checkpoint_at_a_higher_max_res(reference_run, data_root, tmp_path):
    reference_dir, _, _ = reference_run
    source = load_model(reference_dir, prefer_ema=False)
    run_dir = tmp_path / "run"
    config = base_config(data_root, run_dir)
    config["topology"] = {"colocated": True, "prefetch": 1, "timeout_s": 20}
    config["train"].update(total_steps=1, lr=1e-12, warmup_steps=0, lr_schedule="constant", min_lr=0.0)
    config["model"]["overrides"]["max_res"] = 128
    # Weights only (as save_weights writes them, or a checkpoint from elsewhere): with both resets, enough.
    weights_only = tmp_path / "weights_only"
    shutil.copytree(resolve_checkpoint(reference_dir), weights_only)
    (weights_only / TRAINER_STATE).unlink()
    config["checkpoint"].update(init_from=str(weights_only), reset_optimizer=True, reset_logger=True)
    result = run([sys.executable, TRAIN, "--config", str(write_config(tmp_path / "train.yaml", config))])
    assert result.returncode == 0, result.stderr[-5000:]
    tuned = load_model(run_dir, prefer_ema=False)
    assert tuned.mmdit_config.max_res == 128 and tuned.mmdit_config.max_res_orig == 64
    # One step at lr 1e-12 leaves the source weights (a fresh initialisation would zero the output layer).
    for a, b in zip(tuned.parameters(), source.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert source.final.linear.weight.abs().sum() > 0
    # Resuming the finetune reads its own checkpoint: the weights it started from may be gone by then.
    shutil.rmtree(weights_only)
    config["train"]["total_steps"] = 2
    result = run([sys.executable, TRAIN, "--config", str(write_config(tmp_path / "train.yaml", config)), "--resume"])
    assert result.returncode == 0, result.stderr[-5000:]
    assert resolve_checkpoint(run_dir).name == "step_0000002" and "finetuning from" not in result.stderr


def test_a_last_step_longer_than_timeout_s_does_not_fail_the_finished_loader(data_root, tmp_path):
    """The loader's part ends with its last send; the model rank then still trains what is queued and, here,
    samples for longer than topology.timeout_s. The loader's last wait must not time out meanwhile."""
    run_dir = tmp_path / "run"
    config = base_config(data_root, run_dir)
    config["data"]["holdout_fraction"] = 0.0
    config["train"] |= {"total_steps": 2, "warmup_steps": 1}
    config["checkpoint"]["every"] = 2
    config["topology"] = {"models_per_loader": 1, "prefetch": 8, "timeout_s": 6}
    config["log"] = {"progress": False, "sample_every": 2, "sample_prompts": ["a red circle"], "sample_steps": 2500}
    # 2500 sampling steps of the tiny model: 20-40 s on a 2-core box, where a 6 s last wait failed the loader.
    result = run(torchrun_command(2, write_config(tmp_path / "train.yaml", config)))
    assert result.returncode == 0, result.stderr[-5000:]
    assert resolve_checkpoint(run_dir).name == "step_0000002" and (run_dir / "samples").is_dir()
