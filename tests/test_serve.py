"""loramgr serve over FastAPI's TestClient: bit-exactness with `loramgr run`, bad input, swaps, uploads, auth.

Tiny base, 64 px, 3 steps. One app (one runner) for the module; tests that need other
limits or a key swap the service's config for their duration.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from loramgr.serve import ServeConfig, create_app
from loramgr.serve.config import is_loopback
from loramgr.serve.scheduler import QueueFull, Scheduler
from reference_pipelines import (
    CONTROLNET_DEFAULTS, assert_close_images, base_negative_prompt, diffusers_images, documented,
    reference_process_preprocessing,
)
from serve_support import FAST, cli_run, decode, png_b64, reference_for, serve_workspace

CONFIG = ServeConfig(max_resolution=256, max_steps=20, max_num_samples=2, max_image_bytes=64 * 1024,
                     max_upload_bytes=4 * 1024 * 1024, max_queue=8, max_overtake=2)


@pytest.fixture(scope="module")
def ws(tiny_workspace, tmp_path_factory):
    return serve_workspace(tiny_workspace, tmp_path_factory)


@pytest.fixture(scope="module")
def client(ws):
    with TestClient(create_app(ws, CONFIG), base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def service(client):
    service = client.app.state.service
    config = service.config
    yield service
    service.config = config


def body(ws, **fields) -> dict:
    return {"prompt": "a house", "image": png_b64(ws.home / "house.png"), **FAST, **fields}


def generate(client, ws, **fields) -> dict:
    r = client.post("/v1/generate", json=body(ws, **fields))
    assert r.status_code == 200, r.text
    return r.json()


# -- bit-exact with loramgr run ------------------------------------------------------------

SETS = [
    pytest.param([], "canny", id="base"),
    pytest.param(["sv_a:0.8"], "canny", id="lora"),
    pytest.param(["sv_a:0.5", "sv_b:0.7"], "sv_hed", id="two-loras-and-controlnet"),
    pytest.param(["sv_b"], "canny", id="default-weight"),
]


@pytest.mark.parametrize("loras, control", SETS)
def test_generate_equals_loramgr_run_bit_for_bit(client, ws, tmp_path, loras, control):
    expected = cli_run(ws, tmp_path, prompt="a house", loras=loras, control=control, seed=5)
    specs = [{"name": s.partition(":")[0], **({"weight": float(s.partition(":")[2])} if ":" in s else {})}
             for s in loras]
    got = generate(client, ws, seed=5, loras=specs, control=control)
    assert [base64.b64decode(b) for b in [*got["images"], got["control_map"]]] == expected
    assert [a["name"] for a in got["adapters"]] == [*([control] if control != "canny" else []),
                                                     *[s.partition(":")[0] for s in loras]]
    assert all(len(a["sha256"]) == 64 for a in got["adapters"])
    assert got["seed"] == 5 and got["settings"]["scale"] == 9.0  # an omitted field: loramgr run's default
    assert set(got["timings"]) >= {"queue_wait", "swap", "encode", "denoise", "decode", "total"}


def test_defaults_are_controlnets_process_defaults(client, ws):
    """/v1/config and the OpenAPI schema state ControlNet's process() defaults (written out in the test); the two
    that depend on the base (docs/design.md, "Defaults") follow their documented rules on the tiny base: the UNet's
    native size, and the negative prompt cut at the last item that fits one 77-token window of its tokenizer."""
    import json as json_

    from transformers import CLIPTokenizer

    defaults = client.get("/v1/config").json()["defaults"]
    schema = client.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]["properties"]
    per_base = ("resolution", "n_prompt")
    for name, value in CONTROLNET_DEFAULTS.items():
        if name in per_base:
            continue
        assert defaults[name] == value, name
        if name in schema:  # the request has no preprocessor field (a control_map is sent as one)
            assert schema[name].get("default") == value, name
    source = ws.base_dir("tiny") / "source"
    assert defaults["resolution"] == 8 * json_.loads((source / "unet" / "config.json").read_text())["sample_size"]
    assert defaults["n_prompt"] == base_negative_prompt(CLIPTokenizer.from_pretrained(source / "tokenizer"))
    assert all(schema[name].get("default") is None for name in per_base)  # omitted: the base's


def test_generate_with_omitted_fields_matches_diffusers(client, ws, tiny_folder):
    """The native route's image against diffusers' pipeline with the same files: every field the request
    leaves out must act as ControlNet's documented default (a_prompt, n_prompt, scale, eta, DDIM, thresholds)."""
    got = client.post("/v1/generate", json={
        "prompt": "a house", "image": png_b64(ws.home / "house.png"), "seed": 5, "steps": 3, "resolution": 64,
        "loras": [{"name": "sv_a", "weight": 0.8}, {"name": "sv_b"}], "control": "sv_hed"})
    assert got.status_code == 200, got.text
    reference = reference_for(ws, tiny_folder, [("sv_a", 0.8), ("sv_b", 1.0)], "sv_hed")
    house = np.asarray(Image.open(ws.home / "house.png").convert("RGB"))
    settings = documented(prompt="a house", seed=5, steps=3, resolution=64,
                          n_prompt=base_negative_prompt(reference.tokenizer))
    assert_close_images([decode(b) for b in got.json()["images"]], diffusers_images(reference, house, settings))
    edges = reference_process_preprocessing(house, 64, 100, 200)[1]
    np.testing.assert_array_equal(decode(got.json()["control_map"]), edges)


