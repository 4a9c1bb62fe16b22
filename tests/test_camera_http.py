"""`edge-quq camera --serve`: the live view in a real headless Chromium (Debian `chromium` + `chromium-driver`)."""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import tempfile
import urllib.request

import numpy as np
import pytest

from camera_util import free_port, start_camera, stop, wait_for, write_folder

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@contextlib.contextmanager
def chromium(url: str):
    """A headless Chromium on `url` with a throw-away profile; quit however the test ends."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory() as profile:
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
            opts.add_argument(a)
        driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
        try:
            driver.set_page_load_timeout(30)
            driver.get(url)
            yield driver
        finally:
            driver.quit()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium and chromium-driver are not installed")
def test_live_view_in_chromium(tmp_path):
    pytest.importorskip("selenium")
    write_folder(tmp_path / "imgs", 20)
    port = free_port()
    proc = start_camera("--source", str(tmp_path / "imgs"), "--loop", "--max-fps", "15", "--serve", f"127.0.0.1:{port}",
                        "--stats-interval", "0.5", "-T", "10", "--threads", "1", "-q")
    base = f"http://127.0.0.1:{port}/"
    try:
        def up() -> bool:
            try:
                return json.loads(_get(base + "status.json"))["processed"] > 0
            except OSError:
                return False

        assert wait_for(up, 60), proc.stderr.read() if proc.poll() is not None else "no status"
        status = json.loads(_get(base + "status.json"))
        assert status["state"] == "running" and status["last"]["decision"] in ("keep", "ignore") and 0 <= status["ignore_rate"] <= 1
        assert _get(base + "frame.jpg")[:2] == b"\xff\xd8"

        with chromium(base) as driver:
            assert "edge-quq" in driver.title
            # The MJPEG <img> shows decoded frames (annotated frames are at least 320 px wide) ...
            assert wait_for(lambda: driver.execute_script("return document.getElementById('stream').naturalWidth") >= 320, 20)
            # ... and the page's counters come from /status.json and move.
            assert wait_for(lambda: driver.find_element("id", "processed").text not in ("", "-"), 10)
            first = int(driver.find_element("id", "processed").text)
            assert wait_for(lambda: int(driver.find_element("id", "processed").text) > first, 10)
            assert driver.find_element("id", "ignore_rate").text.endswith("%")
            assert driver.find_element("id", "state").text == "running"
            assert json.loads(_get(base + "status.json"))["clients"] >= 1
        assert stop(proc, signal.SIGTERM) < 1.5
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_status_reads_the_loop_stats():
    """/status.json shows the run's LoopStats (the numbers of the stats file), not a count of its own."""
    import edge_quq
    from edge_quq.loopstats import LoopStats
    from edge_quq.sinks import FrameResult, open_output

    predictor = edge_quq.Predictor.from_bundle()
    files = sorted(p for p in edge_quq.SAMPLES_DIR.iterdir() if p.suffix == ".png")
    stats = LoopStats("samples")
    port = free_port()
    with open_output(f"http://127.0.0.1:{port}", stats=stats, source="samples", log=lambda m: None) as view:
        for i, f in enumerate(files):
            p = predictor.predict(str(f))
            stats.record(p, index=i)
            if i < 3:  # the view is shown only some frames: its counters must not depend on that
                view.emit(FrameResult.make(i, 0.0, np.zeros((28, 28, 3), np.uint8), p))
        st = json.loads(_get(f"http://127.0.0.1:{port}/status.json"))
        assert _get(f"http://127.0.0.1:{port}/frame.jpg")[:2] == b"\xff\xd8"
    lat = stats.latency()["total"]
    assert st["processed"] == len(files) == stats.processed and st["ignored"] == stats.ignored
    assert st["latency_ms_p50"] == lat["p50"] and st["latency_ms_p90"] == lat["p90"]
    assert st["last"]["frame"] == len(files) - 1 and st["state"] == "running"
