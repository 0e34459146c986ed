#!/usr/bin/env python3
"""Load test of `loramgr serve`: K concurrent clients, mixed adapter sets, every image checked bit for bit.

For each adapter set the reference images are made first by `loramgr run` (its ``main()``,
in this process) with the same settings and seed. Then, per scheduling mode (``grouping``
and ``fifo``, i.e. swap whenever the set changes), a `loramgr serve` process is started on
a free loopback port, one warm-up request is sent, and ``--clients`` asyncio clients send
``--requests`` requests in one fixed shuffled order of the sets. Every response's images and
control map must equal the reference PNG bytes: a response made with another request's
adapters fails the check. Reported per mode: throughput, p50/p95 latency, swaps per request.

Bounded: at most ``--requests`` requests (10,000 at most) and ``--time-limit`` seconds of
sending per mode; only loopback addresses are contacted.

Example (docs/serving.md's table)::

    python scripts/loadtest.py --home WS --clients 8 --requests 200 --steps 4 --resolution 64 \\
        --sets base sv_a:0.8 sv_b:0.6,sv_hed sv_a:0.5,sv_b:0.5
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import ipaddress
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_REQUESTS = 10_000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", required=True, help="workspace (base_models/, adapters/)")
    p.add_argument("--base", help="base name (default: the only one)")
    p.add_argument("--image", help="input image (default: loramgr's sample house picture)")
    p.add_argument("--sets", nargs="+", default=["base"],
                   help="adapter sets as loramgr run --sweep writes them: NAME[:W],...,CONTROLNET; 'base' = none")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds of sending per mode")
    p.add_argument("--modes", nargs="+", choices=("grouping", "fifo"), default=["grouping", "fifo"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="a house")
    p.add_argument("--max-overtake", type=int, default=8)
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for loramgr serve")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS or not 1 <= args.clients <= 64:
        p.error(f"--requests must be in [1, {MAX_REQUESTS}] and --clients in [1, 64]")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"refusing {url}: the load test only talks to loopback addresses")


def parse_set(spec: str, ws) -> tuple[list[str], str]:
    from loramgr.runtime import AdapterChoice

    choice = AdapterChoice.parse("none" if spec == "base" else spec, ws)
    return list(choice.loras), choice.control or "canny"


def references(args, ws, image: Path, sets) -> list[list[bytes]]:
    """PNG bytes (images then edge map) that `loramgr run` writes for each set."""
    from loramgr.cli import main

    out = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        for i, (loras, control) in enumerate(sets):
            folder = Path(tmp) / str(i)
            argv = ["--home", args.home, "run", "--image", str(image), "--prompt", args.prompt, "--seed",
                    str(args.seed), "--steps", str(args.steps), "--resolution", str(args.resolution),
                    "--control", control, "--out", str(folder), "--json"]
            argv += [a for spec in loras for a in ("--lora", spec)]
            argv += ["--base", args.base] if args.base else []
            if main(argv) != 0:
                raise SystemExit(f"loramgr run failed for set {loras} {control}")
            sidecar = json.loads(next(folder.glob("*.json")).read_text())
            out.append([(folder / n).read_bytes() for n in [*sidecar["images"], *sidecar["control_maps"]]])
    return out


def request_body(args, image_b64: str, loras: list[str], control: str) -> dict:
    specs = []
    for spec in loras:
        name, sep, weight = spec.partition(":")
        specs.append({"name": name, **({"weight": float(weight)} if sep else {})})
    return {"prompt": args.prompt, "image": image_b64, "seed": args.seed, "steps": args.steps,
            "resolution": args.resolution, "loras": specs, "control": control}


def start_server(args, mode: str, port: int) -> subprocess.Popen:
    import httpx

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("LORAMGR_API_KEY", None)
    cmd = [sys.executable, "-m", "loramgr", "--home", args.home, "serve", "--host", "127.0.0.1", "--port", str(port),
           "--scheduling", mode, "--max-overtake", str(args.max_overtake), "--max-queue", str(max(64, args.clients)),
           "--log-level", "warning", *(["--base", args.base] if args.base else []), *args.serve_arg]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"loramgr serve exited with {proc.returncode}: {proc.stderr.read()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("loramgr serve was not ready within 600 s")


async def load(url: str, bodies: list[dict], expected: list[list[bytes]], order: list[int], clients: int,
               time_limit: float) -> dict:
    import httpx

    check_loopback(url)
    results = []
    next_index = 0
    stop_at = time.monotonic() + time_limit

    async def client(http: httpx.AsyncClient):
        nonlocal next_index
        while next_index < len(order) and time.monotonic() < stop_at:
            i = next_index
            next_index += 1
            which = order[i]
            start = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/generate", json=bodies[which])
            except httpx.HTTPError as exc:
                results.append({"set": which, "status": None, "error": repr(exc)})
                continue
            latency = time.perf_counter() - start
            entry = {"set": which, "status": r.status_code, "latency": latency}
            if r.status_code == 200:
                data = r.json()
                got = [base64.b64decode(b) for b in [*data["images"], data["control_map"]]]
                entry.update(match=got == expected[which], swapped=data["swapped"],
                             queue_wait=data["timings"]["queue_wait"], swap=data["timings"]["swap"])
            else:
                entry["error"] = r.text[:300]
            results.append(entry)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r.get("status") == 200]
    latencies = sorted(r["latency"] for r in ok)
    swaps = sum(r["swapped"] for r in ok)
    return {
        "requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
        "mismatches": sum(not r["match"] for r in ok), "wall_s": wall,
        "throughput_rps": len(ok) / wall if wall else 0.0,
        "p50_s": _percentile(latencies, 50), "p95_s": _percentile(latencies, 95),
        "swaps": swaps, "swaps_per_request": swaps / len(ok) if ok else 0.0,
        "swap_s_total": sum(r["swap"] for r in ok),
        "max_queue_wait_s": max((r["queue_wait"] for r in ok), default=0.0),
        "failures": [r for r in results if r.get("status") != 200 or not r.get("match")][:5],
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(q) - 1]


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from loramgr.workspace import Workspace

    ws = Workspace.resolve(args.home)
    args.home = str(ws.home)
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(args.image) if args.image else Path(tmp) / "house.png"
        if not args.image:
            from PIL import Image

            from loramgr.samples import sample_image

            Image.fromarray(sample_image(96)).save(image)
        sets = [parse_set(spec, ws) for spec in args.sets]
        t0 = time.perf_counter()
        expected = references(args, ws, image, sets)
        reference_s = time.perf_counter() - t0
        image_b64 = base64.b64encode(image.read_bytes()).decode("ascii")
    bodies = [request_body(args, image_b64, loras, control) for loras, control in sets]
    rng = random.Random(args.seed)
    order = [rng.randrange(len(sets)) for _ in range(args.requests)]
    report = {"sets": args.sets, "clients": args.clients, "requests": args.requests, "steps": args.steps,
              "resolution": args.resolution, "reference_s": reference_s, "modes": {}}
    for mode in args.modes:
        port = free_port()
        proc = start_server(args, mode, port)
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(load(url, bodies, expected, [0], 1, args.time_limit))  # warm-up, not counted
            report["modes"][mode] = asyncio.run(load(url, bodies, expected, order, args.clients, args.time_limit))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "killed"
            report["modes"].setdefault(mode, {})["server_exit"] = code
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    bad = any(m.get("mismatches") or m.get("errors") or m.get("requests") != args.requests
              for m in report["modes"].values())
    return 1 if bad else 0


def render(report: dict) -> str:
    lines = [f"{report['clients']} clients, {report['requests']} requests, sets {', '.join(report['sets'])}, "
             f"{report['resolution']} px, {report['steps']} steps",
             "| scheduling | ok / sent | bit-exact | throughput (req/s) | p50 (s) | p95 (s) | swaps | swaps/request |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, m in report["modes"].items():
        if "ok" not in m:
            continue
        lines.append(f"| {mode} | {m['ok']} / {m['requests']} | {m['ok'] - m['mismatches']} / {m['ok']} | "
                     f"{m['throughput_rps']:.2f} | {m['p50_s']:.2f} | {m['p95_s']:.2f} | {m['swaps']} | "
                     f"{m['swaps_per_request']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
