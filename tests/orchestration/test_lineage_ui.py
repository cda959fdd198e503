"""The lineage UI in a real browser: a finished demo pipeline run and one recorded checkpoint, served by
dagster-webserver and read back from what headless Chromium renders.

Expected values come from the pipeline's own output files, never from Dagster, so the UI has to show
what the pipeline really wrote.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from etl.demo_source import make_demo_source
from etl.index import bucket_histogram, dataset_version
from etl.layout import DataLayout
from etl.serve import serve_directory
from etl.storage import read_parquet, write_atomic
from orchestration.lineage import record_checkpoint
from orchestration.run import run_pipeline
from tests.orchestration.browser import REPO, dagster_webserver, ensure_chromium, headless_chromium

pytestmark = pytest.mark.slow

PIPELINE_ASSETS = ("url_shards", "downloaded", "content_hashes", "filtered", "recaptioned", "bucketed",
                   "bucket_index")
# Every dependency the graph must draw, as (upstream, downstream).
LINEAGE = (
    ("url_shards", "downloaded"), ("downloaded", "content_hashes"), ("downloaded", "filtered"),
    ("content_hashes", "filtered"), ("filtered", "recaptioned"), ("recaptioned", "bucketed"),
    ("bucketed", "bucket_index"), ("bucket_index", "checkpoint"),
)
RESOLUTION = 64
IMAGES, SHARD_SIZE = 24, 8
CHECKPOINT_STEP = 10
SCREENSHOT = REPO / "docs" / "lineage.png"
# The React app renders after its GraphQL queries return; on a busy 2-core machine that takes seconds.
RENDER_TIMEOUT = 60
# The upstream lineage of `checkpoint`: every asset of the pipeline, the whole chain in one graph.
CHECKPOINT_LINEAGE = "/assets/checkpoint?view=lineage&lineageScope=upstream&lineageDepth=10"
# Wide enough that the zoomed-to-fit graph draws full nodes (status, partitions, checks), not bare names.
WINDOW = (2400, 1000)


@pytest.fixture(scope="module")
def finished_home(tmp_path_factory):
    """A DAGSTER_HOME holding a finished demo pipeline run and one recorded checkpoint."""
    ensure_chromium()  # installs or skips before minutes of pipeline, not after
    tmp = tmp_path_factory.mktemp("lineage_ui")
    home = tmp / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    source = tmp / "source"
    source.mkdir()
    config_path = tmp / "pipeline.yaml"
    with pytest.MonkeyPatch.context() as env, serve_directory(source) as base_url:
        # run_pipeline sets SD3_PIPELINE_CONFIG for its executor's children; undone when the run is over.
        env.setenv("DAGSTER_HOME", str(home))
        env.setenv("SD3_PIPELINE_CONFIG", str(config_path))
        urls = make_demo_source(source, IMAGES, base_url)
        config_path.write_text(yaml.safe_dump({
            "root": str(tmp / "pipeline"),
            "sources": [{"name": "demo", "kind": "laion_parquet", "path": str(urls), "url_col": "url",
                         "caption_col": "caption"}],
            "shard_size": SHARD_SIZE,
            "download": {"processes": 1, "threads": 8, "timeout": 10, "retries": 0},
            "filter": {"min_side": 64, "max_punsafe": 0.5, "max_pwatermark": 0.8},
            "recaption": {"backend": "alt-text"},
            "buckets": {"resolutions": [RESOLUTION], "format": "png"},
            "concurrency": 2,
        }))
        report = run_pipeline(config_path, log=lambda _: None)
        assert report.balanced, report.table()
        layout = DataLayout(tmp / "pipeline")
        index = read_parquet(layout.index(RESOLUTION))
        step_dir = tmp / "checkpoints" / f"step_{CHECKPOINT_STEP:08d}"
        step_dir.mkdir(parents=True)
        version = dataset_version(index)
        assert record_checkpoint(step_dir, {"step": CHECKPOINT_STEP, "dataset_version": version}, home)
    return dict(home=home, config=config_path, layout=layout, index=index, version=version, step_dir=step_dir)


@pytest.fixture(scope="module")
def browser(finished_home, tmp_path_factory):
    """(driver, base URL): headless Chromium on the webserver serving the finished home."""
    tmp = tmp_path_factory.mktemp("browser")
    with dagster_webserver(finished_home["home"], finished_home["config"], tmp / "webserver.log") as base_url, \
            headless_chromium(tmp / "chromium-profile", WINDOW) as driver:
        driver.get(base_url + CHECKPOINT_LINEAGE)
        dismiss_community_dialog(driver)
        yield driver, base_url


def dismiss_community_dialog(driver) -> None:
    """A fresh instance opens Dagster's 'Join the community' dialog over the page a second after load;
    skipping it (as a user would) records that it was seen, so it does not come back."""
    try:
        skip = WebDriverWait(driver, 15).until(
            lambda d: next(iter(d.find_elements(By.XPATH, "//div[@role='dialog']//button[normalize-space()='Skip']")),
                           None))
    except TimeoutException:
        return
    skip.click()
    WebDriverWait(driver, RENDER_TIMEOUT).until_not(
        lambda d: d.find_elements(By.XPATH, "//div[@role='dialog']//button[normalize-space()='Skip']"))


def open_page(browser, path: str, *texts: str) -> str:
    """Open ``path`` and wait until every one of ``texts`` is rendered; returns the page's visible text."""
    driver, base_url = browser
    driver.get(base_url + path)

    def rendered(d):
        body = d.find_element(By.TAG_NAME, "body").text
        return body if all(text in body for text in texts) else None

    try:
        return WebDriverWait(driver, RENDER_TIMEOUT).until(rendered)
    except TimeoutException:
        body = driver.find_element(By.TAG_NAME, "body").text
        missing = [t for t in texts if t not in body]
        raise AssertionError(f"{path}: never rendered {missing}; the page shows:\n{body[:3000]}") from None


