"""Shared helpers of the test_serve*.py files: a workspace with the tiny base and sample adapters
(:func:`sample_adapters`, which test_runtime.py converts too).

Not a conftest (the serve tests own only their files): the workspace is built once per
test session through a module-level cache, and links the session's tiny base.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

_CACHE: dict[str, Path] = {}

FAST = {"resolution": 64, "steps": 3, "n_prompt": "lowres, worst quality"}


def sample_adapters(ws, folder: Path, prefix: str) -> dict[str, Path]:
    """The sample kohya LoRA ``PREFIX_a`` (trigger blindbox), kohya LoCon ``PREFIX_b`` and ControlNet
    ``PREFIX_hed`` written into ``folder`` and converted into ``ws`` for its tiny base: name -> source."""
    from loramgr.convert import convert_adapter
    from loramgr.manifest import Manifest
    from loramgr.samples import write_controlnet, write_kohya_lora

    manifest = Manifest.load(ws.base_dir("tiny"))
    files = {
        f"{prefix}_a": write_kohya_lora(folder / f"{prefix}_a.safetensors", manifest.param_shapes(), seed=11,
                                        trigger="blindbox"),
        f"{prefix}_b": write_kohya_lora(folder / f"{prefix}_b.safetensors", manifest.param_shapes(), seed=12, rank=8,
                                        alpha=4.0, locon=True),
        f"{prefix}_hed": write_controlnet(folder / f"{prefix}_hed", manifest.configs["controlnet"], seed=13),
    }
    for name, path in files.items():
        convert_adapter(ws, path, base="tiny", name=name)
    return files


def serve_workspace(tiny_workspace, tmp_path_factory):
    """A workspace (own adapters/ folder, the session's tiny base linked) with sv_a, sv_b (LoCon), sv_hed."""
    from loramgr.samples import sample_image
    from loramgr.workspace import Workspace

    if "home" not in _CACHE:
        home = tmp_path_factory.mktemp("serve_ws")
        (home / "base_models").mkdir()
        os.symlink(tiny_workspace.base_dir("tiny"), home / "base_models" / "tiny")
        src = home / "sources"  # the files converted: what the diffusers references load
        src.mkdir()
        sample_adapters(Workspace.resolve(home), src, "sv")
        Image.fromarray(sample_image(96)).save(home / "house.png")
        _CACHE["home"] = home
    return Workspace.resolve(_CACHE["home"])


def reference_for(ws, tiny_folder: Path, loras: list[tuple[str, float]] = (), control: str = "canny"):
    """diffusers' pipeline with the source files of ``loras`` (name, weight) and of ``control`` (or the base's)."""
    from reference_pipelines import reference_pipeline

    src = ws.home / "sources"
    return reference_pipeline(tiny_folder, [(src / f"{name}.safetensors", weight) for name, weight in loras],
                              None if control == "canny" else src / control)


def png_b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_run(ws, out: Path, *, prompt: str, loras=(), control="canny", seed=0, **settings) -> list[bytes]:
    """``loramgr run`` (its main(), in this process) with FAST settings: the PNG bytes it wrote (images, edges)."""
    import json

    from loramgr.cli import main

    argv = ["--home", str(ws.home), "run", "--image", str(ws.home / "house.png"), "--prompt", prompt,
            "--seed", str(seed), "--control", control, "--out", str(out), "--json"]
    for spec in loras:
        argv += ["--lora", spec]
    for key, value in {**FAST, **settings}.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert main(argv) == 0
    sidecar = json.loads(next(Path(out).glob("*.json")).read_text())
    return [(Path(out) / name).read_bytes() for name in [*sidecar["images"], *sidecar["control_maps"]]]


def start_server(ws, port: int, *args: str, ready_s: float = 120, env: dict[str, str] | None = None,
                 headers: dict[str, str] | None = None) -> subprocess.Popen:
    """A real ``loramgr serve`` process on a loopback ``port`` once ``/readyz`` answers 200.

    No API key or credentials from this process's environment; ``env`` adds variables,
    ``headers`` go with the ``/readyz`` probe (credentials for a server that wants them).
    """
    env = {**{k: v for k, v in os.environ.items() if k not in ("LORAMGR_API_KEY", "LORAMGR_API_AUTH")},
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "loramgr", "--home", str(ws.home), "serve", "--port", str(port),
                             "--log-level", "warning", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", headers=headers, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    kill_tree(proc)
    raise AssertionError(f"server not ready within {ready_s:g} s")


def kill_tree(proc: subprocess.Popen, recorded: Iterable[psutil.Process] = ()) -> None:
    """SIGKILL ``proc``, the processes it started (``loramgr serve --ray``: all of Ray's) and ``recorded``.

    ``recorded``: processes seen in the tree earlier, which may have been re-parented since.
    psutil checks each one's start time, so a reused pid is never killed.
    """
    procs = list(recorded)
    if proc.poll() is None:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs += psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
    for child in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait()


@contextlib.contextmanager
def served(app) -> Iterator[str]:
    """``app`` under uvicorn in a thread on a free loopback port: its base URL, until the block ends."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


@contextlib.contextmanager
def reaped(proc: subprocess.Popen, recorded: Iterable[psutil.Process] = (),
           unwanted: tuple[str, ...] = ("Traceback",)) -> Iterator[subprocess.Popen]:
    """Kill ``proc`` and its tree (:func:`kill_tree`) if the block leaves them running; after a block that
    passed, its output has none of ``unwanted``. ``recorded`` may grow during the block."""
    try:
        yield proc
    finally:
        kill_tree(proc, recorded)
    output = proc.stdout.read()
    assert not [text for text in unwanted if text in output], output
