"""TensorRT backend: engine cache keys, shape profiles, refit planning and weight handling.

Everything that needs no GPU runs here, on the tiny base, with numbers: refit transitions
are replayed through a fake refitter that reads the very buffers loramgr hands over (by
pointer, at refit time, as TensorRT does). The tests that build and run real engines
are at the end and skip unless ``tensorrt`` (or ``tensorrt_rtx``) and a CUDA GPU exist.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from loramgr.adapter_file import AdapterTarget, load_adapter, save_adapter
from loramgr.adapters import AdapterSet
from loramgr.backends.tensorrt import engines
from loramgr.backends.tensorrt import (
    EngineSession, TrtOptions, TrtRunner, check_refittable, load_engine, missing_values, prepare_weight,
    read_constants, refit_plan, refit_tensors, refit_weights, weight_dtype,
)
from loramgr.backends.tensorrt import (
    DEFAULT_PROFILE, EngineKey, Precision, RuntimeInfo, Shape, ShapeProfile, build_engines, check_input_shapes,
    engine_key, engine_keys, engine_status, import_tensorrt, input_shapes, plan_precision, record_options,
    resolve_options, save_engine,
)
from loramgr.errors import LoramgrError
from loramgr.manifest import FUSED, GRAPHS, TEXT_ENCODER, Manifest
from loramgr.merge import BaseWeights

TO_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
TO_K = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
CONV_IN, CONV_IN_BIAS = "unet.conv_in.weight", "unet.conv_in.bias"
TEXT_Q = "text_model.encoder.layers.0.self_attn.q_proj.weight"
CN_NORM = "controlnet.down_blocks.0.resnets.0.norm1.weight"
CN_NORM_SCALE = "/controlnet/down_blocks.0/resnets.0/norm1/Constant_2_output_0"  # its InstanceNorm's ones
TINY_PROFILE = ShapeProfile(Shape(1, 8, 8), Shape(2, 8, 8), Shape(2, 16, 16))
RUNTIME = RuntimeInfo("tensorrt 10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")


# -- adapters on the tiny base ------------------------------------------------------------


def _lora_target(manifest: Manifest, graph: str, param: str, rank: int, seed: int, scale: float) -> AdapterTarget:
    entry = manifest.graphs[graph].weights[param]
    out_features, fan_in = entry.torch_shape[0], int(np.prod(entry.torch_shape[1:]))
    gen = np.random.default_rng(seed)
    factors = {"up": gen.standard_normal((out_features, rank)).astype(np.float32) * 0.1,
               "down": gen.standard_normal((rank, fan_in)).astype(np.float32) * 0.1}
    return AdapterTarget(entry.initializer, graph, param, "lora", scale, factors)


def _write(folder: Path, name: str, kind: str, manifest: Manifest, targets: list[AdapterTarget]):
    path = folder / f"{name}.lora"
    save_adapter(path, kind, {"loramgr.base_name": manifest.name, "loramgr.base_fingerprint": manifest.fingerprint},
                 targets)
    return load_adapter(path)


@pytest.fixture(scope="module")
def tiny(tiny_workspace):
    base_dir = tiny_workspace.base_dir("tiny")
    manifest = Manifest.load(base_dir)
    return SimpleNamespace(dir=base_dir, manifest=manifest, weights=BaseWeights(manifest, base_dir))


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    """Two LoRAs sharing one weight, and a ControlNet replacing every ControlNet weight."""
    folder, m = tmp_path_factory.mktemp("adapters"), tiny.manifest
    a = _write(folder, "lora_a", "lora", m, [_lora_target(m, FUSED, TO_Q, 4, 1, 0.5),
                                             _lora_target(m, FUSED, CONV_IN, 2, 2, 1.0)])
    b = _write(folder, "lora_b", "lora", m, [_lora_target(m, FUSED, TO_Q, 4, 3, 0.25),
                                             _lora_target(m, FUSED, TO_K, 4, 4, 0.5),
                                             _lora_target(m, TEXT_ENCODER, TEXT_Q, 4, 5, 1.0)])
    gen = np.random.default_rng(6)
    controlnet = [
        AdapterTarget(e.initializer, FUSED, p, "full", 1.0,
                      {"weight": (tiny.weights.read(FUSED, e) + 0.05 * gen.standard_normal(e.shape)).astype(e.dtype)})
        for p, e in m.graphs[FUSED].weights.items() if p.startswith("controlnet.")
    ]
    cn = _write(folder, "canny", "controlnet", m, controlnet)
    return SimpleNamespace(a=a, b=b, controlnet=cn)


# -- a refitter that behaves as TensorRT documents ------------------------------------------


class FakeWeights:
    def __init__(self, dtype, ptr: int, count: int):
        self.dtype, self.ptr, self.count = dtype, ptr, count


FAKE_TRT = SimpleNamespace(
    Weights=FakeWeights,
    DataType=SimpleNamespace(FLOAT=SimpleNamespace(name="FLOAT"), HALF=SimpleNamespace(name="HALF")),
    TensorLocation=SimpleNamespace(DEVICE="device", HOST="host"),
)
_CTYPES = {"FLOAT": (ctypes.c_float, np.float32), "HALF": (ctypes.c_uint16, np.float16)}


class FakeRefitter:
    """Engine weights by name; rejects wrong counts/types, reports combined partners as missing,
    and reads the handed-over buffers only when ``refit_cuda_engine`` runs."""

    def __init__(self, engine: dict[str, np.ndarray], combined: list[set[str]] = ()):
        self.engine, self.combined = engine, combined
        self.pending: dict[str, FakeWeights] = {}
        self.weights_validation = True

    def get_weights_prototype(self, name):
        value = self.engine[name]
        return SimpleNamespace(dtype=SimpleNamespace(name="HALF" if value.dtype == np.float16 else "FLOAT"),
                               size=value.size)

    def set_named_weights(self, name, weights, location):
        proto = self.get_weights_prototype(name)
        if location != "host" or weights.count != proto.size or weights.dtype.name != proto.dtype.name:
            return False
        self.pending[name] = weights
        return True

    def get_missing_weights(self):
        return sorted(n for group in self.combined if group & set(self.pending) for n in group - set(self.pending))

    def refit_cuda_engine(self):
        if self.get_missing_weights():
            return False
        for name, w in self.pending.items():
            ctype, dtype = _CTYPES[w.dtype.name]
            raw = np.ctypeslib.as_array((ctype * w.count).from_address(w.ptr))
            self.engine[name] = raw.view(dtype).reshape(self.engine[name].shape).copy()
        return True


def _fake_engines(tiny, dtype=None) -> dict[str, dict[str, np.ndarray]]:
    """Refittable graphs' weights at their base values, as a freshly built engine holds them."""
    return {g: {e.initializer: np.array(tiny.weights.read(g, e), dtype=dtype)
                for e in tiny.manifest.graphs[g].weights.values()} for g in (FUSED, TEXT_ENCODER)}


