"""Hostile input and abandoned work against a live ``loramgr serve``: bounded, honest, still serving.

Each case of issue 20 (and the class behind it) is replayed against a real server process
on a loopback port (tiny base). Every case runs inside :func:`bounded`: ``/healthz`` is
polled throughout and must answer within 1 s every time, and the server's peak RSS
(``VmHWM`` of /proc/PID/status, reset before the case) may not grow by more than 1 GiB.
After each group of cases a normal request must give the bytes ``loramgr run`` gives.
docs/serving.md ("Hostile input") lists the limits these cases hit.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from loramgr.serve.config import ServeConfig, host_allowed, origin_allowed
from serve_support import FAST, cli_run, free_port, png_b64, reaped, start_server

LIMIT_RSS = 1 << 30  # peak RSS growth allowed for any one case
HEALTHZ_S = 1.0  # /healthz must answer within this, throughout every case
LONG = {"resolution": 256, "steps": 900}  # a generation that runs long enough to be abandoned
SERVER_ARGS = ("--max-resolution", "512", "--max-steps", "999", "--max-num-samples", "2", "--max-image-mb", "1",
               "--max-upload-mb", "8", "--max-queue", "1")


# -- the server and its workspace ----------------------------------------------------------------

@pytest.fixture(scope="module")
def ws(tiny_workspace, tmp_path_factory):
    """A workspace of its own (damaged files are added to it): the session's tiny base, sv_a."""
    from loramgr.convert import convert_adapter
    from loramgr.manifest import Manifest
    from loramgr.samples import sample_image, write_kohya_lora
    from loramgr.workspace import Workspace

    home = tmp_path_factory.mktemp("hostile_ws")
    (home / "base_models").mkdir()
    os.symlink(tiny_workspace.base_dir("tiny"), home / "base_models" / "tiny")
    ws = Workspace.resolve(home)
    shapes = Manifest.load(ws.base_dir("tiny")).param_shapes()
    convert_adapter(ws, write_kohya_lora(tmp_path_factory.mktemp("src") / "sv_a.safetensors", shapes, seed=11),
                    base="tiny", name="sv_a")
    Image.fromarray(sample_image(96)).save(home / "house.png")
    return ws


class Server:
    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.port = proc, port
        self.url = f"http://127.0.0.1:{port}"

    def status(self, field: str) -> int:
        """``VmRSS`` / ``VmHWM`` of the server process, in bytes."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024

    def metric(self, line_start: str) -> float:
        """The value of the first /metrics sample whose line starts with ``line_start`` (0 if none yet)."""
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@pytest.fixture(scope="module")
def leftovers():
    """Upload folders as a server killed mid-upload leaves them: one of a dead process, one of a live one."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Path(tempfile.mkdtemp(prefix=f"loramgr-upload-{dead.pid}-"))
    (stale / "big.safetensors").write_bytes(b"\0" * 1024)
    live = Path(tempfile.mkdtemp(prefix=f"loramgr-upload-{os.getpid()}-"))
    yield stale, live
    for folder in (stale, live):
        if folder.exists():
            (folder / "big.safetensors").unlink(missing_ok=True)
            folder.rmdir()


@pytest.fixture(scope="module")
def server(ws, leftovers):
    port = free_port()
    with reaped(start_server(ws, port, *SERVER_ARGS)) as proc:
        yield Server(proc, port)
        proc.terminate()
        assert proc.wait(60) == 0


@pytest.fixture(scope="module")
def reference(ws, tmp_path_factory) -> list[bytes]:
    """``loramgr run``'s PNG bytes (image, edge map) for the normal request of :func:`assert_exact`."""
    return cli_run(ws, tmp_path_factory.mktemp("ref"), prompt="a house", loras=["sv_a:0.8"], seed=3)


def assert_exact(server: Server, ws, reference: list[bytes]) -> None:
    """The next normal request answers at once (nothing abandoned still runs) with ``loramgr run``'s bytes."""
    r = httpx.post(f"{server.url}/v1/generate", timeout=120, json={
        "prompt": "a house", "image": png_b64(ws.home / "house.png"), "seed": 3,
        "loras": [{"name": "sv_a", "weight": 0.8}], **FAST})
    assert r.status_code == 200, r.text
    got = r.json()
    assert [base64.b64decode(b) for b in [*got["images"], got["control_map"]]] == reference
    assert got["timings"]["queue_wait"] < 1.0