def test_omitted_size_and_negative_prompt_are_the_bases_as_in_loramgr_run(client, ws, tmp_path, caplog):
    """Neither the request nor `loramgr run` names resolution or n_prompt: both take the tiny base's
    (128 px, a negative prompt its tokenizer holds in 77 tokens, so nothing is cut) and agree bit for bit."""
    import json
    from pathlib import Path

    from loramgr.cli import main

    argv = ["--home", str(ws.home), "run", "--image", str(ws.home / "house.png"), "--prompt", "a house",
            "--steps", "3", "--seed", "4", "--out", str(tmp_path), "--json"]
    assert main(argv) == 0
    sidecar = json.loads(next(Path(tmp_path).glob("*.json")).read_text())
    expected = [(tmp_path / name).read_bytes() for name in [*sidecar["images"], *sidecar["control_maps"]]]
    r = client.post("/v1/generate", json={"prompt": "a house", "image": png_b64(ws.home / "house.png"),
                                          "steps": 3, "seed": 4})
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["width"], got["height"]) == (128, 128) and got["settings"]["resolution"] == 128
    assert got["settings"]["n_prompt"] == client.get("/v1/config").json()["defaults"]["n_prompt"]
    assert [base64.b64decode(b) for b in [*got["images"], got["control_map"]]] == expected
    assert not [m for m in caplog.messages if "truncated" in m], caplog.messages


def test_precomputed_control_map_replaces_canny(client, ws):
    plain = generate(client, ws, seed=2)
    # the canny map it saw, sent back as a precomputed map at the same size: the same image
    again = generate(client, ws, seed=2, control_map=plain["control_map"])
    assert again["images"] == plain["images"] and again["control_map"] == plain["control_map"]
    only_map = generate(client, ws, seed=2, control_map=plain["control_map"], image=None)
    assert decode(only_map["images"][0]).shape == (64, 64, 3)


def test_num_samples_and_data_url(client, ws):
    got = generate(client, ws, num_samples=2, image="data:image/png;base64," + png_b64(ws.home / "house.png"))
    assert len(got["images"]) == 2 and got["images"][0] != got["images"][1]


# -- bad input: 4xx naming the field, the server goes on -------------------------------------

def _noise_png(size: int) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


