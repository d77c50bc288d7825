"""A real `mlflow server` and a real headless Chromium, for the UI test and the docs screenshots.

Chromium and ChromeDriver come from Debian (`apt-get install chromium chromium-driver`, done by
`.ci/run`); selenium drives them through the given driver binary, so nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from pipeline import tracking

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
# This machine has no route out: without these flags Chromium spends its start trying to reach
# Google's update, sync and field-trial services.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(
    store_uri: str,
    log: Path,
    timeout_s: float = 120,
    *,
    artifacts_destination: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """`python -m pipeline ui`'s server command on a free loopback port; yields its base URL.

    `artifacts_destination` makes it proxy artifacts there (tests/servers.py's team server);
    `env` is added to this process's environment for the server only."""
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", **(env or {})}
    with log.open("w") as out:
        proc = subprocess.Popen(
            tracking.server_command(
                store_uri, "127.0.0.1", port, artifacts_destination=artifacts_destination
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not up after {timeout_s:.0f}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM a server's process group (started with start_new_session), SIGKILL after 20 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


@contextlib.contextmanager
def chromium(width: int = 1600, height: int = 1000) -> Iterator[object]:
    """A headless Chromium driven by selenium through Debian's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for binary in (CHROMIUM, CHROMEDRIVER):
        if not Path(binary).exists():
            raise RuntimeError(
                f"{binary} not found: install Debian's chromium and chromium-driver "
                "(sudo apt-get install chromium chromium-driver), or set CHROMIUM / CHROMEDRIVER"
            )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--window-size={width},{height}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_text(driver, *texts: str, timeout_s: float = 60) -> str:
    """Wait until the page's visible text holds every one of `texts`; return that text."""
    deadline = time.monotonic() + timeout_s
    body = ""
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            body = driver.find_element("tag name", "body").text
            if all(t in body for t in texts):
                return body
        time.sleep(0.5)
    missing = [t for t in texts if t not in body]
    raise AssertionError(f"page {driver.current_url} never showed {missing}; it showed:\n{body[:3000]}")


def open_page(driver, url: str, *texts: str, timeout_s: float = 60) -> str:
    """Load a UI route, close MLflow's assistant side panel, wait for `texts`."""
    driver.get(url)
    # The assistant panel opens itself on first load and takes a third of the width.
    driver.execute_script("window.localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")
    body = wait_for_text(driver, *texts, timeout_s=timeout_s)
    for button in driver.find_elements("css selector", "button[aria-label='Close']"):
        with contextlib.suppress(Exception):
            button.click()
    return body


def expand_run(driver, run_id: str) -> None:
    """Click the expander of a parent run's row in the runs table (shows its nested runs)."""
    cell = driver.find_element(
        "xpath", f"//div[@role='row' and @row-id='{run_id}']//div[@col-id='attributes.`Run Name`']"
    )
    buttons = cell.find_elements("tag name", "button")
    if not buttons:
        raise AssertionError(f"run {run_id} has no expander: it has no nested runs in the table")
    buttons[0].click()


def experiment_runs_url(base: str, experiment_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs"


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    runs = urllib.parse.quote(json.dumps(run_ids))
    experiments = urllib.parse.quote(json.dumps([experiment_id]))
    return f"{base}/#/compare-runs?runs={runs}&experiments={experiments}"


def model_url(base: str, name: str) -> str:
    return f"{base}/#/models/{urllib.parse.quote(name)}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def settle(seconds: float = 1.5) -> None:
    """Charts animate in after the text is there: give them a moment before a screenshot."""
    time.sleep(seconds)


def choose_parallel_coordinates(driver, add_params: list[str], metric: str) -> None:
    """In the compare view, plot `metric` (instead of the UI's default pick) and add params."""
    from selenium.webdriver.common.keys import Keys

    label = driver.find_element("xpath", "//*[normalize-space(text())='Metrics:']")
    params_select, metrics_select = label.find_elements("xpath", "../div[contains(@class, '-select ')]")[:2]

    def add(select, value: str) -> None:
        select.click()
        box = select.find_element("css selector", "input")
        box.send_keys(value)
        time.sleep(0.5)
        box.send_keys(Keys.ENTER)
        box.send_keys(Keys.ESCAPE)

    for remove in metrics_select.find_elements("css selector", "[class$='selection-item-remove']"):
        remove.click()
    add(metrics_select, metric)
    for param in add_params:
        add(params_select, param)