def _reference(tiny, adapter_set: AdapterSet) -> dict[str, dict[str, np.ndarray]]:
    """What an engine built from a merged export would hold, in float64 and by the documented formulas
    (docs/lora-format.md), not by loramgr's merge: base values; a ControlNet's "full" targets replace theirs;
    then each LoRA target adds ``weight * scale * up @ down`` in the torch layout."""
    graphs = (FUSED, TEXT_ENCODER)
    state = {g: {e.initializer: np.array(tiny.weights.read(g, e), dtype=np.float64)
                 for e in tiny.manifest.graphs[g].weights.values()} for g in graphs}
    entries = {(g, e.initializer): e for g in graphs for e in tiny.manifest.graphs[g].weights.values()}
    targets = [(t, w) for a, w in adapter_set.adapters for t in a.targets.values()]
    for target, weight in sorted(targets, key=lambda tw: tw[0].kind != "full"):  # replacements first
        entry, named = entries[(target.graph, target.initializer)], state[target.graph]
        if target.kind == "full":
            named[target.initializer] = target.tensors["weight"].astype(np.float64)  # stored in the ONNX layout
            continue
        assert target.kind == "lora", target.kind
        up = target.tensors["up"].astype(np.float64).reshape(entry.torch_shape[0], -1)
        down = target.tensors["down"].astype(np.float64).reshape(up.shape[1], -1)
        merged = entry.to_torch_layout(named[target.initializer]) + weight * target.scale * (up @ down).reshape(
            entry.torch_shape)
        named[target.initializer] = entry.to_onnx_layout(merged)
    return state


def _switch(tiny, engine, plan, new: AdapterSet, combined=()) -> int:
    """Apply one refit plan to the fake engines the way TrtRunner.set_adapters does."""
    count = 0
    for graph, tensors in refit_tensors(tiny.weights, plan, new).items():
        onnx_path = tiny.dir / tiny.manifest.graphs[graph].path
        fill = lambda names, g=graph, p=onnx_path: missing_values(tiny.weights, g, p, names)  # noqa: E731
        count += refit_weights(FAKE_TRT, FakeRefitter(engine[graph], combined), tensors, device=torch.device("cpu"),
                               validate=False, fill_missing=fill)
    return count


def _differing(engine, reference, rtol: float = 1e-6) -> dict[str, list[str]]:
    """Per graph, the weights farther from the float64 reference than ``rtol`` x the weight's largest value
    (fp32 rounding of a merge is ~1e-7 of it; verify's fp32 tolerance is 1e-6, docs/verify.md)."""
    return {graph: [n for n, ref in named.items()
                    if np.abs(engine[graph][n].astype(np.float64) - ref).max() > rtol * max(np.abs(ref).max(), 1e-30)]
            for graph, named in reference.items()}


