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
from loramgr.manifest import CONTROLNET, TEXT_ENCODER, UNET, Manifest
from loramgr.models.graphs import RESIDUALS, ControlNetResiduals, TextEncoder, UNetWithResiduals
from loramgr.models.loading import load_components
from loramgr.workspace import Workspace


@pytest.fixture(scope="module")
def tiny_torch(tiny_folder):
    return load_components(tiny_folder)


def _graph_params(tiny_torch) -> dict[str, dict[str, torch.nn.Parameter]]:
    """Every adapter graph's torch parameters, by the names the weight map uses."""
    return {UNET: dict(UNetWithResiduals(tiny_torch["unet"]).named_parameters()),
            CONTROLNET: dict(ControlNetResiduals(tiny_torch["controlnet"]).named_parameters()),
            TEXT_ENCODER: dict(TextEncoder(tiny_torch["text_encoder"]).named_parameters())}


def _session(ws: Workspace, graph: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(ws.base_dir("tiny") / Manifest.load(ws.base_dir("tiny")).graphs[graph].path), so)


def test_weight_map_covers_every_parameter_with_its_own_external_initializer(tiny_workspace, tiny_torch):
    manifest = Manifest.load(tiny_workspace.base_dir("tiny"))
    for graph, params in _graph_params(tiny_torch).items():
        weights = manifest.graphs[graph].weights
        assert set(weights) == set(params)
        assert len({e.initializer for e in weights.values()}) == len(params)  # nothing shared
        model = onnx.load(str(tiny_workspace.base_dir("tiny") / manifest.graphs[graph].path), load_external_data=False)
        external = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        assert {e.initializer for e in weights.values()} <= external
        data = np.memmap(tiny_workspace.base_dir("tiny") / manifest.graphs[graph].data, dtype=np.uint8, mode="r")
        for name, entry in weights.items():
            assert np.array_equal(entry.read(data), entry.to_onnx_layout(params[name].numpy())), name
    layouts = {e.layout for e in manifest.graphs[UNET].weights.values()}
    assert layouts == {"identity", "transpose", "reshape"}
    assert all(p.startswith("controlnet.") for p in manifest.graphs[CONTROLNET].weights)
    assert all(p.startswith("unet.") for p in manifest.graphs[UNET].weights)


def test_weight_entry_read_gives_each_parameter_in_torch_layout(tiny_workspace, tiny_torch):
    """WeightEntry.read: the tensor at the weight map's offset, stored layout and dtype, as a view of the map."""
    folder = tiny_workspace.base_dir("tiny")
    manifest = Manifest.load(folder)
    for graph, params in _graph_params(tiny_torch).items():
        data = np.memmap(folder / manifest.graphs[graph].data, dtype=np.uint8, mode="r")
        for name, entry in manifest.graphs[graph].weights.items():
            value = entry.read(data)
            assert value.shape == entry.shape and value.dtype == np.dtype(entry.dtype), name
            assert np.shares_memory(value, data), name
            assert np.array_equal(entry.to_torch_layout(value), params[name].detach().numpy()), name
    entry = next(e for e in manifest.graphs[UNET].weights.values() if e.layout == "transpose")
    raw = (folder / manifest.graphs[UNET].data).read_bytes()
    assert np.array_equal(entry.read(raw), entry.read(np.memmap(folder / manifest.graphs[UNET].data, dtype=np.uint8)))


def test_weight_entry_read_writes_through_and_refuses_a_short_file(tmp_path, tiny_workspace):
    """A writable map gives a writable view (how a merged copy of a base is written); a cut file is named."""
    folder = tiny_workspace.base_dir("tiny")
    info = Manifest.load(folder).graphs[UNET]
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
    for graph in (UNET, CONTROLNET):
        model = onnx.load(str(tiny_workspace.base_dir("tiny") / manifest.graphs[graph].path), load_external_data=False)
        weights = {e.initializer for e in manifest.graphs[graph].weights.values()}
        readers = {n.op_type for n in model.graph.node for i in n.input if i in weights}
        assert readers <= {"Conv", "MatMul", "Gemm", "Add", "Mul", "LayerNormalization"}, readers