@contextlib.contextmanager
def bounded(server: Server):
    """The block runs while ``/healthz`` answers within 1 s every time and peak RSS grows by < 1 GiB."""
    Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = server.status("VmRSS")
    stop, latencies, failures = threading.Event(), [], []

    def probe():
        with httpx.Client(timeout=HEALTHZ_S) as client:
            while True:
                start = time.perf_counter()
                try:
                    if client.get(f"{server.url}/healthz").status_code != 200:
                        failures.append("status")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                latencies.append(time.perf_counter() - start)
                if stop.wait(0.05):  # the probe's sampling period
                    return

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
    assert not failures, f"/healthz did not answer within {HEALTHZ_S} s: {failures[:3]}"
    assert latencies and max(latencies) < HEALTHZ_S, max(latencies)
    growth = server.status("VmHWM") - before
    assert growth < LIMIT_RSS, f"peak RSS grew by {growth / 2**20:.0f} MiB"


def error(r: httpx.Response, status: int, field: str | None) -> str:
    """The reason of a JSON error answer, after checking its status and field."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert body["field"] == field and body["reason"] and "\n" not in body["error"], body
    return body["reason"]


# -- uploads: patterns, structures and numbers from the file --------------------------------------

def _lora_bytes(ws, tmp_path, metadata: dict[str, str], *, alphas: bool = False) -> bytes:
    """A kohya LoRA for the tiny base, without ``.alpha`` tensors (PEFT metadata decides), with ``metadata``."""
    from safetensors.torch import load_file, save_file

    from loramgr.manifest import Manifest
    from loramgr.samples import write_kohya_lora

    path = write_kohya_lora(tmp_path / "src.safetensors", Manifest.load(ws.base_dir("tiny")).param_shapes(), seed=21)
    tensors = {k: v for k, v in load_file(path).items() if alphas or not k.endswith(".alpha")}
    save_file(tensors, str(path), metadata=metadata)
    return path.read_bytes()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


PEFT = "lora_adapter_metadata"
UPLOADS = [
    pytest.param({PEFT: json.dumps({"unet.alpha_pattern": {"(": 2}})}, 422, "not a regular expression",
                 id="pattern-not-a-regex"),
    pytest.param({PEFT: json.dumps({"unet.alpha_pattern": {r"(a)\1": 2}})}, 422, "no backreferences",
                 id="pattern-backreference"),
    pytest.param({PEFT: json.dumps({"unet.alpha_pattern": {"x" * 2000: 2}})}, 422, "over the limit",
                 id="pattern-too-long"),
    pytest.param({PEFT: json.dumps({"unet.alpha_pattern": [1, 2]})}, 422, "must be a JSON object",
                 id="pattern-not-an-object"),
    pytest.param({PEFT: json.dumps([{"unet.lora_alpha": 4}])}, 422, "must be a JSON object", id="metadata-a-list"),
    pytest.param({PEFT: _nested(100_000)}, 422, "nested too deep", id="metadata-nested-100k"),
    pytest.param({PEFT: json.dumps({"unet.lora_alpha": "abc"})}, 422, "must be a number", id="alpha-text"),
    pytest.param({PEFT: json.dumps({"unet.lora_alpha": 1e308})}, 422, "not a finite number (float32)",
                 id="alpha-1e308"),
    pytest.param({PEFT: '{"unet.lora_alpha": 1e999}'}, 422, "not a finite number", id="alpha-overflowing-json"),
    pytest.param({PEFT: json.dumps({"unet.lora_alpha": 4, "unet.alpha_pattern": {"to_q": 1e39}})}, 422,
                 "not a finite number (float32)", id="pattern-alpha-1e39"),
    pytest.param({PEFT: json.dumps({"unet.use_rslora": "yes"})}, 422, "true or false", id="rslora-text"),
]


@pytest.mark.parametrize("metadata, status, message", UPLOADS)
def test_hostile_upload_is_422_and_bounded(server, ws, tmp_path, metadata, status, message):
    data = _lora_bytes(ws, tmp_path, metadata)
    with bounded(server):
        r = httpx.post(f"{server.url}/v1/adapters", files={"file": ("evil.safetensors", data)}, timeout=60)
    assert message in error(r, status, "file")
    assert not (ws.adapters / "evil.lora").exists()


def test_catastrophic_pattern_runs_in_linear_time(server, ws, tmp_path, reference):
    """``([a-z_0-9.]+)*X`` backtracks for hours in Python's re (PEFT's matcher); RE2 matches it at once."""
    metadata = {PEFT: json.dumps({"unet.lora_alpha": 4, "unet.alpha_pattern": {"([a-z_0-9.]+)*X": 2}})}
    with bounded(server):
        r = httpx.post(f"{server.url}/v1/adapters", files={"file": ("backtrack.safetensors", _lora_bytes(
            ws, tmp_path, metadata))}, timeout=60)
    assert r.status_code == 201, r.text  # a valid pattern that matches no module: alpha 4 everywhere
    assert not list(Path(tempfile.gettempdir()).glob(f"loramgr-upload-{server.proc.pid}-*"))
    assert_exact(server, ws, reference)


def test_alpha_patterns_match_as_peft_does(tmp_path):
    """Independent reference: PEFT's own ``get_pattern_key`` decides, for each name, the same pattern RE2 picks."""
    from peft.utils.other import get_pattern_key

    from loramgr.formats.files import WeightFile
    from loramgr.formats.names import Resolved
    from loramgr.formats.peft import peft_alpha, peft_configs

    patterns = {"down_blocks.0.attentions.0.proj_in": 1.0, "attn1.to_[qk]": 2.0, r"mid_block\..*": 3.0,
                "to_out.0": 5.0, "(ff|proj_out)": 6.0}
    names = ["down_blocks.0.attentions.0.proj_in", "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_k",
             "mid_block.attentions.0.proj_in", "x.to_out.0", "x.to_outX0", "down_blocks.1.ff", "ff2", "proj_out"]
    source = WeightFile(tmp_path / "f.safetensors", {}, {PEFT: json.dumps(
        {"unet.lora_alpha": 8, "unet.alpha_pattern": patterns})})
    configs = peft_configs(source)
    for name in names:
        key = get_pattern_key(list(patterns), name)
        expected = patterns.get(key, 8.0)
        assert peft_alpha(configs, Resolved(name, "unet", name, ""), 4) == expected, name


