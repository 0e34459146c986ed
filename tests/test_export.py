"""Base export: weight map coverage, exactness, graph parity with torch, sources, bad input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from loramgr.cli import main
from loramgr.errors import LoramgrError
from loramgr.export import export_base
from loramgr.manifest import FUSED, TEXT_ENCODER, Manifest
from loramgr.models.fused import TextEncoder, UNetControlNet
from loramgr.models.loading import load_components
from loramgr.pipeline.control import control_scales
from loramgr.workspace import Workspace


@pytest.fixture(scope="module")
def tiny_torch(tiny_folder):
    return load_components(tiny_folder)


def _session(ws: Workspace, graph: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(ws.base_dir("tiny") / Manifest.load(ws.base_dir("tiny")).graphs[graph].path), so)


def test_weight_map_covers_every_parameter_with_its_own_external_initializer(tiny_workspace, tiny_torch):
    manifest = Manifest.load(tiny_workspace.base_dir("tiny"))
    fused = UNetControlNet(tiny_torch["unet"], tiny_torch["controlnet"])
    expected = {FUSED: dict(fused.named_parameters()), TEXT_ENCODER: dict(TextEncoder(tiny_torch["text_encoder"]).named_parameters())}
    for graph, params in expected.items():
        weights = manifest.graphs[graph].weights
        assert set(weights) == set(params)
        assert len({e.initializer for e in weights.values()}) == len(params)  # nothing shared
        model = onnx.load(str(tiny_workspace.base_dir("tiny") / manifest.graphs[graph].path), load_external_data=False)
        external = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        assert {e.initializer for e in weights.values()} <= external
        data = np.memmap(tiny_workspace.base_dir("tiny") / manifest.graphs[graph].data, dtype=np.uint8, mode="r")
        for name, entry in weights.items():
            assert np.array_equal(entry.read(data), entry.to_onnx_layout(params[name].numpy())), name
    layouts = {e.layout for e in manifest.graphs[FUSED].weights.values()}
    assert layouts == {"identity", "transpose", "reshape"}


def test_weight_entry_read_gives_each_parameter_in_torch_layout(tiny_workspace, tiny_torch):
    """WeightEntry.read: the tensor at the weight map's offset, stored layout and dtype, as a view of the map."""
    folder = tiny_workspace.base_dir("tiny")
    manifest = Manifest.load(folder)
    fused = UNetControlNet(tiny_torch["unet"], tiny_torch["controlnet"])
    expected = {FUSED: dict(fused.named_parameters()), TEXT_ENCODER: dict(TextEncoder(tiny_torch["text_encoder"]).named_parameters())}
    for graph, params in expected.items():
        data = np.memmap(folder / manifest.graphs[graph].data, dtype=np.uint8, mode="r")
        for name, entry in manifest.graphs[graph].weights.items():
            value = entry.read(data)
            assert value.shape == entry.shape and value.dtype == np.dtype(entry.dtype), name
            assert np.shares_memory(value, data), name
            assert np.array_equal(entry.to_torch_layout(value), params[name].detach().numpy()), name
    entry = next(e for e in manifest.graphs[FUSED].weights.values() if e.layout == "transpose")
    raw = (folder / manifest.graphs[FUSED].data).read_bytes()
    assert np.array_equal(entry.read(raw), entry.read(np.memmap(folder / manifest.graphs[FUSED].data, dtype=np.uint8)))


def test_weight_entry_read_writes_through_and_refuses_a_short_file(tmp_path, tiny_workspace):
    """A writable map gives a writable view (how a merged copy of a base is written); a cut file is named."""
    folder = tiny_workspace.base_dir("tiny")
    info = Manifest.load(folder).graphs[FUSED]
    copy = tmp_path / "weights.bin"
    copy.write_bytes((folder / info.data).read_bytes())
    entry = max(info.weights.values(), key=lambda e: e.offset)
    data = np.memmap(copy, dtype=np.uint8, mode="r+")
    entry.read(data)[...] = np.full(entry.shape, 0.5, dtype=entry.dtype)
    data.flush()
    del data
    assert (entry.read(np.memmap(copy, dtype=np.uint8, mode="r")) == 0.5).all()
    with pytest.raises(LoramgrError, match=rf"{entry.initializer}: bytes [\d,]+\.\.[\d,]+ lie beyond the end of its"):
        entry.read(np.memmap(folder / info.data, dtype=np.uint8, mode="r")[: entry.offset + 4])


def test_weights_feed_compute_ops_directly(tiny_workspace):
    """Layout ops on weights were folded at export: no Transpose/Unsqueeze reads a weight."""
    manifest = Manifest.load(tiny_workspace.base_dir("tiny"))
    model = onnx.load(str(tiny_workspace.base_dir("tiny") / manifest.graphs[FUSED].path), load_external_data=False)
    weights = {e.initializer for e in manifest.graphs[FUSED].weights.values()}
    readers = {n.op_type for n in model.graph.node for i in n.input if i in weights}
    assert readers <= {"Conv", "MatMul", "Gemm", "Add", "Mul", "LayerNormalization"}, readers