def test_unet_and_controlnet_graphs_match_torch(tiny_workspace, tiny_torch):
    """The ControlNet's residuals and the UNet fed with them, at two sizes and 1 or 3 prompt chunks of context."""
    controlnet = ControlNetResiduals(tiny_torch["controlnet"]).eval()
    unet = UNetWithResiduals(tiny_torch["unet"]).eval()
    control_session, unet_session = _session(tiny_workspace, CONTROLNET), _session(tiny_workspace, UNET)
    gen = torch.Generator().manual_seed(3)
    for batch, size, tokens in ((1, 8, 77), (2, 16, 231)):
        context = {
            "sample": torch.randn(batch, 4, size, size, generator=gen),
            "timestep": torch.full((batch,), 601.0),
            "encoder_hidden_states": torch.randn(batch, tokens, 32, generator=gen),
        }
        cond = torch.rand(batch, 3, 8 * size, 8 * size, generator=gen)
        with torch.no_grad():
            residuals = controlnet(*context.values(), cond)
            expected = unet(*context.values(), *residuals).numpy()
        got = control_session.run(None, {**{k: v.numpy() for k, v in context.items()}, "controlnet_cond": cond.numpy()})
        for ours, theirs in zip(got, residuals):
            assert np.abs(ours - theirs.numpy()).max() <= 1e-4 * max(1.0, theirs.abs().max().item())
        feeds = {**{k: v.numpy() for k, v in context.items()}, **{n: r.numpy() for n, r in zip(RESIDUALS, residuals)}}
        noise = unet_session.run(None, feeds)[0]
        assert noise.shape == expected.shape
        assert np.abs(noise - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_text_encoder_graph_matches_transformers(tiny_workspace, tiny_torch):
    """Every CLIP-skip output, against transformers' own hidden states (independent of loramgr's wrapper);
    vectors replace the token embeddings where the mask says so."""
    model = tiny_torch["text_encoder"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 520, (3, 77), generator=gen)
    session = _session(tiny_workspace, TEXT_ENCODER)
    feeds = {"input_ids": ids.numpy(), "token_vectors": np.zeros((3, 77, 32), np.float32),
             "token_mask": np.zeros((3, 77), np.float32)}
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        expected = [out.last_hidden_state] + [model.final_layer_norm(h) for h in out.hidden_states[-2:0:-1]]
    assert got.shape == (2, 3, 77, 32)  # the tiny text model has 2 layers: CLIP skip 1 and 2
    for skip, value in enumerate(expected[: got.shape[0]]):
        assert np.abs(got[skip] - value.numpy()).max() <= 1e-5, f"clip skip {skip + 1}"
    vectors = torch.randn(3, 77, 32, generator=gen)
    mask = torch.zeros(3, 77)
    mask[:, 4:6] = 1
    with torch.no_grad():
        embeds = model.embeddings.token_embedding(ids)
        embeds[:, 4:6] = vectors[:, 4:6]
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # for the mask and positions
        swapped = _encode_embeds(model, embeds)
    del hidden
    got = session.run(None, {**feeds, "token_vectors": vectors.numpy(), "token_mask": mask.numpy()})[0]
    assert np.abs(got[0] - swapped.numpy()).max() <= 1e-5


def _encode_embeds(model, embeds: torch.Tensor) -> torch.Tensor:
    """transformers' CLIP text model on token embeddings, by its own submodules (position embeddings, causal mask)."""
    from transformers.masking_utils import create_causal_mask

    hidden = model.embeddings(inputs_embeds=embeds)
    mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None, cache=None)
    return model.final_layer_norm(model.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True)
                                  .last_hidden_state)


def test_a_base_of_the_old_layout_says_how_to_rebuild_it(tmp_path, tiny_workspace, capsys):
    """Format 1 (UNet and ControlNet fused): one line naming the export command that rebuilds it."""
    import shutil

    old = tmp_path / "ws" / "base_models" / "tiny"
    shutil.copytree(tiny_workspace.base_dir("tiny"), old, ignore=shutil.ignore_patterns("*.onnx_data", "source"))
    raw = json.loads((old / "manifest.json").read_text())
    raw["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(raw))
    code = main(["--home", str(tmp_path / "ws"), "inspect", "tiny"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "loramgr export --arch tiny --random --seed 0 --name tiny" in err and "convert" in err


def test_zero_initialized_weights_keep_their_own_initializers(tmp_path, tiny_folder):
    """A fresh ControlNet's zero convs are equal tensors; the exporter must not merge them."""
    from loramgr.export import export_components

    components = load_components(tiny_folder)
    zeroed = [p for n, p in components["controlnet"].named_parameters() if "controlnet_" in n and "cond_embedding" not in n]
    for p in zeroed:
        p.data.zero_()
    manifest = export_components(components, tmp_path / "z", name="z", source={})
    weights = manifest.graphs[CONTROLNET].weights
    assert len({e.initializer for e in weights.values()}) == len(weights)
    data = np.memmap(tmp_path / "z" / manifest.graphs[CONTROLNET].data, dtype=np.uint8, mode="r")
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
    for graph in (UNET, CONTROLNET, TEXT_ENCODER):
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
    assert listing["bases"][0]["parameters"][UNET] == 2446788
    assert listing["bases"][0]["parameters"][CONTROLNET] == 1045832
    assert main(["--home", str(tiny_workspace.home), "inspect", "tiny", "--json"]) == 0
    detail = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in detail["graphs"][CONTROLNET]["inputs"]] == [
        "sample", "timestep", "encoder_hidden_states", "controlnet_cond"]
    assert [i["name"] for i in detail["graphs"][UNET]["inputs"]] == [
        "sample", "timestep", "encoder_hidden_states", *RESIDUALS]
    assert main(["--home", str(tiny_workspace.home), "inspect", "nope"]) == 2


def test_fp16_base_runs_close_to_fp32(tmp_path, tiny_folder, tiny_torch):
    """--dtype fp16: UNet/ControlNet/VAE weights in fp16, the text encoder kept fp32, I/O fp32."""
    from loramgr.backends.onnxruntime import OrtRunner
    from loramgr.export import export_components

    controlnet = ControlNetResiduals(tiny_torch["controlnet"]).eval()
    unet = UNetWithResiduals(tiny_torch["unet"]).eval()
    gen = torch.Generator().manual_seed(4)
    context = (torch.randn(2, 4, 8, 8, generator=gen), torch.full((2,), 300.0), torch.randn(2, 77, 32, generator=gen))
    cond = torch.rand(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        expected = unet(*context, *controlnet(*context, cond)).numpy()
    manifest = export_components(load_components(tiny_folder), tmp_path / "b16", name="b16", source={}, dtype="fp16")
    dtypes = {g: {e.dtype for e in gi.weights.values()} for g, gi in manifest.graphs.items()}
    assert dtypes[UNET] == dtypes[CONTROLNET] == {"float16"} and dtypes[TEXT_ENCODER] == {"float32"}
    with OrtRunner.open(tmp_path / "b16") as runner:
        got = runner.predict_noise(*context, runner.control_residuals(None, *context, cond)).numpy()
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= 2e-2 * np.abs(expected).max()