def _assert_state(engine, adapter_set: AdapterSet, tiny) -> None:
    for graph, differing in _differing(engine, _reference(tiny, adapter_set)).items():
        assert not differing, f"{graph}: {len(differing)} weights differ, first {differing[:3]}"


# -- refit planning: A -> B -> A is exactly A -------------------------------------------------


def test_refit_plan_is_the_union_of_both_sets(tiny, adapters):
    a_and_b = AdapterSet(((adapters.a, 1.0), (adapters.b, 1.0)))
    plan = refit_plan(AdapterSet(((adapters.a, 1.0),)), AdapterSet(((adapters.b, 1.0),)))
    assert plan == {g: set(n) for g, n in a_and_b.touched().items()}
    init = {p: tiny.manifest.graphs[FUSED].weights[p].initializer for p in (TO_Q, CONV_IN, TO_K)}
    assert plan[FUSED] == set(init.values())
    assert refit_plan(AdapterSet(), AdapterSet()) == {}


def test_switching_back_and_forth_restores_every_weight_exactly(tiny, adapters):
    full = AdapterSet(((adapters.a, 0.8), (adapters.b, 0.5), (adapters.controlnet, 1.0)))
    only_b = AdapterSet(((adapters.b, 1.0),))
    engine, previous, seen = _fake_engines(tiny), AdapterSet(), {}
    for new in (full, only_b, full, AdapterSet(), only_b):
        _switch(tiny, engine, refit_plan(previous, new), new)
        _assert_state(engine, new, tiny)
        state = {g: {n: v.copy() for n, v in named.items()} for g, named in engine.items()}
        for graph, named in seen.get(id(new), {}).items():  # the second visit: bit for bit the first
            assert all(np.array_equal(state[graph][n], v) for n, v in named.items()), graph
        seen[id(new)] = state
        previous = new
    assert any(_differing(engine, _reference(tiny, AdapterSet())).values())  # the comparison tells sets apart


def test_refitting_only_the_new_sets_weights_leaves_residue(tiny, adapters):
    """The control for the test above: B's names alone keep A's LoRA and the ControlNet."""
    full = AdapterSet(((adapters.a, 0.8), (adapters.controlnet, 1.0)))
    only_b = AdapterSet(((adapters.b, 1.0),))
    engine = _fake_engines(tiny)
    _switch(tiny, engine, refit_plan(AdapterSet(), full), full)
    _switch(tiny, engine, only_b.touched(), only_b)
    conv_in = tiny.manifest.graphs[FUSED].weights[CONV_IN].initializer
    leftover = _differing(engine, _reference(tiny, only_b))[FUSED]
    assert conv_in in leftover
    assert len(leftover) == 1 + sum(1 for p in tiny.manifest.graphs[FUSED].weights if p.startswith("controlnet."))


def test_fp16_engine_gets_fp32_merges_cast_once(tiny, adapters):
    new = AdapterSet(((adapters.a, 0.8), (adapters.b, 0.5)))
    engine = _fake_engines(tiny, np.float16)
    _switch(tiny, engine, refit_plan(AdapterSet(), new), new)
    for graph, named in _reference(tiny, new).items():
        for name, ref in named.items():
            got = engine[graph][name]
            assert got.dtype == np.float16
            # one rounding to fp16 (half an fp16 step at the value) on top of the fp32 merge's error
            bound = np.spacing(np.abs(ref).astype(np.float16)).astype(np.float64) / 2 + 1e-6 * np.abs(ref).max()
            assert (np.abs(got.astype(np.float64) - ref) <= bound).all(), name


def test_weights_combined_at_build_time_are_supplied_with_their_current_values(tiny, adapters):
    """TensorRT reports the partners of a fused weight missing; they get base / constant values."""
    weights = tiny.manifest.graphs[FUSED].weights
    conv_in, bias, norm = weights[CONV_IN].initializer, weights[CONV_IN_BIAS].initializer, weights[CN_NORM].initializer
    combined = [{conv_in, bias}, {norm, CN_NORM_SCALE}]
    engine = _fake_engines(tiny)
    engine[FUSED][CN_NORM_SCALE] = np.zeros(8, np.float32)  # a constant the engine folded into the norm
    new = AdapterSet(((adapters.a, 1.0), (adapters.controlnet, 1.0)))
    plan = refit_plan(AdapterSet(), new)
    count = _switch(tiny, engine, plan, new, combined)
    assert count == sum(len(n) for n in plan.values()) + 2
    assert np.array_equal(engine[FUSED][bias], tiny.weights.read(FUSED, weights[CONV_IN_BIAS]))
    assert np.array_equal(engine[FUSED][CN_NORM_SCALE], np.ones(8, np.float32))