def test_deep_training_metadata_names_no_trigger_words(server, ws, tmp_path):
    """``ss_tag_frequency`` nested 100k deep: trigger words are a convenience, the file converts without them."""
    data = _lora_bytes(ws, tmp_path, {"ss_tag_frequency": _nested(100_000)}, alphas=True)
    with bounded(server):
        r = httpx.post(f"{server.url}/v1/adapters", files={"file": ("deeptags.safetensors", data)}, timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["trigger_words"] == []


@pytest.mark.parametrize("weight", ["1e308", "1e39", "1e30", "-101", "nan"])
def test_upload_default_weight_out_of_range_is_422(server, ws, tmp_path, weight):
    data = _lora_bytes(ws, tmp_path, {}, alphas=True)
    with bounded(server):
        r = httpx.post(f"{server.url}/v1/adapters", files={"file": ("heavy.safetensors", data)},
                       data={"default_weight": weight}, timeout=60)
    assert "[-100, 100]" in error(r, 422, "default_weight")
    assert not (ws.adapters / "heavy.lora").exists()


# -- numbers finite in float64 but not in float32, and out of range --------------------------------

def _native(ws, **fields) -> dict:
    return {"prompt": "a house", "image": png_b64(ws.home / "house.png"), **FAST, **fields}


def _a1111(**fields) -> dict:
    return {"prompt": "a house", "steps": 3, "width": 64, "height": 64, **fields}


def _unit(image: object = None, **fields) -> dict:
    return {"alwayson_scripts": {"controlnet": {"args": [{"image": image, "module": "canny", **fields}]}}}


NUMBERS = [
    pytest.param("/v1/generate", {"loras": [{"name": "sv_a", "weight": 1e39}]}, "loras.0.weight", id="weight-1e39"),
    pytest.param("/v1/generate", {"loras": [{"name": "sv_a", "weight": 1e308}]}, "loras.0.weight", id="weight-1e308"),
    pytest.param("/v1/generate", {"loras": [{"name": "sv_a", "weight": 1e30}]}, "loras.0.weight", id="weight-1e30"),
    pytest.param("/v1/generate", {"strength": 1e308}, "strength", id="strength-1e308"),
    pytest.param("/v1/generate", {"scale": 1e308}, "scale", id="scale-1e308"),
    pytest.param("/v1/generate", {"scale": -5}, "scale", id="scale-negative"),
    pytest.param("/v1/generate", {"eta": 1e308}, "eta", id="eta-1e308"),
    pytest.param("/sdapi/v1/txt2img", {"prompt": "a house <lora:sv_a:1e308>"}, "prompt", id="a1111-tag-1e308"),
    pytest.param("/sdapi/v1/txt2img", {"prompt": "a house <lora:sv_a:1e39>"}, "prompt", id="a1111-tag-1e39"),
    pytest.param("/sdapi/v1/txt2img", {"cfg_scale": 1e308}, "cfg_scale", id="a1111-cfg-1e308"),
    pytest.param("/sdapi/v1/txt2img", {"unit": {"weight": 1e308}}, "alwayson_scripts.controlnet.args.0.weight",
                 id="a1111-unit-weight-1e308"),
]


@pytest.mark.parametrize("path, fields, field", NUMBERS)
def test_numbers_beyond_float32_or_range_are_422_without_recreating_the_runner(server, ws, reference, path, fields,
                                                                                 field):
    if "unit" in fields:
        fields = _unit(png_b64(ws.home / "house.png"), **fields["unit"])
    body = _native(ws, **fields) if path == "/v1/generate" else _a1111(**fields)
    recreations = server.metric("loramgr_session_recreations_total")
    with bounded(server):
        r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert "finite number" in error(r, 422, field)
    assert server.metric("loramgr_session_recreations_total") == recreations
    assert_exact(server, ws, reference)


# -- A1111: sizes checked before any allocation, unit image types, nesting --------------------------

def _png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, "PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


A1111_CASES = [
    pytest.param(_unit(_png(8192, 4)), "alwayson_scripts.controlnet.args.0.processor_res", id="canny-4x8192"),
    pytest.param({**_unit(_png(8192, 4), module="none"), "width": 512, "height": 512},
                 "alwayson_scripts.controlnet.args.0.image", id="map-4x8192-cropped-to-512"),
    pytest.param({"width": 65536, "height": 65536}, "width", id="65536-square"),
    pytest.param({"width": 16384, "height": 16384}, "width", id="16384-square"),
    pytest.param({"width": 256, "height": 16384}, "height", id="256x16384"),
    pytest.param(_unit({"image": {"nested": 1}}), "alwayson_scripts.controlnet.args.0.image", id="unit-image-object"),
    pytest.param(_unit({"image": [1, 2]}), "alwayson_scripts.controlnet.args.0.image", id="unit-image-list-in-object"),
    pytest.param(_unit([1, 2]), "alwayson_scripts.controlnet.args.0.image", id="unit-image-list"),
    pytest.param({"ignored_field": json.loads(_nested(300))}, "ignored_field", id="ignored-field-nested-300"),
    pytest.param({"override_settings": {"x": json.loads(_nested(300))}}, "override_settings",
                 id="override-settings-nested-300"),
]


@pytest.mark.parametrize("fields, field", A1111_CASES)
def test_a1111_sizes_and_shapes_are_422_before_any_work(server, ws, reference, fields, field):
    with bounded(server):
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=_a1111(**fields), timeout=60)
    error(r, 422, field)
    assert_exact(server, ws, reference)


