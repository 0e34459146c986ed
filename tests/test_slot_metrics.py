"""/metrics reports the ControlNet slots the service's runner holds, and the bytes of their weights.

Tiny base, 64 px, 3 steps, over FastAPI's TestClient: requests with one and two ControlNet
units (the base's own and a converted one), and what each leaves in the slots.
"""

from __future__ import annotations

import re

import onnx
import pytest
from fastapi.testclient import TestClient

from loramgr.manifest import CONTROLNET, Manifest
from loramgr.serve import ServeConfig, create_app
from serve_support import FAST, png_b64, serve_workspace


@pytest.fixture(scope="module")
def ws(tiny_workspace, tmp_path_factory):
    return serve_workspace(tiny_workspace, tmp_path_factory)


def _gauges(client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))
            for name in ("loramgr_controlnet_slots", "loramgr_controlnet_slot_bytes")}


def _controlnet_bytes(ws) -> int:
    """The ControlNet graph's initializers, summed from the ONNX file itself."""
    base = ws.base_dir("tiny")
    model = onnx.load(str(base / Manifest.load(base).graphs[CONTROLNET].path), load_external_data=False)
    lengths = [int(next(e.value for e in t.external_data if e.key == "length")) for t in model.graph.initializer
               if t.name.startswith("controlnet.")]
    return sum(lengths)


def test_metrics_count_the_slots_each_generation_leaves(ws):
    weights = _controlnet_bytes(ws)
    body = {"prompt": "a house", "image": png_b64(ws.home / "house.png"), **FAST}
    with TestClient(create_app(ws, ServeConfig(max_controlnets=2)), base_url="http://127.0.0.1") as client:
        assert _gauges(client) == {"loramgr_controlnet_slots": 1, "loramgr_controlnet_slot_bytes": weights}
        for controls, held in (([{"name": "canny"}, {"name": "sv_hed"}], 2),
                               ([{"name": "sv_hed"}], 2),  # the base's slot stays filled, for a later unit
                               ([], 2)):
            r = client.post("/v1/generate", json={**body, "controls": controls})
            assert r.status_code == 200, r.text
            assert _gauges(client) == {"loramgr_controlnet_slots": held,
                                       "loramgr_controlnet_slot_bytes": held * weights}
        assert client.app.state.service.engine.runner.controlnet_slots() == [None, "sv_hed"]