def test_a_refit_fails_when_tensorrt_rejects_a_buffer(tiny, adapters):
    new = AdapterSet(((adapters.a, 1.0),))
    engine = _fake_engines(tiny)
    to_q = tiny.manifest.graphs[FUSED].weights[TO_Q].initializer
    engine[FUSED][to_q] = np.zeros(7, np.float32)  # an engine whose weight has another count
    with pytest.raises(LoramgrError, match=r"TensorRT refused the weights .*to_q.*1024 values"):
        _switch(tiny, engine, refit_plan(AdapterSet(), new), new)


def test_missing_values_reads_base_weights_and_graph_constants(tiny):
    onnx_path = tiny.dir / tiny.manifest.graphs[FUSED].path
    entry = tiny.manifest.graphs[FUSED].weights[CONV_IN_BIAS]
    values = missing_values(tiny.weights, FUSED, onnx_path, {entry.initializer, CN_NORM_SCALE})
    assert np.array_equal(values[entry.initializer], tiny.weights.read(FUSED, entry))
    assert np.array_equal(values[CN_NORM_SCALE], np.ones(8, np.float32))
    with pytest.raises(LoramgrError, match=r"cannot supply .*first: no/such/constant"):
        missing_values(tiny.weights, FUSED, onnx_path, {"no/such/constant"})


def test_read_constants_matches_the_onnx_file(tiny):
    onnx_path = tiny.dir / tiny.manifest.graphs[TEXT_ENCODER].path
    model = onnx.load(str(onnx_path), load_external_data=False)
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                 if n.op_type == "Constant"}
    picked = set(list(constants)[:5])
    found = read_constants(onnx_path, picked | {"absent"})
    assert set(found) == picked
    assert all(np.array_equal(found[n], constants[n]) for n in picked)


# -- refittable weights and weight preparation ----------------------------------------------


def test_check_refittable_names_what_tensorrt_folded_away(tiny, adapters):
    plan = refit_plan(AdapterSet(), AdapterSet(((adapters.b, 1.0),)))
    all_weights = {g: {e.initializer for e in tiny.manifest.graphs[g].weights.values()} for g in (FUSED, TEXT_ENCODER)}
    check_refittable(plan, all_weights)
    folded = dict(all_weights, **{FUSED: all_weights[FUSED] - {tiny.manifest.graphs[FUSED].weights[TO_K].initializer}})
    with pytest.raises(LoramgrError, match=r"1 weights .* not refittable in the unet_controlnet engine .*to_k"):
        check_refittable(plan, folded)
    with pytest.raises(LoramgrError, match=r"text_encoder engine is not refittable"):
        check_refittable(plan, {FUSED: all_weights[FUSED]})


def test_weight_dtype_follows_the_refitter_prototype():
    assert weight_dtype("HALF", np.dtype(np.float32)) == torch.float16
    assert weight_dtype("FLOAT", np.dtype(np.float16)) == torch.float32
    assert weight_dtype(None, np.dtype(np.float16)) == torch.float16  # no prototype API: the ONNX dtype
    with pytest.raises(LoramgrError, match="FP8"):
        weight_dtype("FP8", np.dtype(np.float32))


def test_prepare_weight_is_contiguous_and_rounds_once():
    base = np.random.default_rng(0).standard_normal((6, 10)).astype(np.float32)
    transposed = base.T  # a view: not C-contiguous
    tensor = prepare_weight(transposed, torch.float16, torch.device("cpu"))
    assert tensor.is_contiguous() and tensor.dtype == torch.float16 and tuple(tensor.shape) == (10, 6)
    assert np.array_equal(tensor.numpy(), transposed.astype(np.float16))
    frozen = base.copy()  # base weights arrive as read-only memory-map views
    frozen.setflags(write=False)
    copy = prepare_weight(frozen, torch.float32, torch.device("cpu"))
    assert np.array_equal(copy.numpy(), base) and copy.numpy().flags.writeable


# -- shape profiles -------------------------------------------------------------------------


def test_shape_profile_parse_and_defaults():
    assert ShapeProfile.parse("1x32x32", " 2 x 64 x 64 ", "4x96x96") == DEFAULT_PROFILE
    assert str(DEFAULT_PROFILE) == "min 1x32x32, opt 2x64x64, max 4x96x96"


@pytest.mark.parametrize("args, message", [
    (("1x32x32", "2x60x64", "4x96x96"),
     r"--opt 2x60x64: latent height 60 must be a positive multiple of 8 \(image height 480"),
    (("1x32x32", "2x64x64", "4x96x100"), r"--max 4x96x100: latent width 100"),
    (("0x32x32", "2x64x64", "4x96x96"), r"--min 0x32x32: batch must be at least 1"),
    (("1x32x32", "8x64x64", "4x96x96"), r"batch must grow .* got 1, 8, 4"),
    (("1x64x64", "2x32x32", "4x96x96"), r"height must grow .* got 64, 32, 96"),
    (("1x32", "2x64x64", "4x96x96"), r"--min '1x32': write BATCHxLATENT_HEIGHTxLATENT_WIDTH"),
    (("1x32x32", "2x64x64", "512x512"), r"--max '512x512'"),
])
def test_shape_profile_errors_name_the_option_and_value(args, message):
    with pytest.raises(LoramgrError, match=message):
        ShapeProfile.parse(*args)