@pytest.mark.parametrize("path", ["/v1/generate", "/sdapi/v1/txt2img"])
def test_body_nested_100k_deep_is_400(server, path):
    with bounded(server):
        r = httpx.post(f"{server.url}{path}", content=_nested(100_000), headers={"content-type": "application/json"},
                       timeout=60)
    assert r.status_code in (400, 422), r.text
    assert r.json()["field"] == "body"


# -- browsers: Host (DNS rebinding) and cross-origin state changes -----------------------------------

def test_other_host_names_are_refused(server, ws):
    for method, path, kwargs in [("get", "/v1/adapters", {}), ("post", "/v1/generate", {"json": _native(ws)}),
                                 ("get", "/sdapi/v1/loras", {})]:
        r = getattr(httpx, method)(f"{server.url}{path}", headers={"Host": f"evil.example:{server.port}"}, **kwargs)
        assert "--allowed-hosts" in error(r, 400, "host")
    assert httpx.get(f"{server.url}/v1/adapters", headers={"Host": f"localhost:{server.port}"}).status_code == 200
    assert httpx.get(f"{server.url}/healthz", headers={"Host": "evil.example"}).status_code == 200  # no data


def test_cross_origin_state_changes_are_refused(server, ws, tmp_path):
    before = (ws.adapters / "sv_a.lora").read_bytes()
    evil = {"Origin": "http://evil.example"}
    r = httpx.post(f"{server.url}/v1/adapters", files={"file": ("sv_a.safetensors", _lora_bytes(ws, tmp_path, {},
                   alphas=True))}, data={"overwrite": "true"}, headers=evil)
    assert "--cors-origins" in error(r, 403, "origin")
    assert (ws.adapters / "sv_a.lora").read_bytes() == before
    error(httpx.post(f"{server.url}/sdapi/v1/interrupt", headers=evil), 403, "origin")
    error(httpx.post(f"{server.url}/sdapi/v1/interrupt", headers={"Origin": "null"}), 403, "origin")
    error(httpx.post(f"{server.url}/v1/generate", json=_native(ws), headers=evil), 403, "origin")
    assert "access-control-allow-origin" not in httpx.get(f"{server.url}/v1/adapters", headers=evil).headers
    # the server's own page: same origin, accepted
    own = {"Origin": server.url}
    assert httpx.post(f"{server.url}/sdapi/v1/interrupt", headers=own).json() == {"interrupted": False}


