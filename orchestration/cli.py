"""The `sd3` command: data pipeline, lineage UI, sampling and evaluation."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

from etl.storage import write_atomic
from trainer.eval_cli import add_parser as add_eval_parser
from trainer.sample_cli import add_parser as add_sample_parser

WORKSPACE = Path(__file__).resolve().parents[1] / "workspace.yaml"
# No telemetry: this toolkit runs on machines that reach nothing but package registries. The etl
# package's warnings (a repaired TSV line, a caption batch that failed) go to each run's event log, in the UI.
# Run monitoring: a run the daemon launched whose run worker is killed (OOM, SIGKILL) is failed by the code
# server that spawned it, but the recaption pool slot its step claimed stays taken until the monitoring
# daemon frees the slots of ended runs (dagster/_daemon/monitoring/concurrency.py). The default run launcher
# can neither check a worker's health nor resume a run, so resuming is off (Dagster refuses the instance
# otherwise). A run worker imports the whole pipeline before its run starts: minutes on a busy machine, so
# the start timeout is well above Dagster's 180 s.
INSTANCE_SETTINGS = {
    "telemetry": {"enabled": False},
    "python_logs": {"managed_python_loggers": ["etl"]},
    "run_monitoring": {"enabled": True, "poll_interval_seconds": 10, "free_slots_after_run_end_seconds": 10,
                       "max_resume_run_attempts": 0, "start_timeout_seconds": 600},
}


def dagster_home() -> Path:
    """DAGSTER_HOME, defaulting to ./.dagster so runs made here show up in `sd3 ui` / `dagster dev`. Its
    dagster.yaml gets each section of INSTANCE_SETTINGS it lacks (a home made by an older version lacks the
    newer ones); a section already there is the user's and stays as it is."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster").resolve()
    os.environ["DAGSTER_HOME"] = str(home)  # Dagster takes only an absolute path
    home.mkdir(parents=True, exist_ok=True)
    settings = home / "dagster.yaml"
    text = settings.read_text() if settings.exists() else ""
    present = yaml.safe_load(text) or {}
    missing = {name: value for name, value in INSTANCE_SETTINGS.items() if name not in present}
    if missing:
        # Appended, not rewritten: the user's comments and layout survive.
        separator = "\n" if text and not text.endswith("\n") else ""
        added = text + separator + yaml.safe_dump(missing, sort_keys=False)
        write_atomic(settings, lambda f: f.write(added.encode()))  # a Dagster process may be reading it
    return home


def cmd_data_run(args) -> int:
    from orchestration.run import PipelineError, run_pipeline
    from etl.config import ConfigError

    dagster_home()
    try:
        report = run_pipeline(args.config, force=True if args.force == [] else (args.force or False))
    except (PipelineError, ConfigError, FileNotFoundError, ValueError) as err:
        print(f"sd3 data run: {err}", file=sys.stderr)
        return 1
    print(report.table())
    return 0


def cmd_demo_source(args) -> int:
    from etl.demo_source import make_demo_source

    path = make_demo_source(Path(args.out), args.n, args.base_url, seed=args.seed)
    print(f"wrote {args.n} demo images and {path}")
    return 0


def cmd_serve(args) -> int:
    from etl.serve import serve_forever

    serve_forever(Path(args.directory), args.port)
    return 0


def cmd_ui(args) -> int:
    from dagster import DagsterInstance

    from etl.config import PipelineConfig
    from orchestration.definitions import config_path
    from orchestration.run import recaption_pool_limit

    home = dagster_home()
    with DagsterInstance.get() as instance:
        limit = recaption_pool_limit(PipelineConfig.from_yaml(config_path()))
        instance.event_log_storage.set_concurrency_slots("recaption", limit)
    print(f"Dagster UI on http://127.0.0.1:{args.port} (DAGSTER_HOME={home})")
    command = ["dagster", "dev", "-w", str(WORKSPACE), "-h", "127.0.0.1", "-p", str(args.port)]
    return subprocess.call([str(Path(sys.executable).parent / command[0]), *command[1:]])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd3", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="the data pipeline").add_subparsers(dest="data_command", required=True)
    run = data.add_parser("run", help="materialize, through Dagster, every asset for every partition not up to date")
    run.add_argument("--config", required=True, help="pipeline YAML (see configs/data/)")
    run.add_argument("--force", nargs="*", metavar="STAGE",
                     help="materialize these stages (asset names; none given: every stage) for every partition, "
                          "up to date or not")
    run.set_defaults(func=cmd_data_run)

    demo = data.add_parser("demo-source", help="generate the coloured-shapes demo dataset")
    demo.add_argument("--out", required=True)
    demo.add_argument("--n", type=int, default=1000)
    demo.add_argument("--base-url", default="http://127.0.0.1:8765", help="where `sd3 data serve` will serve --out")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo_source)

    serve = data.add_parser("serve", help="serve a folder on 127.0.0.1 (for the demo source)")
    serve.add_argument("directory")
    serve.add_argument("--port", type=int, default=8765)
    serve.set_defaults(func=cmd_serve)

    ui = commands.add_parser("ui", help="the Dagster lineage UI (dagster dev) on this project's instance")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(func=cmd_ui)

    add_sample_parser(commands)
    add_eval_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