def test_input_shapes_follow_the_manifest_axes(tiny):
    graphs = tiny.manifest.graphs
    fused = input_shapes(graphs[FUSED].inputs, TINY_PROFILE)
    assert fused == {
        "sample": [[1, 4, 8, 8], [2, 4, 8, 8], [2, 4, 16, 16]],
        "timestep": [[1], [2], [2]],
        "encoder_hidden_states": [[1, 77, 32], [2, 77, 32], [2, 77, 32]],
        "controlnet_cond": [[1, 3, 64, 64], [2, 3, 64, 64], [2, 3, 128, 128]],  # 8x the latent
        "control_scales": [[1, 13], [2, 13], [2, 13]],
    }
    assert input_shapes(graphs[TEXT_ENCODER].inputs, TINY_PROFILE) == {"input_ids": [[1, 77], [2, 77], [2, 77]]}
    assert input_shapes(graphs["vae_encoder"].inputs, TINY_PROFILE)["image"][2] == [2, 3, 128, 128]


def test_inputs_outside_the_profile_are_refused_with_the_fix(tiny):
    shapes = input_shapes(tiny.manifest.graphs[FUSED].inputs, TINY_PROFILE)
    check_input_shapes(FUSED, shapes, {"sample": (2, 4, 16, 8), "timestep": (1,)})
    expected = r"sample has shape \[4, 4, 8, 8\], outside .*\[1, 4, 8, 8\]\.\.\[2, 4, 16, 16\]: build the engines with"
    with pytest.raises(LoramgrError, match=expected + " --min/--max"):
        check_input_shapes(FUSED, shapes, {"sample": (4, 4, 8, 8)})
    with pytest.raises(LoramgrError, match="controlnet_cond"):
        check_input_shapes(FUSED, shapes, {"controlnet_cond": (2, 3, 64)})


# -- precision --------------------------------------------------------------------------------


def test_precision_plan():
    assert plan_precision("fp32", False, True) == Precision("fp32", False, False)
    assert plan_precision("fp32", True, True) == Precision("fp16", True, False)  # TensorRT 10: FP16 flag
    assert plan_precision("fp16", False, False) == Precision("fp16", False, True)  # strongly typed
    assert plan_precision("fp16", True, True) == Precision("fp16", False, True)
    with pytest.raises(LoramgrError, match=r"--fp16 on an fp32 base .* base with `loramgr export --dtype fp16`"):
        plan_precision("fp32", True, False)  # TensorRT 11 / TensorRT-RTX


# -- engine cache -----------------------------------------------------------------------------


def _key(tiny, graph=FUSED, **changes) -> EngineKey:
    key = engine_key(tiny.manifest, graph, Precision("fp16", True, False), TINY_PROFILE, RUNTIME)
    return EngineKey(**{**key.__dict__, **changes})


def test_engine_key_records_what_the_engine_depends_on(tiny):
    key = _key(tiny).to_json()
    assert key["base_fingerprint"] == tiny.manifest.fingerprint
    assert (key["gpu"], key["compute_capability"], key["tensorrt"]) == (RUNTIME.gpu, "9.0", RUNTIME.tensorrt)
    assert key["precision"] == {"name": "fp16", "fp16_flag": True, "strongly_typed": False}
    assert key["refittable"] is True and _key(tiny, "vae_decoder").refittable is False
    assert key["input_shapes"]["sample"] == [[1, 4, 8, 8], [2, 4, 8, 8], [2, 4, 16, 16]]
    json.dumps(key)  # the sidecar holds it as it is


def test_cached_engine_is_used_only_for_the_same_key(tiny, tmp_path):
    key = _key(tiny)
    assert engine_status(tmp_path, key).reason == "no engine yet"
    save_engine(tmp_path, key, b"serialized engine")
    assert engine_status(tmp_path, key) == engines.EngineStatus(True, "current")
    assert (tmp_path / "unet_controlnet.plan").read_bytes() == b"serialized engine"
    changes = {
        "base_fingerprint": "0" * 64, "tensorrt": "tensorrt 10.14.1.48", "gpu": "NVIDIA L4",
        "compute_capability": "8.9", "precision": {"name": "fp32", "fp16_flag": False, "strongly_typed": False},
        "input_shapes": input_shapes(tiny.manifest.graphs[FUSED].inputs, DEFAULT_PROFILE),
        "refittable": False, "engine_format": engines.ENGINE_FORMAT + 1,
    }
    for field, value in changes.items():
        status = engine_status(tmp_path, _key(tiny, **{field: value}))
        assert not status.current and status.reason.startswith(f"built for {field}: "), status


