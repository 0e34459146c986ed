"""A real `loramgr serve` process on a loopback port: SIGTERM drains; the bounded load test passes bit-exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from test_serve_support import ROOT, free_port, png_b64, reaped, serve_workspace, start_server


@pytest.fixture(scope="module")
def ws(tiny_workspace, tmp_path_factory):
    return serve_workspace(tiny_workspace, tmp_path_factory)


def test_sigterm_drains_in_flight_requests_and_exits_0(ws):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with reaped(start_server(ws, port)) as proc:
        slow = {"prompt": "a house", "image": png_b64(ws.home / "house.png"), "resolution": 256, "steps": 30,
                "loras": [{"name": "sv_a", "weight": 0.6}]}
        results = []

        def send():
            results.append(httpx.post(f"{url}/v1/generate", json=slow, timeout=120))

        threads = [threading.Thread(target=send) for _ in range(2)]  # one running, one queued
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while not {"loramgr_in_flight 1.0", "loramgr_queue_depth 1.0"} <= set(httpx.get(f"{url}/metrics").text
                                                                               .splitlines()):
            assert time.monotonic() < deadline, "the two requests never were one running, one queued"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(f"{url}/v1/generate", json=slow, timeout=10)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
        assert "Retry-After" in refused.headers
        assert httpx.get(f"{url}/readyz").status_code == 503
        assert httpx.get(f"{url}/healthz").status_code == 200
        for t in threads:
            t.join(120)
        assert [r.status_code for r in results] == [200, 200]
        assert all(r.json()["images"] for r in results)
        assert proc.wait(60) == 0


def test_bounded_load_test_is_bit_exact_and_grouping_swaps_less(ws, tmp_path):
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--home", str(ws.home), "--clients", "4",
         "--requests", "16", "--time-limit", "240", "--steps", "2", "--resolution", "64",
         "--sets", "base", "sv_a:0.8", "sv_b:0.6,sv_hed", "sv_a:0.5,sv_b:0.5", "--json", str(report_path)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    for mode in ("grouping", "fifo"):
        run = report["modes"][mode]
        assert run["requests"] == 16 and run["mismatches"] == 0 and run["errors"] == 0, run
    assert report["modes"]["grouping"]["swaps"] <= report["modes"]["fifo"]["swaps"]