@pytest.mark.parametrize("guess_mode", [False, True])
def test_fused_graph_matches_torch(tiny_workspace, tiny_torch, guess_mode):
    fused = UNetControlNet(tiny_torch["unet"], tiny_torch["controlnet"]).eval()
    session = _session(tiny_workspace, FUSED)
    gen = torch.Generator().manual_seed(3)
    for n, size in ((1, 8), (2, 16)):
        feeds = {
            "sample": torch.randn(2 * n, 4, size, size, generator=gen),
            "timestep": torch.full((2 * n,), 601.0),
            "encoder_hidden_states": torch.randn(2 * n, 77, 32, generator=gen),
            "controlnet_cond": torch.rand(2 * n, 3, 8 * size, 8 * size, generator=gen),
            "control_scales": control_scales(n, 0.7, guess_mode, "controlnet"),
        }
        with torch.no_grad():
            expected = fused(**feeds).numpy()
        got = session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_text_encoder_graph_matches_torch(tiny_workspace, tiny_torch):
    ids = torch.randint(0, 520, (3, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = TextEncoder(tiny_torch["text_encoder"])(ids).numpy()
    got = _session(tiny_workspace, TEXT_ENCODER).run(None, {"input_ids": ids.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-5


def test_zero_initialized_weights_keep_their_own_initializers(tmp_path, tiny_folder):
    """A fresh ControlNet's zero convs are equal tensors; the exporter must not merge them."""
    from loramgr.export import export_components

    components = load_components(tiny_folder)
    zeroed = [p for n, p in components["controlnet"].named_parameters() if "controlnet_" in n and "cond_embedding" not in n]
    for p in zeroed:
        p.data.zero_()
    manifest = export_components(components, tmp_path / "z", name="z", source={})
    weights = manifest.graphs[FUSED].weights
    assert len({e.initializer for e in weights.values()}) == len(weights)
    data = np.memmap(tmp_path / "z" / manifest.graphs[FUSED].data, dtype=np.uint8, mode="r")
    names = [n for n in weights if n.startswith("controlnet.controlnet_") and "cond_embedding" not in n]
    assert len(names) >= 2 * 13
    assert all(not weights[n].read(data).any() for n in names)


def test_single_file_checkpoint_exports_to_the_same_base(tmp_path, tiny_workspace, tiny_folder, tiny_torch):
    """An original-format checkpoint + original ControlNet export to a byte-identical base."""
    from loramgr.models.ldm import save_controlnet_original, save_single_file

    save_single_file(tiny_torch, tmp_path / "tiny.safetensors")
    save_controlnet_original(tiny_torch["controlnet"], tmp_path / "control_tiny.pth")
    ws = Workspace.resolve(tmp_path / "ws")
    manifest = export_base(ws, "tiny", model=tmp_path / "tiny.safetensors", controlnet=tmp_path / "control_tiny.pth")
    reference = Manifest.load(tiny_workspace.base_dir("tiny"))
    for graph in (FUSED, TEXT_ENCODER):
        assert manifest.graphs[graph].weights == reference.graphs[graph].weights
        assert manifest.graphs[graph].data_sha256 == reference.graphs[graph].data_sha256
    assert manifest.fingerprint == reference.fingerprint


def _truncated(path: Path) -> Path:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 100)
    return path


def _sdxl_shaped(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(640, 2048),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 768),
    }, str(path))
    return path


@pytest.mark.parametrize("make_bad, reason", [
    (lambda d: d / "missing_folder", "no such file"),
    (lambda d: (d / "notes.txt").write_text("hello") and d / "notes.txt", ".txt"),
    (lambda d: _truncated(d / "cut.safetensors"), "truncated"),
    (lambda d: _sdxl_shaped(d / "sdxl.safetensors"), "SDXL"),
])
def test_bad_sources_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, make_bad, reason):
    src = make_bad(tmp_path)
    code = main(["--home", str(tmp_path / "ws"), "export", "--name", "bad", "--model", str(src)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert str(src.name) in err and reason.lower() in err.lower(), err
    base_models = tmp_path / "ws" / "base_models"
    assert not base_models.exists() or not any(base_models.iterdir())


def test_list_and_inspect_json(tiny_workspace, capsys):
    assert main(["--home", str(tiny_workspace.home), "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [b["name"] for b in listing["bases"]] == ["tiny"]
    assert listing["bases"][0]["parameters"][FUSED] == 2446788 + 1045832
    assert main(["--home", str(tiny_workspace.home), "inspect", "tiny", "--json"]) == 0
    detail = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in detail["graphs"][FUSED]["inputs"]] == [
        "sample", "timestep", "encoder_hidden_states", "controlnet_cond", "control_scales"]
    assert main(["--home", str(tiny_workspace.home), "inspect", "nope"]) == 2


def test_fp16_base_runs_close_to_fp32(tmp_path, tiny_folder, tiny_torch):
    """--dtype fp16: UNet/ControlNet/VAE weights in fp16, the text encoder kept fp32, I/O fp32."""
    from loramgr.backends.onnxruntime import OrtRunner
    from loramgr.export import export_components

    fused32 = UNetControlNet(tiny_torch["unet"], tiny_torch["controlnet"]).eval()
    gen = torch.Generator().manual_seed(4)
    feeds = {
        "sample": torch.randn(2, 4, 8, 8, generator=gen), "timestep": torch.full((2,), 300.0),
        "encoder_hidden_states": torch.randn(2, 77, 32, generator=gen),
        "controlnet_cond": torch.rand(2, 3, 64, 64, generator=gen),
        "control_scales": control_scales(1, 1.0, False, "controlnet"),
    }
    with torch.no_grad():
        expected = fused32(**feeds).numpy()
    manifest = export_components(load_components(tiny_folder), tmp_path / "b16", name="b16", source={}, dtype="fp16")
    dtypes = {g: {e.dtype for e in gi.weights.values()} for g, gi in manifest.graphs.items()}
    assert dtypes[FUSED] == {"float16"} and dtypes[TEXT_ENCODER] == {"float32"}
    got = OrtRunner.open(tmp_path / "b16").predict_noise(**feeds).numpy()
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= 2e-2 * np.abs(expected).max()