def test_text_encoder_engine_survives_a_latent_size_change(tiny, tmp_path):
    """Its inputs depend on the batch only, so only the other graphs are rebuilt."""
    bigger = ShapeProfile(TINY_PROFILE.min, TINY_PROFILE.opt, Shape(2, 32, 32))
    fp32 = Precision("fp32", False, False)
    for graph in (FUSED, TEXT_ENCODER):
        save_engine(tmp_path, engine_key(tiny.manifest, graph, fp32, TINY_PROFILE, RUNTIME), b"plan")
    new = {g: engine_key(tiny.manifest, g, fp32, bigger, RUNTIME) for g in (FUSED, TEXT_ENCODER)}
    assert engine_status(tmp_path, new[TEXT_ENCODER]).current
    assert engine_status(tmp_path, new[FUSED]).reason.startswith("built for input_shapes")


def test_damaged_or_foreign_cache_files_are_rebuilt(tiny, tmp_path):
    key = _key(tiny)
    save_engine(tmp_path, key, b"serialized engine")
    (tmp_path / "unet_controlnet.plan").write_bytes(b"truncated")
    assert "9 bytes, its key file says 17" in engine_status(tmp_path, key).reason
    (tmp_path / "unet_controlnet.json").write_text("{not json")
    assert engine_status(tmp_path, key).reason == "damaged key file unet_controlnet.json"
    save_engine(tmp_path, _key(tiny, TEXT_ENCODER), b"serialized engine")
    shutil.copy(tmp_path / "text_encoder.json", tmp_path / "unet_controlnet.json")  # another graph's key
    (tmp_path / "unet_controlnet.plan").write_bytes(b"serialized engine")
    assert engine_status(tmp_path, key).reason.startswith("built for graph: 'text_encoder' -> 'unet_controlnet'")


def test_a_failed_write_never_leaves_an_old_key_vouching_for_the_plan(tiny, tmp_path):
    key = _key(tiny)
    save_engine(tmp_path, key, b"old engine")
    with pytest.raises(TypeError):
        save_engine(tmp_path, key, object())  # not a buffer: fails while the plan is written
    assert (tmp_path / "unet_controlnet.plan").read_bytes() == b"old engine"
    assert engine_status(tmp_path, key).reason == "engine without its key file"
    assert not list(tmp_path.glob(".*.tmp"))


def test_run_after_build_engine_asks_the_cache_for_the_same_keys(tiny, tmp_path):
    """`build-engine --fp16 --min/--opt/--max`, then `run --backend tensorrt` with no TensorRT options:
    the run resolves its options from the cache's record and wants exactly the keys just built."""
    folder = tmp_path / "engines"
    built = TrtOptions("fp16", TINY_PROFILE)  # what cmd_build_engine makes of --fp16 and a custom profile
    for key in engine_keys(tiny.manifest, built, RUNTIME, has_fp16_flag=True).values():
        save_engine(folder, key, b"serialized engine")
    record_options(folder, built)  # build_engines' last step
    run = resolve_options(folder, TrtOptions())  # what TrtRunner.open does with the CLI's unset options
    assert run == built
    for key in engine_keys(tiny.manifest, run, RUNTIME, has_fp16_flag=True).values():
        assert engine_status(folder, key).current, key.graph
    # Options given explicitly still win, field by field: the other field comes from the record.
    assert resolve_options(folder, TrtOptions(precision="fp32")) == TrtOptions("fp32", TINY_PROFILE)
    assert resolve_options(folder, TrtOptions(profile=DEFAULT_PROFILE)) == TrtOptions("fp16", DEFAULT_PROFILE)
    # No record (an empty cache) or a damaged one: the defaults, as before.
    assert resolve_options(tmp_path / "none", TrtOptions()) == TrtOptions("fp32", DEFAULT_PROFILE)
    (folder / "options.json").write_text("{not json")
    assert resolve_options(folder, None) == TrtOptions("fp32", DEFAULT_PROFILE)
    with pytest.raises(LoramgrError, match="precision 'fp8'"):
        TrtOptions("fp8")


# -- what is missing without TensorRT or a GPU ------------------------------------------------


@pytest.fixture
def no_tensorrt(monkeypatch):
    for name in engines.TRT_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_missing_module_and_gpu_are_both_named_with_the_fix(no_tensorrt):
    with pytest.raises(LoramgrError) as err:
        import_tensorrt()
    message = str(err.value)
    assert "import tensorrt:" in message and "import tensorrt_rtx:" in message
    assert "`pip install tensorrt`" in message and "`pip install tensorrt-rtx`" in message
    assert "torch.cuda.is_available() is False" in message and "ONNX Runtime backend" in message


def test_with_tensorrt_but_no_gpu_only_the_gpu_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = str(pytest.raises(LoramgrError, import_tensorrt).value)
    assert "no CUDA GPU" in message and "pip install" not in message