BAD = [
    pytest.param("malformed", 400, "body", id="malformed-json"),
    pytest.param({"loras": [{"name": "nope"}]}, 422, "loras.0.name", id="unknown-adapter"),
    pytest.param({"loras": [{"name": "../../etc/passwd"}]}, 422, "loras.0.name", id="path-traversal"),
    pytest.param("nan-weight", 422, "loras.0.weight", id="nan-weight"),
    pytest.param({"loras": [{"name": "sv_a", "weight": "inf"}]}, 422, "loras.0.weight", id="inf-weight"),
    pytest.param({"loras": [{"name": "sv_a", "weight": "heavy"}]}, 422, "loras.0.weight", id="text-weight"),
    pytest.param({"image": "not base64!"}, 422, "image", id="not-base64"),
    pytest.param({"image": base64.b64encode(b"GIF89a not really").decode()}, 422, "image", id="undecodable-image"),
    pytest.param({"image": "noise"}, 413, "image", id="oversized-image"),
    pytest.param({"image": None}, 422, "image", id="no-image"),
    pytest.param({"resolution": 512}, 422, "resolution", id="resolution-over-limit"),
    pytest.param({"steps": 21}, 422, "steps", id="steps-over-limit"),
    pytest.param({"num_samples": 3}, 422, "num_samples", id="num-samples-over-limit"),
    pytest.param({"steps": 0}, 422, "steps", id="steps-zero"),
    pytest.param({"control": "sv_a"}, 422, "control", id="lora-as-control"),
    pytest.param({"loras": [{"name": "sv_hed"}]}, 422, "loras.0.name", id="controlnet-as-lora"),
    pytest.param({"control": "nope"}, 422, "control", id="unknown-control"),
    pytest.param({"scheduler": "warp"}, 422, "scheduler", id="unknown-scheduler"),
    pytest.param({"schedule": "kl_optimal"}, 422, "schedule", id="unknown-schedule"),
    pytest.param({"scheduler": "euler_a", "schedule": "karras"}, 422, "schedule", id="schedule-the-sampler-lacks"),
    pytest.param({"eta": 0.5, "scheduler": "euler"}, 422, "eta", id="eta-without-ddim"),
    pytest.param({"seed": -1}, 422, "seed", id="negative-seed"),
    pytest.param({"img2img_strength": 1.5}, 422, "img2img_strength", id="img2img-strength"),
    pytest.param({"scheduler": "pndm", "steps": 2}, 422, "scheduler", id="late-pipeline-refusal"),
    pytest.param({"prompt": None}, 422, "prompt", id="no-prompt"),
    pytest.param({"sampler": "x"}, 422, "sampler", id="unknown-field"),
    pytest.param("list", 422, "body", id="not-an-object"),
    pytest.param("huge-body", 413, "body", id="body-over-limit"),
]


@pytest.mark.parametrize("change, status, field", BAD)
def test_bad_input_is_4xx_naming_the_field(client, ws, change, status, field):
    if change == "malformed":
        r = client.post("/v1/generate", content=b'{"prompt": "x", ', headers={"content-type": "application/json"})
    elif change == "nan-weight":
        text = '{"prompt": "x", "image": "%s", "loras": [{"name": "sv_a", "weight": NaN}]}' % png_b64(ws.home / "house.png")
        r = client.post("/v1/generate", content=text, headers={"content-type": "application/json"})
    elif change == "list":
        r = client.post("/v1/generate", json=[1, 2])
    elif change == "huge-body":
        r = client.post("/v1/generate", content=b" " * (CONFIG.max_body_bytes + 1),
                        headers={"content-type": "application/json"})
    else:
        if change.get("image") == "noise":
            change = {"image": _noise_png(200)}
        r = client.post("/v1/generate", json={k: v for k, v in body(ws, **change).items() if v is not None})
    assert r.status_code == status, r.text
    error = r.json()
    assert error["field"] == field, error
    assert error["reason"] and "\n" not in error["error"]
    assert client.get("/readyz").status_code == 200


