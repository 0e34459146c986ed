"""loramgr serve --ray: set ids, the Serve config file, and a local Ray cluster with 2 replicas of the tiny base.

The cluster tests start Ray on this machine (2 CPUs, small object store, no dashboard), send
mixed adapter sets from concurrent clients through Ray's HTTP proxy, and check every image
bit for bit against `loramgr run`; they skip when the ``ray`` extra is not installed.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from loramgr.cli import main
from loramgr.serve import ServeConfig
from loramgr.serve.ray_config import RayOptions, serve_config, set_id
from loramgr.serve.schemas import GenerateRequest
from test_serve_support import FAST, cli_run, free_port, png_b64, reaped, serve_workspace, start_server

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray Serve is not installed: pip install -e '.[ray]'")

CONFIG = ServeConfig(max_resolution=256, max_steps=20, max_num_samples=2, max_queue=16)
SETS = [([], "canny"), (["sv_a:0.8"], "canny"), (["sv_b:0.6"], "sv_hed"), (["sv_a:0.5", "sv_b:0.5"], "canny")]
SEED = 5
N = 24  # requests per routing mode


@pytest.fixture(scope="module")
def ws(tiny_workspace, tmp_path_factory):
    return serve_workspace(tiny_workspace, tmp_path_factory)


def request_body(ws, loras, control) -> dict:
    specs = [{"name": s.partition(":")[0], "weight": float(s.partition(":")[2])} for s in loras]
    return {"prompt": "a house", "image": png_b64(ws.home / "house.png"), **FAST, "seed": SEED, "loras": specs,
            "control": control}


# -- without Ray: the set id and the config file --------------------------------------------

def test_set_id_is_canonical():
    def sid(**fields):
        return set_id(GenerateRequest(prompt="x", **fields))

    assert sid() == "canny"
    assert sid(loras=[{"name": "b", "weight": 0.5}, {"name": "a", "weight": 1}], control="hed") == \
        sid(loras=[{"name": "a", "weight": 1.0}, {"name": "b", "weight": 0.5}], control="hed") == "hed|a:1.0,b:0.5"
    assert sid(loras=[{"name": "a"}]) == "canny|a:default"
    assert len({sid(loras=[{"name": "a", "weight": w}]) for w in (0.5, 0.6)}) == 2
    assert sid(loras=[{"name": "a", "weight": 1}]) != sid(loras=[{"name": "a", "weight": 1}], control="hed")


def test_write_config_is_a_serve_config(ws, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORAMGR_API_KEY", "secret-key")
    path = tmp_path / "serve.yaml"
    assert main(["--home", str(ws.home), "serve", "--write-config", str(path), "--autoscale", "1,4",
                 "--sets-per-replica", "5", "--max-queue", "9", "--port", "8123"]) == 0
    assert "serve deploy" in capsys.readouterr().out
    text = path.read_text()
    assert "secret-key" not in text  # the key stays in the environment, never in a file
    data = yaml.safe_load(text)
    app = data["applications"][0]
    assert app["import_path"] == "loramgr.serve.ray_serve:build_app" and app["route_prefix"] == "/"
    assert app["args"]["home"] == str(ws.home.resolve()) and app["args"]["sets_per_replica"] == 5
    assert app["args"]["config"]["max_queue"] == 9 and "api_key" not in app["args"]["config"]
    generator = {d["name"]: d for d in app["deployments"]}["Generator"]
    assert generator["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4}
    assert generator["max_ongoing_requests"] == 10 and generator["ray_actor_options"] == {"num_cpus": 1.0}
    assert data["http_options"] == {"host": "127.0.0.1", "port": 8123}
    if HAVE_RAY:  # Ray's own schema accepts it, and the builder builds from its args
        from ray.serve.schema import ServeDeploySchema

        from loramgr.serve.ray_serve import build_app

        ServeDeploySchema.model_validate(data)
        ingress = build_app(app["args"])._bound_deployment  # the graph Serve builds from import_path + args
        generator = ingress.init_args[0]._bound_deployment
        assert {d["name"] for d in app["deployments"]} <= {ingress.name, generator.name}  # options reach them
        assert generator.init_args == (str(ws.home.resolve()), app["args"]["config"], 5)
        assert ingress.init_args[1:] == (str(ws.home.resolve()), app["args"]["config"])


def test_write_config_imports_no_ray(ws, tmp_path):
    """The extra is optional: --write-config (and loramgr serve without --ray) never import Ray."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = ("import sys; from loramgr.cli import main; "
            f"code = main(['--home', {str(ws.home)!r}, 'serve', '--write-config', {str(tmp_path / 'c.yaml')!r}]); "
            "assert code == 0 and not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--autoscale", "4,1"], "--autoscale 4,1"),
    (["--autoscale", "two"], "--autoscale 'two'"),
    (["--replicas", "0"], "--replicas must be at least 1"),
    (["--sets-per-replica", "0"], "--sets-per-replica must be at least 1"),
])
def test_bad_ray_flags_are_one_line(ws, tmp_path, capsys, flags, message):
    path = tmp_path / "serve.yaml"
    assert main(["--home", str(ws.home), "serve", "--write-config", str(path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not path.exists()


def test_gpu_backends_reserve_a_gpu_per_replica(ws):
    options = RayOptions(replicas=2, gpus_per_replica=1.0)
    generator = serve_config(ws.home, CONFIG, options)["applications"][0]["deployments"][0]
    assert generator["num_replicas"] == 2 and generator["ray_actor_options"]["num_gpus"] == 1.0


# -- a local Ray cluster ----------------------------------------------------------------------

def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (not zombies), wherever they were re-parented."""
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _wait_gone(pids: set[int], timeout: float = 30) -> set[int]:
    deadline = time.monotonic() + timeout
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    return _alive(pids)


def _replica_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ServeReplica:loramgr:Generator" in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def cluster(ws):
    """Ray on this machine with the app deployed: 2 Generator replicas of the tiny base."""
    import ray
    from ray import serve

    from loramgr.serve.ray_serve import application

    before, environ = _children(os.getpid()), dict(os.environ)
    ray.init(address="local", num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _node_ip_address="127.0.0.1")  # loopback only
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(ws.home, CONFIG, RayOptions(replicas=2, sets_per_replica=2)), name="loramgr",
              route_prefix="/")
    state = {"url": f"http://127.0.0.1:{port}", "started": _children(os.getpid()) - before}
    assert state["started"], "Ray started no process?"
    yield state
    # Shut down here, not in a test: a test that ended the cluster would break every one that random order
    # (pytest-randomly) ran after it. A process left behind fails this teardown.
    serve.shutdown()
    ray.shutdown()
    os.environ.clear()  # ray.init leaves RAY_AUTH_MODE, PYTHONBREAKPOINT, ... for later tests' subprocesses
    os.environ.update(environ)
    assert not _wait_gone(state["started"]), "Ray processes left behind"


@pytest.fixture(scope="module")
def expected(ws, tmp_path_factory) -> list[list[bytes]]:
    """`loramgr run`'s PNG bytes (images, then the edge map) for every set in SETS."""
    return [cli_run(ws, tmp_path_factory.mktemp("run"), prompt="a house", loras=loras, control=control, seed=SEED)
            for loras, control in SETS]


def _load(url: str, ws, order: list[int], clients: int = 4) -> list[dict]:
    bodies = [request_body(ws, *s) for s in SETS]
    with httpx.Client(timeout=300) as http, ThreadPoolExecutor(clients) as pool:
        def send(i):
            r = http.post(f"{url}/v1/generate", json=bodies[order[i]])
            return {"set": order[i], "status": r.status_code, "body": r.json(), "headers": r.headers}

        return list(pool.map(send, range(len(order))))


def _images(body: dict) -> list[bytes]:
    return [base64.b64decode(b) for b in [*body["images"], body["control_map"]]]


def _order(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(len(SETS)) for _ in range(n)]


@needs_ray
def test_two_replicas_bit_exact_sticky_and_fewer_swaps_than_random(cluster, ws, expected):
    from ray import serve

    url = cluster["url"]
    assert httpx.get(f"{url}/readyz").status_code == 200
    results = _load(url, ws, _order(N, 1))
    assert [r["status"] for r in results] == [200] * N, [r["body"] for r in results if r["status"] != 200][:2]
    for r in results:
        assert _images(r["body"]) == expected[r["set"]], f"set {SETS[r['set']]}: image differs from loramgr run"
    # the ingress derived each set's id from the body; the same set mostly reached the same replica
    ids = {r["set"]: r["body"]["set_id"] for r in results}
    assert ids == {i: set_id(GenerateRequest(**request_body(ws, *SETS[i]))) for i in ids}
    by_set = {i: Counter(r["body"]["replica"] for r in results if r["set"] == i) for i in ids}
    sticky = sum(c.most_common(1)[0][1] for c in by_set.values()) / len(results)
    replicas = {r["body"]["replica"] for r in results}
    assert len(replicas) == 2 and sticky >= 0.75, by_set
    routed_swaps = sum(r["body"]["swapped"] for r in results)

    # the same load without set ids: Ray's default (power of two choices) routing
    handle = serve.get_deployment_handle("Generator", app_name="loramgr")
    requests = [GenerateRequest(**request_body(ws, *SETS[i])) for i in _order(N, 1)]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda q: handle.generate.remote(q).result(timeout_s=300), requests))
    assert all("result" in r for r in replies)
    random_swaps = sum(r["result"]["swapped"] for r in replies)
    assert all(_images(r["result"]) == expected[i] for r, i in zip(replies, _order(N, 1)))
    assert routed_swaps < random_swaps, (routed_swaps, random_swaps)
    replica_stats = {}
    for _ in range(40):  # stats goes to any replica: ask until both answered
        stats = handle.stats.remote().result(timeout_s=60)
        replica_stats[stats["replica"]] = stats
        if len(replica_stats) == 2:
            break
    assert set(replica_stats) == replicas
    print(f"swaps per request: set-id routing {routed_swaps / N:.2f}, random {random_swaps / N:.2f}; "
          f"sticky {sticky:.2f}; {by_set}; replica RSS (MiB) {[round(s['rss_mib']) for s in replica_stats.values()]}")


@needs_ray
def test_client_header_and_errors_through_ray(cluster, ws, expected):
    url = cluster["url"]
    r = httpx.post(f"{url}/v1/generate", json=request_body(ws, *SETS[1]), headers={"serve_multiplexed_model_id": "mine"},
                   timeout=300)
    assert r.status_code == 200 and r.json()["set_id"] == "mine" and _images(r.json()) == expected[1]
    bad = httpx.post(f"{url}/v1/generate", json={**request_body(ws, *SETS[1]), "loras": [{"name": "nope"}]},
                     timeout=300)
    assert bad.status_code == 422 and bad.json()["field"] == "loras.0.name"
    over = httpx.post(f"{url}/v1/generate", json={**request_body(ws, *SETS[0]), "steps": 21}, timeout=300)
    assert over.status_code == 422 and over.json()["field"] == "steps"
    names = [a["name"] for a in httpx.get(f"{url}/v1/adapters").json()["adapters"]]
    assert {"sv_a", "sv_b", "sv_hed"} <= set(names) and names == sorted(names)  # serve tests may have added more
    assert "loramgr_generations_total" in httpx.get(f"{url}/metrics").text


@needs_ray
def test_ray_route_matches_diffusers(cluster, ws, tiny_folder):
    """An image through Ray's proxy against diffusers' pipeline with the same files; omitted fields as documented."""
    import numpy as np
    from PIL import Image

    from reference_pipelines import assert_close_images, diffusers_images, documented
    from test_serve_support import decode, reference_for

    r = httpx.post(f"{cluster['url']}/v1/generate", timeout=300, json={
        "prompt": "a house", "image": png_b64(ws.home / "house.png"), "seed": SEED, "steps": 3, "resolution": 64,
        "loras": [{"name": "sv_b", "weight": 0.6}], "control": "sv_hed"})
    assert r.status_code == 200, r.text
    house = np.asarray(Image.open(ws.home / "house.png").convert("RGB"))
    expected = diffusers_images(reference_for(ws, tiny_folder, [("sv_b", 0.6)], "sv_hed"), house,
                                documented(prompt="a house", seed=SEED, steps=3, resolution=64))
    assert_close_images([decode(b) for b in r.json()["images"]], expected)


@needs_ray
@pytest.mark.slow
def test_killed_replica_loses_no_request_silently(cluster, ws, expected):
    from ray import serve

    url = cluster["url"]
    victims = _replica_pids()
    assert len(victims) == 2
    order = _order(24, 2)
    results: list[dict] = []
    loader = threading.Thread(target=lambda: results.extend(_load(url, ws, order)))
    loader.start()
    time.sleep(3)
    os.kill(sorted(victims)[0], signal.SIGKILL)
    loader.join(600)
    assert len(results) == 24
    print("statuses after killing a replica:", Counter(r["status"] for r in results))
    for r in results:
        if r["status"] == 200:
            assert _images(r["body"]) == expected[r["set"]]
        else:
            assert r["status"] == 503 and "Retry-After" in r["headers"], r["body"]
    # Serve restarts the replica; afterwards every set works again on 2 replicas
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = serve.status().applications["loramgr"].deployments["Generator"]
        if status.replica_states.get("RUNNING") == 2 and len(_replica_pids()) == 2:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"the replica was not restarted: {serve.status()}")
    assert _replica_pids() != victims
    after = _load(url, ws, list(range(len(SETS))) * 2)
    assert all(r["status"] == 200 and _images(r["body"]) == expected[r["set"]] for r in after)


@needs_ray
@pytest.mark.slow
def test_cli_serves_on_ray_and_exits_0_on_sigterm(ws, expected):
    """The real `loramgr serve --ray` process: a local cluster, one request, SIGTERM, nothing left behind."""
    port = free_port()
    with reaped(start_server(ws, port, "--ray", "--replicas", "1", ready_s=240)) as proc:
        started = _children(proc.pid)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json=request_body(ws, *SETS[2]), timeout=300)
        assert r.status_code == 200 and _images(r.json()) == expected[2]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    assert not _wait_gone(started), "Ray processes left behind"