def test_cpu_torch_build_is_called_out():
    message = engines.missing_runtime_message([], False, "2.13.0+cpu")
    assert "torch 2.13.0+cpu is a CPU-only build: install a CUDA build of torch" in message


def test_entry_points_fail_cleanly_without_tensorrt(no_tensorrt, tiny):
    with pytest.raises(LoramgrError, match="no TensorRT Python module"):
        build_engines(tiny.dir, TrtOptions(profile=TINY_PROFILE))
    with pytest.raises(LoramgrError, match="no TensorRT Python module"):
        TrtRunner.open(tiny.dir)
    bad = ShapeProfile(Shape(1, 8, 8), Shape(2, 12, 8), Shape(2, 16, 16))
    with pytest.raises(LoramgrError, match="--opt 2x12x8"):  # arguments are checked before the runtime
        build_engines(tiny.dir, TrtOptions(profile=bad))
    assert not (tiny.dir / "engines").exists()


# -- on a CUDA GPU with TensorRT ----------------------------------------------------------------

HAVE_TRT = any(importlib.util.find_spec(m) for m in engines.TRT_MODULES)
needs_trt_gpu = pytest.mark.skipif(
    not (HAVE_TRT and torch.cuda.is_available()),
    reason=f"needs the tensorrt (or tensorrt_rtx) module and a CUDA GPU; here: "
           f"tensorrt {'found' if HAVE_TRT else 'missing'}, CUDA {'found' if torch.cuda.is_available() else 'missing'}")
FP32_TOL = 5e-3  # x max|reference|: fp32 engines may run matmuls/convs in TF32 (10-bit mantissa)
FP16_TOL = 3e-2  # x max|reference|: fp16 weights and activations against an fp32 reference


def _feeds(batch: int = 2, size: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, size, size, generator=gen), "timestep": torch.full((batch,), 501.0),
        "encoder_hidden_states": torch.randn(batch, 77, 32, generator=gen),
        "controlnet_cond": torch.rand(batch, 3, 8 * size, 8 * size, generator=gen),
        "control_scales": torch.full((batch, 13), 0.8),
    }


def _close(got: torch.Tensor, expected: torch.Tensor, tol: float) -> float:
    got, expected = got.detach().float().cpu(), expected.detach().float().cpu()
    assert got.shape == expected.shape
    error = float((got - expected).abs().max())
    assert error <= tol * float(expected.abs().max()), f"max error {error}, max |reference| {expected.abs().max()}"
    return error


@pytest.fixture(scope="module")
def gpu_base(tiny, tmp_path_factory):
    """A private copy of the tiny base, so engines/ never lands in the shared workspace."""
    target = tmp_path_factory.mktemp("trt") / "tiny"
    shutil.copytree(tiny.dir, target)
    return target


@pytest.mark.gpu
@needs_trt_gpu
def test_engines_are_built_once_and_rebuilt_when_stale(gpu_base):
    steps: list[str] = []
    paths = build_engines(gpu_base, TrtOptions("fp32", TINY_PROFILE), on_step=steps.append)
    assert sorted(paths) == sorted(GRAPHS) and all(p.is_file() for p in paths.values())
    assert sum("building" in s for s in steps) == len(GRAPHS)
    steps.clear()
    build_engines(gpu_base, TrtOptions("fp32", TINY_PROFILE), on_step=steps.append)
    assert steps == [f"{g}: cached engine is current" for g in GRAPHS]
    steps.clear()
    bigger = ShapeProfile(TINY_PROFILE.min, TINY_PROFILE.opt, Shape(2, 24, 24))
    build_engines(gpu_base, TrtOptions("fp32", bigger), on_step=steps.append)
    assert f"{TEXT_ENCODER}: cached engine is current" in steps
    assert sum("building" in s and "input_shapes" in s for s in steps) == len(GRAPHS) - 1
    build_engines(gpu_base, TrtOptions("fp32", TINY_PROFILE))  # back, for the tests below


