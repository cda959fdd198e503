"""The demo learning test's training, started as the test session starts and run at the lowest CPU priority.

The demo's training (configs/train/demo.yaml: torchrun, 1 loader + 3 model ranks, 2400 steps) keeps both
cores of a 2-core box busy for 8-17 minutes, a third of the suite's time when it ran on its own. Started
before the first test with every process and autogroup at nice 19, it runs on what the other tests leave
idle (daemon ticks, servers starting, waits on subprocesses) and gives way to them whenever they compute:
a nice-19 autogroup gets about 1.5% of a core against a busy one at nice 0. Its result does not depend
on its speed: the seed fixes every batch, noise draw and step.

`python -m tests.demo_training WORKDIR` builds the learning test's data set in WORKDIR/data, then trains
the demo config into WORKDIR/run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.processes import descendants, kill_tree

REPO = Path(__file__).resolve().parents[1]
DATASET_IMAGES = 360  # every colour x shape x background ten times
LOWEST_PRIORITY = 19


class BackgroundTraining:
    """One demo training running in the background; ``stop`` ends all of it and removes its folder."""

    def __init__(self, workdir: Path, process: subprocess.Popen):
        self.workdir = workdir
        self.run_dir = workdir / "run"
        self.log = workdir / "train.log"
        self._process = process

    @classmethod
    def start(cls) -> BackgroundTraining:
        workdir = Path(tempfile.mkdtemp(prefix="sd3-demo-training-"))
        # No DAGSTER_HOME: this run's checkpoints must not show up in the developer's lineage UI.
        env = {name: value for name, value in os.environ.items() if name != "DAGSTER_HOME"} | {"OMP_NUM_THREADS": "1"}
        with open(workdir / "train.log", "wb") as log:
            process = subprocess.Popen(
                ["nice", "-n", str(LOWEST_PRIORITY), sys.executable, "-m", "tests.demo_training", str(workdir)],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        _lower_autogroup(process.pid)
        return cls(workdir, process)

    def wait(self, timeout_s: float) -> int:
        """The training's exit status; raises ``subprocess.TimeoutExpired`` past ``timeout_s``."""
        return self._process.wait(timeout_s)

    def log_tail(self, chars: int = 5000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self._process.poll() is None:
            kill_tree(self._process.pid)  # torchrun starts each rank in a session of its own
            self._process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _lower_autogroup(pid: int) -> None:
    """Nice a process's autogroup: with autogroups on (most desktop and VM kernels), the scheduler first
    shares the CPU between sessions, and a process's own nice counts only within its session."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(LOWEST_PRIORITY))
    except OSError:  # no autogroups in this kernel, or the process has ended
        pass


def supervise(training: subprocess.Popen, parent: int) -> int | None:
    """Wait for ``training``, lowering each new process's autogroup; None, with the training ended, if
    ``parent`` (pytest) is gone first, as when a timeout or SIGKILL ended it before its session could finish."""
    lowered: set[int] = set()
    while training.poll() is None:
        if os.getppid() != parent:
            kill_tree(training.pid)
            training.wait()
            return None
        # Each rank starts in a session, so an autogroup, of its own (torch.distributed.elastic): lower it too.
        for pid in set(descendants(os.getpid())) - lowered:
            _lower_autogroup(pid)
            lowered.add(pid)
        time.sleep(1)
    return training.returncode


def main(workdir: Path) -> int:
    from scripts.demo import TRAIN_CONFIG, demo_resolution, train_command
    from tests.trainer.demo_dataset import build_demo_dataset

    parent = os.getppid()
    root = build_demo_dataset(workdir / "data", n=DATASET_IMAGES, resolution=demo_resolution())
    training = subprocess.Popen(train_command(TRAIN_CONFIG, f"data.root={root}", f"checkpoint.dir={workdir / 'run'}",
                                              "log.progress=false"))
    returncode = supervise(training, parent)
    if returncode is None:
        shutil.rmtree(workdir, ignore_errors=True)
        return 1
    return returncode


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