def test_host_and_origin_rules():
    bound = ServeConfig()
    assert host_allowed(bound, "127.0.0.1:7860") and host_allowed(bound, "localhost") \
        and not host_allowed(bound, "evil.example:7860") and not host_allowed(bound, "10.0.0.1")
    everywhere = ServeConfig(host="0.0.0.0", allowed_hosts=("Box.LAN",))
    assert host_allowed(everywhere, "10.0.0.1:7860") and host_allowed(everywhere, "[::1]:7860")
    assert host_allowed(everywhere, "box.lan:7860") and not host_allowed(everywhere, "evil.example")
    assert host_allowed(ServeConfig(allowed_hosts=("*",)), "anything")
    assert origin_allowed(bound, "http://127.0.0.1:7860", "127.0.0.1:7860")
    assert not origin_allowed(bound, "http://evil.example", "127.0.0.1:7860")
    assert not origin_allowed(bound, "null", "null")
    opened = ServeConfig(cors_origins=("https://app.example/",))
    assert origin_allowed(opened, "https://app.example", "127.0.0.1:7860")
    with pytest.raises(ValueError, match="scheme://host"):
        ServeConfig(cors_origins=("app.example",))


def test_cors_origins_open_the_api_to_one_site(ws):
    """--cors-origins: preflight answered for that origin only, and its POSTs pass the origin check."""
    from fastapi.testclient import TestClient

    from loramgr.serve import create_app

    app = create_app(ws, ServeConfig(cors_origins=("https://app.example",)))  # no lifespan: no runner needed
    client = TestClient(app, base_url="http://127.0.0.1")
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    ok = client.options("/sdapi/v1/interrupt", headers={"Origin": "https://app.example", **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    assert client.options("/sdapi/v1/interrupt", headers={"Origin": "http://evil.example", **preflight}) \
        .status_code == 400
    r = client.post("/sdapi/v1/interrupt", headers={"Origin": "https://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert client.post("/sdapi/v1/interrupt", headers={"Origin": "http://evil.example"}).status_code == 403


# -- abandoned requests: cancelled, counted, Retry-After from the real wait ---------------------------

def _open(server: Server, path: str, body: dict) -> socket.socket:
    """A request sent on a raw socket, left waiting: closing the socket is the client going away."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _until(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "state not reached"
        time.sleep(0.02)


def _progress(server: Server) -> dict:
    return httpx.get(f"{server.url}/sdapi/v1/progress").json()


def test_abandoned_requests_are_cancelled_and_counted(server, ws, reference):
    names = ('loramgr_generations_total{outcome="ok"}', 'loramgr_generations_total{outcome="cancelled"}',
             'loramgr_cancelled_total{stage="queued"}', 'loramgr_cancelled_total{stage="running"}',
             'loramgr_requests_total{endpoint="/v1/generate",status="499"}')
    before = {name: server.metric(name) for name in names}
    counted = lambda name: server.metric(name) - before[name]  # noqa: E731
    with bounded(server), contextlib.ExitStack() as sockets:
        running = sockets.enter_context(_open(server, "/v1/generate", _native(ws, **LONG)))
        _until(lambda: _progress(server)["state"]["sampling_step"] >= 5)  # its pace is known
        queued = sockets.enter_context(_open(server, "/v1/generate", _native(ws, **LONG)))
        _until(lambda: server.metric("loramgr_queue_depth") == 1)
        # the queue (--max-queue 1) is full: Retry-After is the rest of the running generation
        full = httpx.post(f"{server.url}/v1/generate", json=_native(ws))
        eta = _progress(server)["eta_relative"]
        assert full.status_code == 503 and eta > 2
        assert abs(int(full.headers["Retry-After"]) - eta) <= max(2.0, 0.5 * eta), (full.headers, eta)
        queued.close()  # a queued request whose client left: out of the queue at once
        _until(lambda: counted('loramgr_cancelled_total{stage="queued"}') == 1)
        assert server.metric("loramgr_queue_depth") == 0
        step, total = _progress(server)["state"]["sampling_step"], _progress(server)["state"]["sampling_steps"]
        assert step < total - 10
        running.close()  # a running one stops at its next step
        _until(lambda: counted('loramgr_cancelled_total{stage="running"}') == 1)
        _until(lambda: server.metric("loramgr_in_flight") == 0)
    assert counted('loramgr_generations_total{outcome="cancelled"}') == 1
    assert counted('loramgr_generations_total{outcome="ok"}') == 0  # neither ran to its end
    assert counted('loramgr_requests_total{endpoint="/v1/generate",status="499"}') == 2
    assert_exact(server, ws, reference)


def test_abandoned_a1111_request_is_cancelled(server, ws, reference):
    cancelled = server.metric('loramgr_cancelled_total{stage="running"}')
    with bounded(server), _open(server, "/sdapi/v1/txt2img", _a1111(steps=900, width=256, height=256,
                                                                    n_iter=2)) as sock:
        _until(lambda: _progress(server)["state"]["sampling_step"] >= 1)
        sock.close()
        _until(lambda: server.metric('loramgr_cancelled_total{stage="running"}') == cancelled + 1)
        _until(lambda: server.metric("loramgr_in_flight") == 0)
    assert server.metric("loramgr_queue_depth") == 0  # the second image of n_iter=2 never queued
    assert_exact(server, ws, reference)


# -- damaged files, leftovers ---------------------------------------------------------------------------

def test_damaged_lora_is_named_not_fatal(server, ws):
    from loramgr.adapter_file import save_adapter

    save_adapter(ws.adapters / "broken.lora", "lora", {"loramgr.ranks": "{not json", "loramgr.base_name": "tiny"}, [])
    try:
        with bounded(server):
            listed = httpx.get(f"{server.url}/v1/adapters")
            loras = httpx.get(f"{server.url}/sdapi/v1/loras")
            models = httpx.get(f"{server.url}/controlnet/model_list")
        assert listed.status_code == loras.status_code == models.status_code == 200
        assert "broken" not in [a["name"] for a in listed.json()["adapters"]]
        (problem,) = [p for p in listed.json()["problems"] if p["name"] == "broken"]
        assert "loramgr.ranks" in problem["reason"]
        assert "broken" not in [a["name"] for a in loras.json()]
        r = httpx.post(f"{server.url}/v1/generate", json=_native(ws, loras=[{"name": "broken"}]))
        assert r.status_code == 422 and r.json()["field"] == "loras.0.name"
    finally:
        (ws.adapters / "broken.lora").unlink()


def test_upload_folders_of_killed_servers_are_removed_at_start(server, leftovers):
    stale, live = leftovers
    assert not stale.exists()  # its process is gone: removed when the server started
    assert live.exists()  # a live process's upload is left alone