@pytest.mark.gpu
@needs_trt_gpu
def test_refit_matches_onnx_runtime_and_an_engine_built_from_the_merged_export(gpu_base, adapters, tiny, tmp_path):
    from loramgr.backends.onnxruntime import OrtRunner

    trt = import_tensorrt()
    full = AdapterSet(((adapters.a, 0.8), (adapters.b, 0.5), (adapters.controlnet, 1.0)))
    feeds = _feeds()
    with OrtRunner.open(gpu_base, full) as ort_runner:
        reference = ort_runner.predict_noise(**feeds)
        text_reference = ort_runner.encode_text(torch.arange(154).reshape(2, 77) % 500)
    with TrtRunner.open(gpu_base, full, TrtOptions("fp32", TINY_PROFILE)) as runner:
        assert runner.unrefittable == {FUSED: set(), TEXT_ENCODER: set()}, runner.unrefittable
        refitted = runner.predict_noise(**feeds)
        assert refitted.is_cuda
        _close(refitted, reference, FP32_TOL)
        _close(runner.encode_text(torch.arange(154).reshape(2, 77) % 500), text_reference, FP32_TOL)
    # An engine built (without REFIT) from a copy of the base with the merged weights written in.
    merged = tmp_path / FUSED
    shutil.copytree(gpu_base / FUSED, merged)
    data = np.memmap(merged / Path(tiny.manifest.graphs[FUSED].data).name, dtype=np.uint8, mode="r+")
    merged_values = _reference(tiny, full)[FUSED]  # float64 formulas, not loramgr's merge
    for name in full.touched()[FUSED]:
        entry, value = tiny.weights.entry(FUSED, name), merged_values[name].astype(np.float32)
        data[entry.offset: entry.offset + entry.length] = np.ascontiguousarray(value).view(np.uint8).reshape(-1)
    data.flush()
    shapes = input_shapes(tiny.manifest.graphs[FUSED].inputs, TINY_PROFILE)
    plan = engines.build_plan(trt, merged / "model.onnx", shapes, Precision("fp32", False, False), refittable=False)
    (tmp_path / "merged.plan").write_bytes(bytes(memoryview(plan)))
    runtime = trt.Runtime(engines.trt_logger(trt))
    engine = load_engine(runtime, tmp_path / "merged.plan")
    baked = EngineSession(trt, engine, torch.device("cuda")).run(feeds)["noise_pred"]
    _close(refitted, baked, FP32_TOL)


@pytest.mark.gpu
@needs_trt_gpu
def test_switching_adapters_back_and_forth_gives_the_same_outputs(gpu_base, adapters):
    full = AdapterSet(((adapters.a, 0.8), (adapters.b, 0.5), (adapters.controlnet, 1.0)))
    only_b = AdapterSet(((adapters.b, 1.0),))
    feeds = _feeds(seed=1)
    with TrtRunner.open(gpu_base, full, TrtOptions("fp32", TINY_PROFILE)) as runner:
        first = runner.predict_noise(**feeds).clone()
        runner.set_adapters(only_b)
        other = runner.predict_noise(**feeds).clone()
        runner.set_adapters(full)
        again = runner.predict_noise(**feeds)
        assert float((other - first).abs().max()) > 1e-3  # the switch did change the engine
        # Same engine, same weights, same inputs: identical up to kernel non-determinism.
        assert float((again - first).abs().max()) <= 1e-6 * float(first.abs().max())
        runner.set_adapters(AdapterSet())
        plain = runner.predict_noise(**feeds)
    with TrtRunner.open(gpu_base, None, TrtOptions("fp32", TINY_PROFILE)) as fresh:
        assert float((fresh.predict_noise(**feeds) - plain).abs().max()) <= 1e-6 * float(plain.abs().max())
    assert len(runner.timings.swaps) == 4


@pytest.fixture(scope="module")
def fp16_base(tmp_path_factory) -> Path:
    """The tiny base (same seed) exported in fp16: the only fp16 route on TensorRT 11 and TensorRT-RTX."""
    from loramgr.export import export_base
    from loramgr.workspace import Workspace

    ws = Workspace.resolve(tmp_path_factory.mktemp("ws16"))
    export_base(ws, "tiny16", arch="tiny", seed=0, dtype="fp16")
    return ws.base_dir("tiny16")


@pytest.mark.gpu
@needs_trt_gpu
@pytest.mark.parametrize("route", ["FP16 flag on the fp32 base", "strongly typed fp16 base"])
def test_fp16_engines_against_onnx_runtime_fp32(route, gpu_base, adapters, tmp_path, request):
    from loramgr.backends.onnxruntime import OrtRunner

    full = AdapterSet(((adapters.a, 0.8), (adapters.controlnet, 1.0)))
    feeds = _feeds(seed=2)
    with OrtRunner.open(gpu_base, full) as ort_runner:
        reference = ort_runner.predict_noise(**feeds)
        image_reference = ort_runner.vae_decode(feeds["sample"])
    if route.startswith("FP16 flag"):
        if not hasattr(import_tensorrt().BuilderFlag, "FP16"):
            pytest.skip("this TensorRT has no FP16 builder flag (strong typing only)")
        base, adapter_set = gpu_base, full
    else:
        base = request.getfixturevalue("fp16_base")
        manifest = Manifest.load(base)
        adapter_set = AdapterSet(tuple((_write(tmp_path, a.name, a.kind, manifest, list(a.targets.values())), w)
                                       for a, w in full.adapters))  # the same adapters, for the fp16 base
    with TrtRunner.open(base, adapter_set, TrtOptions("fp16", TINY_PROFILE)) as runner:
        _close(runner.predict_noise(**feeds), reference, FP16_TOL)
        _close(runner.vae_decode(feeds["sample"]), image_reference, FP16_TOL)
        with pytest.raises(LoramgrError, match="outside the engine's profile"):
            runner.predict_noise(**_feeds(batch=3))
