"""A real browser on the real lineage UI: the Dagster webserver on loopback, driven by headless Chromium.

Chromium and its driver are Debian packages, installed on first use when missing; Selenium drives them
(its waits fit a React app that renders after its GraphQL queries return).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKSPACE = REPO / "workspace.yaml"
CHROMIUM_PACKAGES = ("chromium", "chromium-driver")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
)
# The code location is loaded in a gRPC subprocess that imports torch and the whole pipeline: slow on a
# busy 2-core machine.
WEBSERVER_START_TIMEOUT = 180.0
LOCATION_QUERY = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus " \
                 "locationOrLoadError { __typename ... on PythonError { message } } } } } }"


def ensure_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing the Debian packages when either is missing."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip(f"chromium/chromedriver are not installed and apt-get is unavailable to install "
                    f"{' '.join(CHROMIUM_PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in ([apt, "update", "-q"], [apt, "install", "-y", "-q", "--no-install-recommends", *CHROMIUM_PACKAGES]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        raise RuntimeError(f"installed {' '.join(CHROMIUM_PACKAGES)} but chromium/chromedriver are not on PATH")
    return chromium, driver


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def graphql(base_url: str, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{base_url}/graphql", data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.loads(response.read())
    if body.get("errors"):
        raise RuntimeError(f"GraphQL errors: {body['errors']}")
    return body["data"]


def _wait_until_loaded(base_url: str, process: subprocess.Popen, log: Path, deadline: float) -> None:
    """Until the webserver answers and its code location has loaded (a load error is raised, not waited on)."""
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            entries = graphql(base_url, LOCATION_QUERY)["workspaceOrError"]["locationEntries"]
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            entries = []
        for entry in entries:
            location = entry["locationOrLoadError"]
            if location and location["__typename"] == "PythonError":
                raise RuntimeError(f"code location {entry['name']} failed to load: {location['message']}")
        if entries and all(e["loadStatus"] == "LOADED" for e in entries):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{process.args[0]} not ready at {base_url} after {WEBSERVER_START_TIMEOUT:.0f} s:\n"
                               f"{log.read_text()[-4000:]}")
        time.sleep(1.0)


@contextmanager
def dagster_webserver(dagster_home: Path, pipeline_config: Path, log: Path, daemon: bool = False) -> Iterator[str]:
    """Serve the project's workspace on 127.0.0.1 over ``dagster_home``; yields the base URL. ``daemon``: run
    `dagster dev` instead, which also starts the daemon that evaluates sensors and schedules and launches runs."""
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(Path(dagster_home).resolve()),
           "SD3_PIPELINE_CONFIG": str(Path(pipeline_config).resolve())}
    bin_dir = Path(sys.executable).parent
    server = [str(bin_dir / "dagster"), "dev"] if daemon else [str(bin_dir / "dagster-webserver")]
    command = [*server, "-w", str(WORKSPACE), "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "w") as out:
        # Its own session, so stopping it also stops the code server it spawned.
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_loaded(base_url, process, log, time.monotonic() + WEBSERVER_START_TIMEOUT)
        yield base_url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def headless_chromium(user_data_dir: Path, size: tuple[int, int] = (1600, 1000)):
    """A Selenium-driven headless Chromium with a throwaway profile; yields the WebDriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = ensure_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", f"--window-size={size[0]},{size[1]}"):
        options.add_argument(flag)
    # An explicit driver path: Selenium would otherwise try to download one.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
