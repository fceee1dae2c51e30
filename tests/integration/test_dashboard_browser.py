"""The status page of a running `potluck swarm`, end to end: the JSON API and /metrics over real HTTP, and the
dashboard in a real headless Chromium (Debian's chromium and chromium-driver), with a screenshot."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.swarm_helpers import free_port, p2pd_pids, wait_until

pytestmark = [pytest.mark.network, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


def _browser():  # noqa: ANN202 - a selenium WebDriver, imported lazily
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1600",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.timeout(300)
def test_the_dashboard_of_a_running_swarm_shows_its_rounds_in_a_real_browser(tmp_path: Path) -> None:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
    # Prepare: a swarm long enough to watch, its status page on a free port
    before = p2pd_pids()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "potluck", "swarm", "--peers", "2", "--rounds", "40", "--local-steps", "10"]
    command += ["--set", "data.max_bytes=400000", "--http-port", str(port)]
    swarm = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, start_new_session=True
    )
    driver = None
    try:
        wait_until(
            lambda: (r := _get(f"{base}/api/status")) is not None and len(r.json()["loss_history"]) >= 3,
            timeout_s=180,
            what="two rounds on /api/status",
        )
        # Execute / Assert: the JSON API, as `curl localhost:PORT/api/status` sees it
        status = _get(f"{base}/api/status").json()
        assert status["round"] >= 2 and status["phase"] == "collecting"
        assert all(isinstance(p["val_loss"], float) for p in status["loss_history"])
        peers = _get(f"{base}/api/peers").json()
        assert len(peers) == 2 and all(p["accepted"] >= 1 for p in peers)
        assert _get(f"{base}/api/health").json()["ok"] is True
        families = {f.name: f for f in text_string_to_metric_families(_get(f"{base}/metrics").text)}
        assert families["potluck_round"].samples[0].value >= 2
        assert _get(f"{base}/api/ledger/head").json()["round"] >= 1

        # the dashboard in Chromium: a loss curve with a point per round, a peers table with real rows
        driver = _browser()
        driver.get(base + "/")
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(driver, 60).until(
            lambda d: int(d.find_element("tag name", "body").get_attribute("data-rounds") or 0) >= 3
        )
        points = driver.find_element("id", "loss-line").get_attribute("points").split()
        assert len(points) >= 3
        rows = driver.find_elements("css selector", "#peers-table tbody tr")
        fingerprints = {p["fingerprint"] for p in peers}
        assert len(rows) == 2 and all(any(f in row.text for f in fingerprints) for row in rows)
        assert "/p2p/" in driver.find_element("id", "join-command").text
        assert driver.find_elements("css selector", "#leaderboard-table tbody tr")
        screenshot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
        (tmp_path / "status.json").write_text(json.dumps(status))
    finally:
        if driver is not None:
            driver.quit()
        if swarm.poll() is None:
            os.kill(swarm.pid, signal.SIGINT)
            try:
                swarm.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(swarm.pid, signal.SIGKILL)
                swarm.wait()
    wait_until(lambda: not (p2pd_pids() - before), timeout_s=30, what="every daemon of the swarm to exit")
    wait_until(lambda: _get(f"{base}/api/health") is None, timeout_s=10, what="the status page to go with the swarm")