def test_server_goes_on_after_bad_input(client, ws):
    for _ in range(2):
        client.post("/v1/generate", content=b"{", headers={"content-type": "application/json"})
        text = '{"prompt": "x", "image": "%s", "loras": [{"name": "sv_a", "weight": 1e400}]}' % png_b64(ws.home / "house.png")
        r = client.post("/v1/generate", content=text, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["field"] == "loras.0.weight"
    assert generate(client, ws)["images"]


# -- failures leave no half-swapped runner ----------------------------------------------------

def test_failed_swap_or_generation_leaves_no_half_swapped_runner(client, ws, service, monkeypatch):
    a = {"loras": [{"name": "sv_a", "weight": 1.0}]}
    b = {"loras": [{"name": "sv_b", "weight": 0.9}], "control": "sv_hed"}
    ref_a, ref_b = generate(client, ws, **a)["images"], generate(client, ws, **b)["images"]
    engine = service.engine
    reopens = engine.reopens
    recreations = _metric(client, "loramgr_session_recreations_total")

    def half_swap(adapter_set):  # writes garbage into one buffer, then fails
        buffers = next(s.buffers for s in engine.runner._graphs.values() if s.buffers)
        name, value = next(iter(buffers.items()))
        value.fill_(7.0)  # the buffer ONNX Runtime reads (a torch tensor shared through DLPack)
        raise RuntimeError("injected failure half-way through a swap")

    monkeypatch.setattr(engine.runner, "set_adapters", half_swap)
    r = client.post("/v1/generate", json=body(ws, **a))
    assert r.status_code == 500 and "RuntimeError" in r.json()["error"]
    assert engine.reopens == reopens + 1  # re-opened on the plain base, counted
    assert generate(client, ws, **b)["images"] == ref_b
    assert generate(client, ws, **a)["images"] == ref_a

    def broken_pipeline(*args, **kwargs):
        raise RuntimeError("injected failure in the pipeline")

    monkeypatch.setattr(engine.generator, "pipeline", broken_pipeline)
    assert client.post("/v1/generate", json=body(ws, **b)).status_code == 500
    monkeypatch.undo()
    assert generate(client, ws, **a)["images"] == ref_a
    assert generate(client, ws, **b)["images"] == ref_b
    assert 'loramgr_generations_total{outcome="failed"}' in client.get("/metrics").text
    assert _metric(client, "loramgr_session_recreations_total") == recreations + (engine.reopens - reopens)
    assert engine.reopens - reopens >= 1


def _metric(client, name: str) -> float:
    """The value of the unlabelled Prometheus sample ``name`` on /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for family in text_string_to_metric_families(client.get("/metrics").text)
               for s in family.samples if s.name == name and not s.labels]
    assert len(samples) == 1, name
    return samples[0].value


# -- scheduling -------------------------------------------------------------------------------

def _run_scheduler(policy: str, keys: list[str], max_overtake: int) -> tuple[list[int], int]:
    """Jobs with ``keys`` queued while the worker is busy; returns the execution order and swaps."""
    gate = threading.Event()
    order, state = [], {"key": None, "swaps": 0}

    def execute(job):
        index, key = job
        if index < 0:
            gate.wait()  # set below, once every job is queued (no timeout that could release it early)
            return None
        if (key,) != state["key"]:
            state["swaps"] += 1
            state["key"] = (key,)
        order.append(index)

    scheduler = Scheduler(execute, lambda: state["key"], policy=policy, max_queue=100, max_overtake=max_overtake)
    try:
        blocker = scheduler.submit((-1, None), ("block",))
        _until(lambda: scheduler.stats.running == 1)
        futures = [scheduler.submit((i, k), (k,)) for i, k in enumerate(keys)]
    finally:
        gate.set()
    for f in [blocker, *futures]:
        f.result(60)
    scheduler.close(60)
    return order, state["swaps"], scheduler.stats.max_overtaken


def test_grouping_swaps_less_with_a_bound_on_overtaking():
    keys = list("ABABABABCACB")
    fifo, fifo_swaps, _ = _run_scheduler("fifo", keys, max_overtake=3)
    assert fifo == list(range(len(keys))) and fifo_swaps == 12
    grouped, swaps, max_overtaken = _run_scheduler("grouping", keys, max_overtake=3)
    assert sorted(grouped) == list(range(len(keys))) and swaps < fifo_swaps
    assert max_overtaken <= 3
    for position, index in enumerate(grouped):  # overtaken by at most 3 later arrivals
        later_before = sum(1 for other in grouped[:position] if other > index)
        assert later_before <= 3, (index, grouped)
    unbounded, swaps_unbounded, _ = _run_scheduler("grouping", keys, max_overtake=100)
    assert swaps_unbounded == 3 and swaps_unbounded <= swaps


def test_full_queue_is_503_with_retry_after(client, ws, service, monkeypatch):
    gate = threading.Event()
    run = service.engine.run

    def slow_run(job):
        gate.wait()  # set in the finally below: the first job runs until the 503 was seen
        return run(job)

    monkeypatch.setattr(service.engine, "run", slow_run)
    service.scheduler.max_queue = 1
    results = []
    threads = [threading.Thread(target=lambda: results.append(client.post("/v1/generate", json=body(ws))))
               for _ in range(2)]
    try:
        threads[0].start()
        _until(lambda: service.scheduler.stats.running == 1)  # running, blocked on the gate
        threads[1].start()
        _until(lambda: service.scheduler.depth == 1)  # queued
        r = client.post("/v1/generate", json=body(ws))
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert "queue is full" in r.json()["error"]
    finally:
        gate.set()
        for t in threads:
            t.join(30)
        service.scheduler.max_queue = CONFIG.max_queue
    assert [x.status_code for x in results] == [200, 200]


def _until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_queue_full_exception_carries_retry_after():
    gate = threading.Event()
    scheduler = Scheduler(lambda job: gate.wait(), lambda: (), max_queue=1)
    try:
        scheduler.submit(1, ())
        _until(lambda: scheduler.stats.running == 1)
        scheduler.submit(2, ())
        with pytest.raises(QueueFull) as info:
            scheduler.submit(3, ())
        assert info.value.retry_after >= 1
    finally:
        gate.set()
        scheduler.close(60)


def test_swappable_set_grows_within_the_budget(ws):
    """Budget 0: nothing swappable at start; the first use of a set re-opens, later swaps are in place."""
    from loramgr.serve.engine import Engine
    from loramgr.serve.schemas import GenerateRequest

    engine = Engine(ws, dataclasses.replace(CONFIG, swap_budget_mb=0))
    engine.start()
    try:
        assert engine.startup["swappable_adapters"] == [] and engine.startup["swappable_bytes"] == 0
        assert set(engine.startup["not_swappable_at_start"]) >= {"sv_a", "sv_b", "sv_hed"}
        request = lambda w: GenerateRequest(**body(ws, loras=[{"name": "sv_a", "weight": w}]))  # noqa: E731
        first = engine.run(engine.prepare(request(0.5)))
        assert first.swapped and first.reopened and engine.reopens == 1
        second = engine.run(engine.prepare(request(0.9)))
        assert second.swapped and not second.reopened and engine.reopens == 1
    finally:
        engine.close()
    full = Engine(ws, CONFIG)
    swappable, included, excluded, nbytes = full.initial_swappable()
    assert not excluded and nbytes > 0


# -- adapters: list, upload ---------------------------------------------------------------------

def test_list_adapters(client):
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert listed["sv_a"]["kind"] == "lora" and listed["sv_a"]["rank"] == [4]
    assert listed["sv_a"]["trigger_words"] == ["blindbox"] and listed["sv_a"]["fits"]
    assert listed["sv_a"]["base"] == "tiny" and listed["sv_a"]["default_weight"] == 1.0
    assert listed["sv_hed"]["kind"] == "controlnet"


def _lora_file(tmp_path, ws, seed=21) -> bytes:
    from loramgr.manifest import Manifest
    from loramgr.samples import write_kohya_lora

    path = write_kohya_lora(tmp_path / f"up{seed}.safetensors", Manifest.load(ws.base_dir("tiny")).param_shapes(),
                            seed=seed)
    return path.read_bytes()


def test_upload_converts_with_the_clis_checks(client, ws, service, tmp_path):
    data = _lora_file(tmp_path, ws)
    r = client.post("/v1/adapters", files={"file": ("style.safetensors", data)}, data={"default_weight": "0.7"})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "style" and r.json()["kind"] == "lora" and not r.json()["replaced"]
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert listed["style"]["default_weight"] == 0.7
    got = generate(client, ws, loras=[{"name": "style"}])  # usable at once, with its default weight
    assert got["adapters"][0]["weight"] == 0.7 and got["adapters"][0]["name"] == "style"
    # taken name: 409 unless overwrite
    r = client.post("/v1/adapters", files={"file": ("style.safetensors", data)})
    assert r.status_code == 409 and r.json()["field"] == "name"
    r = client.post("/v1/adapters", files={"file": ("x.safetensors", _lora_file(tmp_path, ws, 22))},
                    data={"name": "style", "overwrite": "true"})
    assert r.status_code == 201 and r.json()["replaced"]


@pytest.mark.parametrize("filename, content, form, status, field, message", [
    ("bad.safetensors", b"\x00" * 64, {}, 422, "file", "not a safetensors file"),
    ("trunc.safetensors", b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": 1", {}, 422, "file", "truncated"),
    ("model.ckpt", b"PK\x03\x04" + b"\x00" * 60, {}, 422, "file", "never opened"),
    ("model.pt", b"PK\x03\x04" + b"\x00" * 60, {}, 422, "file", "unreadable PyTorch file"),  # embeddings only
    ("ok.safetensors", "lora", {"name": "../evil"}, 422, "name", "invalid adapter name"),
    ("ok.safetensors", "lora", {"kind": "controlnet"}, 422, "file", ""),
    ("ok.safetensors", "lora", {"default_weight": "nan"}, 422, "default_weight", "finite"),
    ("big.safetensors", b"\x00" * (4 * 1024 * 1024 + 10), {}, 413, "file", "limit"),
])
def test_bad_upload_is_4xx_and_writes_nothing(client, ws, tmp_path, filename, content, form, status, field, message):
    before = sorted(p.name for p in ws.adapters.iterdir())
    if content == "lora":
        content = _lora_file(tmp_path, ws, 23)
    r = client.post("/v1/adapters", files={"file": (filename, content)}, data=form)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and message in r.json()["reason"]
    assert sorted(p.name for p in ws.adapters.iterdir()) == before


def test_adapter_dropped_into_the_folder_is_picked_up(client, ws, tmp_path):
    from loramgr.convert import convert_adapter
    from loramgr.manifest import Manifest
    from loramgr.samples import write_kohya_lora

    source = write_kohya_lora(tmp_path / "dropped.safetensors", Manifest.load(ws.base_dir("tiny")).param_shapes(), seed=31)
    convert_adapter(ws, source, base="tiny", name="dropped")
    assert "dropped" in [a["name"] for a in client.get("/v1/adapters").json()["adapters"]]
    assert generate(client, ws, loras=[{"name": "dropped", "weight": 0.5}])["adapters"][0]["name"] == "dropped"


# -- security, ops -------------------------------------------------------------------------------

def test_api_key_on_every_endpoint_but_healthz(client, ws, service):
    service.config = dataclasses.replace(CONFIG, api_key="s3cret")
    assert client.get("/healthz").status_code == 200
    for method, path in [("get", "/readyz"), ("get", "/metrics"), ("get", "/v1/adapters"), ("get", "/v1/config"),
                         ("post", "/v1/generate"), ("post", "/v1/adapters"), ("get", "/openapi.json")]:
        r = getattr(client, method)(path)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", path
        r = getattr(client, method)(path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401, path
    assert client.get("/v1/adapters", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    r = client.post("/v1/generate", json=body(ws), headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200
    assert client.get("/").status_code == 200  # the static page holds no data; its calls send the key


def test_loopback_and_the_warning(ws, capsys, monkeypatch):
    from loramgr.serve import server

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.3.4.5")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")
    monkeypatch.setattr(server.DrainingServer, "run", lambda self: None)
    server.serve(ws, ServeConfig(host="0.0.0.0"))
    assert "without an API key" in capsys.readouterr().err
    server.serve(ws, ServeConfig(host="0.0.0.0", api_key="k"))
    server.serve(ws, ServeConfig())
    assert "without an API key" not in capsys.readouterr().err


def test_health_ready_metrics_page(client, ws):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] and set(ready["startup"]["swappable_adapters"]) >= {"sv_a", "sv_b", "sv_hed"}
    generate(client, ws, loras=[{"name": "sv_a", "weight": 0.25}])
    metrics = client.get("/metrics").text
    for name in ("loramgr_requests_total", "loramgr_queue_wait_seconds_bucket", "loramgr_swap_seconds_count",
                 "loramgr_denoise_seconds_bucket", "loramgr_generate_seconds_bucket", "loramgr_swaps_total",
                 "loramgr_session_recreations_total", "loramgr_queue_depth"):
        assert name in metrics, name
    assert 'loramgr_requests_total{endpoint="/v1/generate",status="200"}' in metrics
    page = client.get("/")
    assert page.status_code == 200 and 'id="generate"' in page.text