def metadata_value(driver, key: str) -> str:
    """The value the metadata table shows for ``key``: the last non-empty cell of its row (the asset
    overview has key, timestamp, value; the partition panel has key, value)."""
    rows = driver.find_elements(By.XPATH, f"//tr[td[1][normalize-space()='{key}']]")
    assert rows, f"no metadata row {key!r} on {driver.current_url}"
    cells = [c.text.strip() for c in rows[0].find_elements(By.XPATH, "./td")[1:]]
    values = [c for c in cells if c]
    assert values, f"metadata row {key!r} has no value on {driver.current_url}"
    return values[-1]


def graph_nodes(driver) -> dict[str, tuple[tuple[float, float, float, float], str]]:
    """Asset name -> ((x, y, width, height) in SVG units, visible text) of its node in the lineage graph."""
    nodes = {}
    for node in driver.find_elements(By.XPATH, "//*[local-name()='foreignObject']"
                                                "[.//div[contains(@class, 'AssetNode_assetName')]]"):
        names = node.find_elements(By.XPATH, ".//div[contains(@class, 'AssetNode_assetName')]")
        box = tuple(float(node.get_attribute(a)) for a in ("x", "y", "width", "height"))
        nodes[names[0].text.strip()] = (box, node.text)
    return nodes


def edges(driver) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """(start, end) of every drawn arrow in the lineage graph; the arrow head is at the end."""
    ends = []
    for path in driver.find_elements(By.XPATH, "//*[local-name()='path'][@marker-end]"):
        numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", path.get_attribute("d"))]
        ends.append(((numbers[0], numbers[1]), (numbers[-2], numbers[-1])))
    return ends


def wait_until_still(driver) -> None:
    """Until the graph has finished zooming to fit: its nodes' on-screen boxes stay put between polls."""
    seen = []

    def still(d):
        seen.append([n.rect for n in d.find_elements(By.XPATH, "//div[contains(@class, 'AssetNode_assetName')]")])
        return len(seen) > 1 and seen[-1] == seen[-2]

    WebDriverWait(driver, RENDER_TIMEOUT, poll_frequency=0.5).until(still)


def touches(point: tuple[float, float], box: tuple[float, float, float, float], slack: float = 20.0) -> bool:
    x, y = point
    bx, by, width, height = box
    return bx - slack <= x <= bx + width + slack and by - slack <= y <= by + height + slack


