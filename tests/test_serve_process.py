"""SIGTERM drains (in this process with a gate, and a real `loramgr serve` process); the bounded load test.

Nothing here waits on a sleep: the drain is checked against a generation held on an event,
and the real process's checks wait on states (/metrics, the exit) or hold whatever the timing.
"""

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
import uvicorn

from serve_support import ROOT, free_port, png_b64, reaped, serve_workspace, start_server


@pytest.fixture(scope="module")
def ws(tiny_workspace, tmp_path_factory):
    return serve_workspace(tiny_workspace, tmp_path_factory)


def _until(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_drain_refuses_new_requests_and_finishes_accepted_ones(ws):
    """DrainingServer.handle_exit (what SIGTERM calls) while one generation is held on a gate and one is queued."""
    from loramgr.serve import ServeConfig, create_app
    from loramgr.serve.app import Service
    from loramgr.serve.server import DrainingServer

    port = free_port()
    config = ServeConfig(port=port)
    url = f"http://127.0.0.1:{port}"
    service = Service(ws, config)
    server = DrainingServer(uvicorn.Config(create_app(ws, config, service), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on", timeout_graceful_shutdown=None),
                            service)
    gate, run = threading.Event(), service.engine.run

    def gated_run(job):
        gate.wait()  # set below, after every check of the draining server
        return run(job)

    service.engine.run = gated_run
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    body = {"prompt": "a house", "image": png_b64(ws.home / "house.png"), "resolution": 64, "steps": 2}
    results = []
    senders = [threading.Thread(target=lambda: results.append(httpx.post(f"{url}/v1/generate", json=body,
                                                                         timeout=300))) for _ in range(2)]
    try:
        _until(lambda: server.started or not thread.is_alive(), "the server did not start")
        assert thread.is_alive()
        for sender in senders:
            sender.start()
        _until(lambda: service.scheduler.stats.running == 1 and service.scheduler.depth == 1,
               "the two requests never were one running, one queued")
        server.handle_exit(signal.SIGTERM, None)
        refused = httpx.post(f"{url}/v1/generate", json=body, timeout=60)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
        assert "Retry-After" in refused.headers
        assert httpx.get(f"{url}/readyz").status_code == 503
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert not server.should_exit and results == []  # still draining: the accepted requests are pending
    finally:
        gate.set()
        for sender in senders:
            sender.join(300)
    thread.join(300)
    assert not thread.is_alive(), "the server did not exit after the drain"
    assert [r.status_code for r in results] == [200, 200]
    assert all(r.json()["images"] for r in results)


def test_sigterm_drains_in_flight_requests_and_exits_0(ws):
    """The real process: SIGTERM with one request running and one queued; both answered, exit code 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with reaped(start_server(ws, port, "--log-level", "info")) as proc:
        slow = {"prompt": "a house", "image": png_b64(ws.home / "house.png"), "resolution": 128, "steps": 10,
                "loras": [{"name": "sv_a", "weight": 0.6}]}
        results = []

        def send():
            results.append(httpx.post(f"{url}/v1/generate", json=slow, timeout=300))

        threads = [threading.Thread(target=send) for _ in range(2)]  # one running, one queued
        for t in threads:
            t.start()
        _until(lambda: {"loramgr_in_flight 1.0", "loramgr_queue_depth 1.0"} <= set(
            httpx.get(f"{url}/metrics").text.splitlines()), "the two requests never were one running, one queued")
        proc.send_signal(signal.SIGTERM)  # both were accepted before it: both must be answered
        for t in threads:
            t.join(300)
        assert [r.status_code for r in results] == [200, 200]
        assert all(r.json()["images"] for r in results)
        assert proc.wait(120) == 0
        output = proc.stdout.read()
    assert "signal SIGTERM: draining" in output and "Traceback" not in output, output


def test_bounded_load_test_is_bit_exact(ws, tmp_path):
    """Every response of both scheduling modes bit-exact; whether grouping swaps less is test_serve.py's
    deterministic scheduler test (two runs of real clients are ordered by chance)."""
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
        assert 0 < run["swaps"] <= 16 and run["swaps_per_request"] == run["swaps"] / 16