def test_graph_shows_every_asset_with_checkpoint_downstream_of_the_index(browser, finished_home):
    driver, _ = browser
    open_page(browser, CHECKPOINT_LINEAGE, "data", "training")
    shards = len(finished_home["layout"].shards())
    partition_counts = {name: f"{shards} partitions" for name in ("downloaded", "filtered", "recaptioned", "bucketed")}
    partition_counts["bucket_index"] = "1 partition"

    def drawn_with_status(d):
        """Nodes fill in their status and partition rows from later queries; until then they say 'Loading'."""
        nodes = graph_nodes(d)
        ready = set(nodes) >= {*PIPELINE_ASSETS, "checkpoint"} and \
            all("Loading" not in text for _, text in nodes.values()) and \
            all(count in nodes[name][1] for name, count in partition_counts.items())
        return nodes if ready else None

    try:
        WebDriverWait(driver, RENDER_TIMEOUT).until(drawn_with_status)
    except TimeoutException:
        shown = {name: text for name, (_, text) in graph_nodes(driver).items()}
        raise AssertionError(f"the graph never showed every asset with {partition_counts}: {shown}") from None
    wait_until_still(driver)
    nodes = graph_nodes(driver)
    assert set(nodes) == {*PIPELINE_ASSETS, "checkpoint"}, sorted(nodes)
    boxes = {name: box for name, (box, _) in nodes.items()}

    drawn = edges(driver)

    def arrow(upstream: str, downstream: str) -> bool:
        return any(touches(start, boxes[upstream]) and not touches(start, boxes[downstream])
                   and touches(end, boxes[downstream]) and not touches(end, boxes[upstream])
                   for start, end in drawn)

    for upstream, downstream in LINEAGE:
        assert arrow(upstream, downstream), (upstream, downstream, boxes, drawn)
    assert not arrow("checkpoint", "bucket_index")

    # Written only now that the graph it shows has been checked.
    png = driver.get_screenshot_as_png()
    write_atomic(SCREENSHOT, lambda f: f.write(png)).chmod(0o644)


def test_checkpoint_page_shows_its_upstream_index_and_metadata(browser, finished_home):
    driver, _ = browser
    body = open_page(browser, "/assets/checkpoint", "Upstream assets", "dataset_version")
    upstream = body.split("Upstream assets", 1)[1].split("Downstream assets", 1)[0].split()
    assert upstream == ["bucket_index"], body
    assert metadata_value(driver, "step") == str(CHECKPOINT_STEP)
    assert metadata_value(driver, "dataset_version") == finished_home["version"]
    assert metadata_value(driver, "path") == str(finished_home["step_dir"])


def test_partitions_are_shown(browser, finished_home):
    shards = finished_home["layout"].shards()
    assert len(shards) == IMAGES // SHARD_SIZE
    for asset in ("downloaded", "filtered", "recaptioned"):
        body = open_page(browser, f"/assets/{asset}?view=partitions", *shards)
        assert f"Materialized ({len(shards)})" in body and "Missing (0)" in body, body
    body = open_page(browser, "/assets/bucketed?view=partitions", str(RESOLUTION), *shards)
    assert f"Materialized ({len(shards)})" in body and "Missing (0)" in body, body
    body = open_page(browser, "/assets/bucket_index?view=partitions", str(RESOLUTION))
    assert "Materialized (1)" in body and "Missing (0)" in body, body


def test_index_page_shows_rows_histogram_and_dataset_version(browser, finished_home):
    driver, _ = browser
    index = finished_home["index"]
    open_page(browser, "/assets/bucket_index", "bucket_histogram", "dataset_version")
    assert int(metadata_value(driver, "rows")) == index.num_rows == IMAGES
    assert json.loads(metadata_value(driver, "bucket_histogram")) == bucket_histogram(index)
    assert metadata_value(driver, "dataset_version") == finished_home["version"]


def test_shard_pages_show_their_latest_materialization(browser, finished_home):
    driver, _ = browser
    layout = finished_home["layout"]
    for shard in layout.shards():
        open_page(browser, f"/assets/downloaded?view=partitions&partition={shard}", "rows_out")
        kept = read_parquet(layout.downloaded(shard), columns=["key"]).num_rows
        assert int(metadata_value(driver, "rows_in")) == SHARD_SIZE
        assert int(metadata_value(driver, "rows_out")) == kept

        # A multi-partition key is its dimension keys in dimension-name order (resolution, shard).
        open_page(browser, f"/assets/bucketed?view=partitions&partition={RESOLUTION}%7C{shard}", "bucket_histogram")
        bucketed = read_parquet(layout.bucketed(RESOLUTION, shard), columns=["key", "height", "width"])
        assert int(metadata_value(driver, "rows_out")) == bucketed.num_rows
        assert json.loads(metadata_value(driver, "bucket_histogram")) == bucket_histogram(bucketed)
