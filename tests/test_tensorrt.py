"""TensorRT backend: engine cache keys, shape profiles, refit planning, ControlNet slots and weight handling.

Everything that needs no GPU runs here, on the tiny base, with numbers: refit transitions
are replayed through a fake refitter that reads the very buffers loramgr hands over (by
pointer, at refit time, as TensorRT does), and the runner's own swap logic
(:meth:`TrtRunner.set_adapters`: LoRAs refit into the UNet and text encoder engines, each
ControlNet into a slot's engine) runs over fake engines. Expected weights come from the
adapters' own tensors and the documented LoRA rule, computed here, not from loramgr's merge.
The tests that build and run real engines are at the end and skip unless ``tensorrt`` (or
``tensorrt_rtx``) and a CUDA GPU exist.
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
from loramgr.backends.base import plan_slots, slot_key
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
from loramgr.bases import as_open_base
from loramgr.errors import LoramgrError
from loramgr.manifest import CONTROLNET, GRAPHS, TEXT_ENCODER, UNET, Manifest
from loramgr.merge import BaseWeights, merge_tensors
from loramgr.models.graphs import RESIDUALS

TO_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
TO_K = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
CONV_IN, CONV_IN_BIAS = "unet.conv_in.weight", "unet.conv_in.bias"
TEXT_Q = "text_model.encoder.layers.0.self_attn.q_proj.weight"
CN_NORM = "controlnet.down_blocks.0.resnets.0.norm1.weight"
CN_NORM_SCALE = "/controlnet/down_blocks.0/resnets.0/norm1/Constant_1_output_0"  # its InstanceNorm's scale: ones
TINY_PROFILE = ShapeProfile(Shape(1, 8, 8), Shape(2, 8, 8), Shape(2, 16, 16))
RUNTIME = RuntimeInfo("tensorrt 10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")
LORA_GRAPHS = (UNET, TEXT_ENCODER)


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
    """Two LoRAs sharing one weight, and three ControlNets replacing every ControlNet weight.

    ``values[name]``: the tensors each ControlNet was written with, the reference its slots are held to.
    """
    folder, m = tmp_path_factory.mktemp("adapters"), tiny.manifest
    a = _write(folder, "lora_a", "lora", m, [_lora_target(m, UNET, TO_Q, 4, 1, 0.5),
                                             _lora_target(m, UNET, CONV_IN, 2, 2, 1.0)])
    b = _write(folder, "lora_b", "lora", m, [_lora_target(m, UNET, TO_Q, 4, 3, 0.25),
                                             _lora_target(m, UNET, TO_K, 4, 4, 0.5),
                                             _lora_target(m, TEXT_ENCODER, TEXT_Q, 4, 5, 1.0)])
    controlnets, values = {}, {}
    for seed, name in enumerate(("hed", "depth", "pose"), start=6):
        gen = np.random.default_rng(seed)
        values[name] = {e.initializer: (tiny.weights.read(CONTROLNET, e) + 0.05 * gen.standard_normal(e.shape))
                        .astype(e.dtype) for e in m.graphs[CONTROLNET].weights.values()}
        targets = [AdapterTarget(e.initializer, CONTROLNET, p, "full", 1.0, {"weight": values[name][e.initializer]})
                   for p, e in m.graphs[CONTROLNET].weights.items()]
        controlnets[name] = _write(folder, name, "controlnet", m, targets)
    return SimpleNamespace(a=a, b=b, controlnet=controlnets["hed"], controlnets=controlnets, values=values)


# -- a refitter that behaves as TensorRT documents ------------------------------------------


class FakeWeights:
    def __init__(self, dtype, ptr: int, count: int):
        self.dtype, self.ptr, self.count = dtype, ptr, count


_CTYPES = {"FLOAT": (ctypes.c_float, np.float32), "HALF": (ctypes.c_uint16, np.float16)}


class FakeEngine:
    """What TrtRunner reads of an engine: its weights by name, and a record of every refit (the names it set)."""

    refittable = True

    def __init__(self, weights: dict[str, np.ndarray]):
        self.weights = weights
        self.refits: list[set[str]] = []


class FakeRefitter:
    """Engine weights by name; rejects wrong counts/types, reports combined partners as missing,
    and reads the handed-over buffers only when ``refit_cuda_engine`` runs."""

    def __init__(self, engine: dict[str, np.ndarray] | FakeEngine, combined: list[set[str]] = ()):
        self.record = engine if isinstance(engine, FakeEngine) else None
        self.engine = engine.weights if isinstance(engine, FakeEngine) else engine
        self.combined = combined
        self.pending: dict[str, FakeWeights] = {}
        self.weights_validation = True

    def get_all_weights(self):
        return list(self.engine)

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
        if self.record is not None:
            self.record.refits.append(set(self.pending))
        return True


class FakeLogger:
    WARNING = 2

    def __init__(self, level: int):
        self.level = level


FAKE_TRT = SimpleNamespace(
    __name__="fake_tensorrt",
    Weights=FakeWeights,
    DataType=SimpleNamespace(FLOAT=SimpleNamespace(name="FLOAT"), HALF=SimpleNamespace(name="HALF")),
    TensorLocation=SimpleNamespace(DEVICE="device", HOST="host"),
    Logger=FakeLogger,
    Runtime=lambda logger: SimpleNamespace(logger=logger),
    Refitter=lambda engine, logger: FakeRefitter(engine),
)


def _base_values(tiny, graph: str, dtype=None) -> dict[str, np.ndarray]:
    """A graph's weights at their base values (read from its data file), as a freshly built engine holds them."""
    return {e.initializer: np.array(tiny.weights.read(graph, e), dtype=dtype)
            for e in tiny.manifest.graphs[graph].weights.values()}


def _fake_engines(tiny, dtype=None) -> dict[str, dict[str, np.ndarray]]:
    """The LoRA-carrying engines (UNet, text encoder) at their base values."""
    return {g: _base_values(tiny, g, dtype) for g in LORA_GRAPHS}


def _expected(tiny, adapter_set: AdapterSet, dtype=None) -> dict[str, dict[str, np.ndarray]]:
    """The documented LoRA rule, in numpy (fp64): base + sum of weight x scale x up @ down, in the initializer's layout."""
    state = {g: {n: v.astype(np.float64) for n, v in _base_values(tiny, g).items()} for g in LORA_GRAPHS}
    for adapter, weight in adapter_set.adapters:
        for t in adapter.targets.values():
            entry = tiny.manifest.graphs[t.graph].weights[t.param]
            delta = weight * t.scale * (t.tensors["up"].astype(np.float64) @ t.tensors["down"].astype(np.float64))
            state[t.graph][t.initializer] += entry.to_onnx_layout(delta.reshape(entry.torch_shape))
    return {g: {n: v.astype(dtype or np.float32) for n, v in named.items()} for g, named in state.items()}


def _switch(tiny, engine, plan, new: AdapterSet, combined=()) -> int:
    """Apply one refit plan to the fake engines the way TrtRunner.set_adapters does for the LoRAs."""
    count = 0
    for graph, tensors in refit_tensors(tiny.weights, plan, new).items():
        onnx_path = tiny.dir / tiny.manifest.graphs[graph].path
        fill = lambda names, g=graph, p=onnx_path: missing_values(tiny.weights, g, p, names)  # noqa: E731
        count += refit_weights(FAKE_TRT, FakeRefitter(engine[graph], combined), tensors, device=torch.device("cpu"),
                               validate=False, fill_missing=fill)
    return count


def _assert_state(engine, expected, rtol: float = 1e-5) -> None:
    """Every weight as expected: within fp32 rounding of the fp64 reference (``rtol`` of the largest value)."""
    for graph in expected:
        differing = [n for n, v in expected[graph].items() if not np.allclose(
            engine[graph][n].astype(np.float64), v.astype(np.float64), rtol=0, atol=rtol * max(1.0, np.abs(v).max()))]
        assert not differing, f"{graph}: {len(differing)} weights differ, first {differing[:3]}"


# -- refit planning: A -> B -> A is exactly A -------------------------------------------------


def test_refit_plan_is_the_union_of_both_sets(tiny, adapters):
    a_and_b = AdapterSet(((adapters.a, 1.0), (adapters.b, 1.0)))
    plan = refit_plan(AdapterSet(((adapters.a, 1.0),)), AdapterSet(((adapters.b, 1.0),)))
    assert plan == {g: set(n) for g, n in a_and_b.touched().items()}
    init = {p: tiny.manifest.graphs[UNET].weights[p].initializer for p in (TO_Q, CONV_IN, TO_K)}
    assert plan[UNET] == set(init.values())
    assert refit_plan(AdapterSet(), AdapterSet()) == {}


def test_switching_back_and_forth_restores_every_weight(tiny, adapters):
    both = AdapterSet(((adapters.a, 0.8), (adapters.b, 0.5)))
    only_b = AdapterSet(((adapters.b, 1.0),))
    engine, previous = _fake_engines(tiny), AdapterSet()
    for new in (both, only_b, both, AdapterSet(), only_b):
        _switch(tiny, engine, refit_plan(previous, new), new)
        _assert_state(engine, _expected(tiny, new))
        previous = new
    _switch(tiny, engine, refit_plan(previous, AdapterSet()), AdapterSet())
    _assert_state(engine, _fake_engines(tiny), rtol=0)  # back to the base: bit for bit


def test_refitting_only_the_new_sets_weights_leaves_residue(tiny, adapters):
    """The control for the test above: B's names alone keep A's LoRA on conv_in."""
    a = AdapterSet(((adapters.a, 0.8),))
    only_b = AdapterSet(((adapters.b, 1.0),))
    engine = _fake_engines(tiny)
    _switch(tiny, engine, refit_plan(AdapterSet(), a), a)
    _switch(tiny, engine, only_b.touched(), only_b)
    expected = _expected(tiny, only_b)
    leftover = [n for n, v in expected[UNET].items() if not np.allclose(engine[UNET][n], v, rtol=1e-5, atol=1e-6)]
    assert leftover == [tiny.manifest.graphs[UNET].weights[CONV_IN].initializer]


def test_fp16_engine_gets_fp32_merges_cast_once(tiny, adapters):
    new = AdapterSet(((adapters.a, 0.8), (adapters.b, 0.5)))
    engine = _fake_engines(tiny, np.float16)
    _switch(tiny, engine, refit_plan(AdapterSet(), new), new)
    _assert_state(engine, _expected(tiny, new, np.float16), rtol=1e-3)  # fp16: 11 bits
    to_q = tiny.manifest.graphs[UNET].weights[TO_Q].initializer
    fp32 = merge_tensors(tiny.weights, new)[UNET][to_q]
    assert engine[UNET][to_q].dtype == np.float16
    assert np.array_equal(engine[UNET][to_q], fp32.astype(np.float16))  # one rounding, from the fp32 merge


def test_weights_combined_at_build_time_are_supplied_with_their_current_values(tiny, adapters):
    """TensorRT reports the partners of a fused weight missing; they get base / constant values."""
    weights, cn_weights = tiny.manifest.graphs[UNET].weights, tiny.manifest.graphs[CONTROLNET].weights
    conv_in, bias, norm = weights[CONV_IN].initializer, weights[CONV_IN_BIAS].initializer, cn_weights[CN_NORM].initializer
    engine = _fake_engines(tiny)
    new = AdapterSet(((adapters.a, 1.0),))
    plan = refit_plan(AdapterSet(), new)
    count = _switch(tiny, engine, plan, new, [{conv_in, bias}])
    assert count == sum(len(n) for n in plan.values()) + 1
    assert np.array_equal(engine[UNET][bias], tiny.weights.read(UNET, weights[CONV_IN_BIAS]))
    # A ControlNet slot: the norm's folded constant (the InstanceNorm's ones) comes from the graph.
    slot = _base_values(tiny, CONTROLNET)
    slot[CN_NORM_SCALE] = np.zeros(8, np.float32)
    onnx_path = tiny.dir / tiny.manifest.graphs[CONTROLNET].path
    refit_weights(FAKE_TRT, FakeRefitter(slot, [{norm, CN_NORM_SCALE}]), {norm: adapters.values["hed"][norm]},
                  device=torch.device("cpu"), validate=False,
                  fill_missing=lambda names: missing_values(tiny.weights, CONTROLNET, onnx_path, names))
    assert np.array_equal(slot[norm], adapters.values["hed"][norm])
    assert np.array_equal(slot[CN_NORM_SCALE], np.ones(8, np.float32))


def test_a_refit_fails_when_tensorrt_rejects_a_buffer(tiny, adapters):
    new = AdapterSet(((adapters.a, 1.0),))
    engine = _fake_engines(tiny)
    to_q = tiny.manifest.graphs[UNET].weights[TO_Q].initializer
    engine[UNET][to_q] = np.zeros(7, np.float32)  # an engine whose weight has another count
    with pytest.raises(LoramgrError, match=r"TensorRT refused the weights .*to_q.*1024 values"):
        _switch(tiny, engine, refit_plan(AdapterSet(), new), new)


def test_missing_values_reads_base_weights_and_graph_constants(tiny):
    onnx_path = tiny.dir / tiny.manifest.graphs[CONTROLNET].path
    entry = tiny.manifest.graphs[CONTROLNET].weights["controlnet.conv_in.bias"]
    values = missing_values(tiny.weights, CONTROLNET, onnx_path, {entry.initializer, CN_NORM_SCALE})
    assert np.array_equal(values[entry.initializer], tiny.weights.read(CONTROLNET, entry))
    assert np.array_equal(values[CN_NORM_SCALE], np.ones(8, np.float32))
    with pytest.raises(LoramgrError, match=r"cannot supply .*first: no/such/constant"):
        missing_values(tiny.weights, CONTROLNET, onnx_path, {"no/such/constant"})


def test_read_constants_matches_the_onnx_file(tiny):
    onnx_path = tiny.dir / tiny.manifest.graphs[TEXT_ENCODER].path
    model = onnx.load(str(onnx_path), load_external_data=False)
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                 if n.op_type == "Constant"}
    picked = set(list(constants)[:5])
    found = read_constants(onnx_path, picked | {"absent"})
    assert set(found) == picked
    assert all(np.array_equal(found[n], constants[n]) for n in picked)


# -- ControlNet slots -------------------------------------------------------------------------


def test_plan_slots_keeps_controlnets_in_place_and_fills_free_slots_in_order(adapters):
    hed, depth, pose = (adapters.controlnets[n] for n in ("hed", "depth", "pose"))
    assert plan_slots([], [None, hed]) == [(None, None), (None, hed)]  # two new slots, the base's own first
    assert plan_slots([None, hed], [hed, None]) == []  # both held: nothing moves, whatever the order
    assert plan_slots([None, hed], [hed, hed, None]) == []  # units repeating ControlNets
    assert plan_slots([None, hed], [hed, depth]) == [(0, depth)]  # the base's slot is free, hed stays
    assert plan_slots([None, hed], [pose, depth]) == [(0, pose), (1, depth)]  # free slots in slot order
    assert plan_slots([None, hed], [depth, pose, hed]) == [(0, depth), (None, pose)]  # then a new slot
    assert plan_slots([hed], []) == []  # no unit: slots stay filled (their weights are reused later)
    again = load_adapter(hed.path)  # the same file loaded again is the same ControlNet
    assert slot_key(again) == slot_key(hed) and plan_slots([None, hed], [again]) == []


class FakeSession:
    """An engine as TrtRunner holds it; ``run`` is never called here."""

    def __init__(self, engine: FakeEngine):
        self.engine = engine


@pytest.fixture
def fake_runner(tiny, monkeypatch):
    """A TrtRunner over fake engines (host buffers, no CUDA): its own swap logic, the fake refitter's record.

    ``engines`` lists every engine the runner loaded, in order: UNet, ControlNet (slot 0), text
    encoder (TensorRT's REFITTABLE order), then one per new slot.
    """
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    runner = TrtRunner(as_open_base(tiny.dir), TrtOptions("fp32", TINY_PROFILE), FAKE_TRT)
    runner.device = torch.device("cpu")  # host buffers: the fake refitter reads them by pointer
    loaded: list[tuple[str, FakeEngine]] = []

    def load(graph: str) -> FakeSession:
        loaded.append((graph, FakeEngine(_base_values(tiny, graph))))
        return FakeSession(loaded[-1][1])

    monkeypatch.setattr(runner, "_load", load)
    runner._load_refittable()
    runner.set_adapters(AdapterSet())  # as TrtRunner.open does
    runner.loaded = loaded
    return runner


def _slot_refits(runner) -> list[list[set[str]]]:
    return [slot.session.engine.refits for slot in runner._slots]


def _assert_slots(runner, tiny, adapters, held: list[str | None]) -> None:
    """Each slot holds its ControlNet's own tensors (``None``: the base's, read from its data file)."""
    assert runner.controlnet_slots() == held
    for slot, name in zip(runner._slots, held):
        expected = _base_values(tiny, CONTROLNET) if name is None else adapters.values[name]
        engine = slot.session.engine.weights
        assert all(np.array_equal(engine[n], v) for n, v in expected.items()), name


def test_runner_refits_exactly_the_slots_whose_controlnet_changed(fake_runner, tiny, adapters):
    runner, cn = fake_runner, adapters.controlnets
    names = set(_base_values(tiny, CONTROLNET))
    assert [g for g, _ in runner.loaded] == [UNET, CONTROLNET, TEXT_ENCODER]
    assert runner.controlnet_slots() == [None] and _slot_refits(runner) == [[]]  # open: nothing to refit

    runner.set_adapters(AdapterSet(((cn["hed"], 1.0),), base_controlnet=True))  # units: canny, hed
    assert [g for g, _ in runner.loaded][3:] == [CONTROLNET]  # one new slot, one new engine
    assert _slot_refits(runner) == [[], [names]]  # the base's slot untouched; hed refit whole into the new one
    _assert_slots(runner, tiny, adapters, [None, "hed"])

    runner.set_adapters(AdapterSet(((cn["hed"], 1.0), (cn["depth"], 1.0))))  # units: hed, depth
    assert _slot_refits(runner) == [[names], [names]]  # depth into the base's free slot; hed stays
    _assert_slots(runner, tiny, adapters, ["depth", "hed"])

    runner.set_adapters(AdapterSet(((cn["pose"], 1.0), (cn["depth"], 1.0))))  # hed -> pose in its slot
    assert _slot_refits(runner) == [[names], [names, names]]
    _assert_slots(runner, tiny, adapters, ["depth", "pose"])

    runner.set_adapters(AdapterSet(((cn["hed"], 1.0), (cn["depth"], 1.0), (cn["pose"], 1.0))))  # a third slot
    assert _slot_refits(runner) == [[names], [names, names], [names]] and len(runner.loaded) == 5
    _assert_slots(runner, tiny, adapters, ["depth", "pose", "hed"])

    runner.set_adapters(AdapterSet(((cn["hed"], 1.0),), base_controlnet=True))  # back to canny + hed
    assert _slot_refits(runner) == [[names, names], [names, names], [names]]  # depth's weights back to the base's
    _assert_slots(runner, tiny, adapters, [None, "pose", "hed"])
    assert {g: len(e.refits) for g, e in runner.loaded if g != CONTROLNET} == {UNET: 0, TEXT_ENCODER: 0}


def test_runner_refits_nothing_when_units_repeat_or_reorder_controlnets(fake_runner, tiny, adapters):
    runner, cn = fake_runner, adapters.controlnets
    both = AdapterSet(((cn["hed"], 1.0),), base_controlnet=True)
    runner.set_adapters(both)
    before = [list(r) for r in _slot_refits(runner)]
    for again in (both, AdapterSet(((cn["hed"], 1.0),), base_controlnet=True),
                  AdapterSet(((load_adapter(cn["hed"].path), 1.0),), base_controlnet=True)):  # reloaded file
        runner.set_adapters(again)
        assert _slot_refits(runner) == before
    only_hed = AdapterSet(((cn["hed"], 1.0),))  # fewer units: the base's slot is kept as it is
    runner.set_adapters(only_hed)
    assert _slot_refits(runner) == before and runner.controlnet_slots() == [None, "hed"]
    _assert_slots(runner, tiny, adapters, [None, "hed"])


def test_runner_swaps_loras_and_controlnets_in_one_set(fake_runner, tiny, adapters):
    """LoRAs go to the UNet and text encoder engines (the union of old and new sets), ControlNets to slots."""
    runner, cn = fake_runner, adapters.controlnets
    engines_of = {g: e for g, e in runner.loaded if g != CONTROLNET}
    first = AdapterSet(((cn["depth"], 1.0), (adapters.a, 0.8)))
    runner.set_adapters(first)
    _assert_state({g: e.weights for g, e in engines_of.items()}, _expected(tiny, AdapterSet(((adapters.a, 0.8),))))
    _assert_slots(runner, tiny, adapters, ["depth"])
    second = AdapterSet(((cn["depth"], 1.0), (adapters.b, 0.5)))
    runner.set_adapters(second)
    assert engines_of[UNET].refits[-1] == refit_plan(first, second)[UNET]  # A's and B's weights
    assert engines_of[TEXT_ENCODER].refits[-1] == refit_plan(first, second)[TEXT_ENCODER]
    assert _slot_refits(runner) == [[set(_base_values(tiny, CONTROLNET))]]  # depth stayed: refit once, when it came
    _assert_state({g: e.weights for g, e in engines_of.items()}, _expected(tiny, AdapterSet(((adapters.b, 0.5),))))


# -- refittable weights and weight preparation ----------------------------------------------


def test_check_refittable_names_what_tensorrt_folded_away(tiny, adapters):
    plan = refit_plan(AdapterSet(), AdapterSet(((adapters.b, 1.0),)))
    all_weights = {g: {e.initializer for e in tiny.manifest.graphs[g].weights.values()} for g in LORA_GRAPHS}
    check_refittable(plan, all_weights)
    folded = dict(all_weights, **{UNET: all_weights[UNET] - {tiny.manifest.graphs[UNET].weights[TO_K].initializer}})
    with pytest.raises(LoramgrError, match=r"1 weights .* not refittable in the unet engine .*to_k"):
        check_refittable(plan, folded)
    with pytest.raises(LoramgrError, match=r"text_encoder engine is not refittable"):
        check_refittable(plan, {UNET: all_weights[UNET]})


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
    assert str(DEFAULT_PROFILE) == "min 1x32x32, opt 2x64x64, max 4x96x96, up to 231 tokens"
    assert ShapeProfile.parse("1x8x8", "2x8x8", "2x16x16", max_tokens=154).max_tokens == 154
    for tokens in (76, 100, 0):
        with pytest.raises(LoramgrError, match=rf"--max-tokens {tokens}: a multiple of 77"):
            ShapeProfile.parse("1x8x8", "2x8x8", "2x16x16", max_tokens=tokens)


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
    """Batch, latent size (and its halvings, ``latent_height/k``), image size and prompt tokens, per input."""
    graphs = tiny.manifest.graphs
    unet = input_shapes(graphs[UNET].inputs, TINY_PROFILE)
    assert unet["sample"] == [[1, 4, 8, 8], [2, 4, 8, 8], [2, 4, 16, 16]]
    assert unet["timestep"] == [[1], [2], [2]]
    assert unet["encoder_hidden_states"] == [[1, 77, 32], [2, 77, 32], [2, 231, 32]]  # up to 3 chunks of 77
    # The tiny UNet halves the latent after each of its down blocks: residuals at 1, 1/2, 1/4, 1/8 of it.
    assert unet["down_block_res_0"] == [[1, 32, 8, 8], [2, 32, 8, 8], [2, 32, 16, 16]]
    assert unet["down_block_res_3"] == [[1, 32, 4, 4], [2, 32, 4, 4], [2, 32, 8, 8]]
    assert unet["down_block_res_7"] == [[1, 64, 2, 2], [2, 64, 2, 2], [2, 64, 4, 4]]
    assert unet["mid_block_res"] == [[1, 64, 1, 1], [2, 64, 1, 1], [2, 64, 2, 2]]
    controlnet = input_shapes(graphs[CONTROLNET].inputs, TINY_PROFILE)
    assert set(controlnet) == {"sample", "timestep", "encoder_hidden_states", "controlnet_cond"}
    assert controlnet["controlnet_cond"] == [[1, 3, 64, 64], [2, 3, 64, 64], [2, 3, 128, 128]]  # 8x the latent
    assert controlnet["encoder_hidden_states"] == unet["encoder_hidden_states"]
    longer = ShapeProfile(TINY_PROFILE.min, TINY_PROFILE.opt, TINY_PROFILE.max, max_tokens=5 * 77)
    assert input_shapes(graphs[UNET].inputs, longer)["encoder_hidden_states"][2] == [2, 385, 32]
    assert input_shapes(graphs[TEXT_ENCODER].inputs, TINY_PROFILE) == {
        "input_ids": [[1, 77], [2, 77], [2, 77]], "token_vectors": [[1, 77, 32], [2, 77, 32], [2, 77, 32]],
        "token_mask": [[1, 77], [2, 77], [2, 77]]}
    assert input_shapes(graphs["vae_encoder"].inputs, TINY_PROFILE)["image"][2] == [2, 3, 128, 128]


@pytest.mark.parametrize("profile_shape", ["min", "opt", "max"])
def test_residual_profiles_are_what_the_controlnet_outputs(tiny, profile_shape):
    """The UNet engine's residual inputs at each profile shape against the ControlNet graph run at that shape."""
    from loramgr.backends.onnxruntime import OrtRunner

    shape = getattr(TINY_PROFILE, profile_shape)
    index = ("min", "opt", "max").index(profile_shape)
    unet = input_shapes(tiny.manifest.graphs[UNET].inputs, TINY_PROFILE)
    feeds = _feeds(batch=shape.batch, size=shape.height)
    with OrtRunner.open(tiny.dir) as runner:
        residuals = runner.control_residuals(None, **feeds)
    assert {n: list(r.shape) for n, r in zip(RESIDUALS, residuals)} == {n: unet[n][index] for n in RESIDUALS}


def test_an_unknown_axis_asks_for_a_new_export(tiny):
    from loramgr.manifest import IOSpec

    with pytest.raises(LoramgrError, match=r"dynamic axis 'latent_height/q' .* re-export the base"):
        input_shapes([IOSpec("res", "float32", ("batch", 8, "latent_height/q", "latent_width"))], TINY_PROFILE)


def test_inputs_outside_the_profile_are_refused_with_the_fix(tiny):
    shapes = input_shapes(tiny.manifest.graphs[UNET].inputs, TINY_PROFILE)
    check_input_shapes(UNET, shapes, {"sample": (2, 4, 16, 8), "timestep": (1,), "encoder_hidden_states": (2, 231, 32),
                                      "down_block_res_3": (2, 32, 8, 4)})
    expected = r"sample has shape \[4, 4, 8, 8\], outside .*\[1, 4, 8, 8\]\.\.\[2, 4, 16, 16\]: build the engines with"
    with pytest.raises(LoramgrError, match=expected + " --min/--max"):
        check_input_shapes(UNET, shapes, {"sample": (4, 4, 8, 8)})
    with pytest.raises(LoramgrError, match=r"unet input encoder_hidden_states has shape \[2, 308, 32\]"):
        check_input_shapes(UNET, shapes, {"encoder_hidden_states": (2, 4 * 77, 32)})  # a 4th prompt chunk
    with pytest.raises(LoramgrError, match="down_block_res_3"):
        check_input_shapes(UNET, shapes, {"down_block_res_3": (2, 32, 16, 16)})  # the latent's size, not half
    control = input_shapes(tiny.manifest.graphs[CONTROLNET].inputs, TINY_PROFILE)
    with pytest.raises(LoramgrError, match="controlnet input controlnet_cond"):
        check_input_shapes(CONTROLNET, control, {"controlnet_cond": (2, 3, 64)})


# -- precision --------------------------------------------------------------------------------


def test_precision_plan():
    assert plan_precision("fp32", False, True) == Precision("fp32", False, False)
    assert plan_precision("fp32", True, True) == Precision("fp16", True, False)  # TensorRT 10: FP16 flag
    assert plan_precision("fp16", False, False) == Precision("fp16", False, True)  # strongly typed
    assert plan_precision("fp16", True, True) == Precision("fp16", False, True)
    with pytest.raises(LoramgrError, match=r"--fp16 on an fp32 base .* base with `loramgr export --dtype fp16`"):
        plan_precision("fp32", True, False)  # TensorRT 11 / TensorRT-RTX


# -- engine cache -----------------------------------------------------------------------------


def _key(tiny, graph=UNET, **changes) -> EngineKey:
    key = engine_key(tiny.manifest, graph, Precision("fp16", True, False), TINY_PROFILE, RUNTIME)
    return EngineKey(**{**key.__dict__, **changes})


def test_engine_key_records_what_the_engine_depends_on(tiny):
    key = _key(tiny).to_json()
    assert key["base_fingerprint"] == tiny.manifest.fingerprint
    assert (key["gpu"], key["compute_capability"], key["tensorrt"]) == (RUNTIME.gpu, "9.0", RUNTIME.tensorrt)
    assert key["precision"] == {"name": "fp16", "fp16_flag": True, "strongly_typed": False}
    assert engines.REFITTABLE == (UNET, CONTROLNET, TEXT_ENCODER)  # each ControlNet slot: an engine of its own
    assert all(_key(tiny, g).refittable for g in engines.REFITTABLE) and _key(tiny, "vae_decoder").refittable is False
    assert key["input_shapes"]["sample"] == [[1, 4, 8, 8], [2, 4, 8, 8], [2, 4, 16, 16]]
    json.dumps(key)  # the sidecar holds it as it is


def test_cached_engine_is_used_only_for_the_same_key(tiny, tmp_path):
    key = _key(tiny)
    assert engine_status(tmp_path, key).reason == "no engine yet"
    save_engine(tmp_path, key, b"serialized engine")
    assert engine_status(tmp_path, key) == engines.EngineStatus(True, "current")
    assert (tmp_path / "unet.plan").read_bytes() == b"serialized engine"
    changes = {
        "base_fingerprint": "0" * 64, "tensorrt": "tensorrt 10.14.1.48", "gpu": "NVIDIA L4",
        "compute_capability": "8.9", "precision": {"name": "fp32", "fp16_flag": False, "strongly_typed": False},
        "input_shapes": input_shapes(tiny.manifest.graphs[UNET].inputs, DEFAULT_PROFILE),
        "refittable": False, "engine_format": engines.ENGINE_FORMAT + 1,
    }
    for field, value in changes.items():
        status = engine_status(tmp_path, _key(tiny, **{field: value}))
        assert not status.current and status.reason.startswith(f"built for {field}: "), status


def test_text_encoder_engine_survives_a_latent_size_change(tiny, tmp_path):
    """Its inputs depend on the batch only, so only the UNet and ControlNet engines are rebuilt."""
    bigger = ShapeProfile(TINY_PROFILE.min, TINY_PROFILE.opt, Shape(2, 32, 32))
    fp32 = Precision("fp32", False, False)
    graphs = (UNET, CONTROLNET, TEXT_ENCODER)
    for graph in graphs:
        save_engine(tmp_path, engine_key(tiny.manifest, graph, fp32, TINY_PROFILE, RUNTIME), b"plan")
    new = {g: engine_key(tiny.manifest, g, fp32, bigger, RUNTIME) for g in graphs}
    assert engine_status(tmp_path, new[TEXT_ENCODER]).current
    for graph in (UNET, CONTROLNET):
        assert engine_status(tmp_path, new[graph]).reason.startswith("built for input_shapes")


def test_damaged_or_foreign_cache_files_are_rebuilt(tiny, tmp_path):
    key = _key(tiny)
    save_engine(tmp_path, key, b"serialized engine")
    (tmp_path / "unet.plan").write_bytes(b"truncated")
    assert "9 bytes, its key file says 17" in engine_status(tmp_path, key).reason
    (tmp_path / "unet.json").write_text("{not json")
    assert engine_status(tmp_path, key).reason == "damaged key file unet.json"
    save_engine(tmp_path, _key(tiny, TEXT_ENCODER), b"serialized engine")
    shutil.copy(tmp_path / "text_encoder.json", tmp_path / "unet.json")  # another graph's key
    (tmp_path / "unet.plan").write_bytes(b"serialized engine")
    assert engine_status(tmp_path, key).reason.startswith("built for graph: 'text_encoder' -> 'unet'")


def test_a_failed_write_never_leaves_an_old_key_vouching_for_the_plan(tiny, tmp_path):
    key = _key(tiny)
    save_engine(tmp_path, key, b"old engine")
    with pytest.raises(TypeError):
        save_engine(tmp_path, key, object())  # not a buffer: fails while the plan is written
    assert (tmp_path / "unet.plan").read_bytes() == b"old engine"
    assert engine_status(tmp_path, key).reason == "engine without its key file"
    assert not list(tmp_path.glob(".*.tmp"))


def test_run_after_build_engine_asks_the_cache_for_the_same_keys(tiny, tmp_path):
    """`build-engine --fp16 --min/--opt/--max`, then `run --backend tensorrt` with no TensorRT options:
    the run resolves its options from the cache's record and wants exactly the keys just built."""
    folder = tmp_path / "engines"
    two_chunks = ShapeProfile(TINY_PROFILE.min, TINY_PROFILE.opt, TINY_PROFILE.max, max_tokens=2 * 77)
    built = TrtOptions("fp16", two_chunks)  # fp16, a custom profile, 2 prompt chunks
    for key in engine_keys(tiny.manifest, built, RUNTIME, has_fp16_flag=True).values():
        save_engine(folder, key, b"serialized engine")
    record_options(folder, built)  # build_engines' last step
    run = resolve_options(folder, TrtOptions())  # what TrtRunner.open does with the CLI's unset options
    assert run == built and run.profile.max_tokens == 154
    assert engine_keys(tiny.manifest, run, RUNTIME, True)[UNET].input_shapes["encoder_hidden_states"][2] == [2, 154, 32]
    for key in engine_keys(tiny.manifest, run, RUNTIME, has_fp16_flag=True).values():
        assert engine_status(folder, key).current, key.graph
    # Options given explicitly still win, field by field: the other field comes from the record.
    assert resolve_options(folder, TrtOptions(precision="fp32")) == TrtOptions("fp32", two_chunks)
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
    """A ControlNet call's inputs (the UNet takes the first three and the residuals)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, size, size, generator=gen), "timestep": torch.full((batch,), 501.0),
        "encoder_hidden_states": torch.randn(batch, 77, 32, generator=gen),
        "controlnet_cond": torch.rand(batch, 3, 8 * size, 8 * size, generator=gen),
    }


def _step(runner, feeds: dict[str, torch.Tensor], controlnets=(None,), strength: float = 0.8) -> torch.Tensor:
    """One unit per ControlNet, residuals scaled and summed, then the UNet: the pipeline's arithmetic."""
    context = [feeds[k] for k in ("sample", "timestep", "encoder_hidden_states")]
    summed = None
    for controlnet in controlnets:
        out = [strength * r for r in runner.control_residuals(controlnet, *context, feeds["controlnet_cond"])]
        summed = out if summed is None else [a + b for a, b in zip(summed, out)]
    return runner.predict_noise(*context, summed)


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


def _baked_engine(trt, tiny, gpu_base: Path, tmp_path: Path, graph: str, values: dict[str, np.ndarray]):
    """An engine built (without REFIT) from a copy of ``graph`` with ``values`` written into its data file."""
    folder = tmp_path / graph
    shutil.copytree(gpu_base / graph, folder)
    data = np.memmap(folder / Path(tiny.manifest.graphs[graph].data).name, dtype=np.uint8, mode="r+")
    for name, value in values.items():
        entry = tiny.weights.entry(graph, name)
        data[entry.offset: entry.offset + entry.length] = np.ascontiguousarray(value, entry.dtype).view(np.uint8).reshape(-1)
    data.flush()
    shapes = input_shapes(tiny.manifest.graphs[graph].inputs, TINY_PROFILE)
    plan = engines.build_plan(trt, folder / "model.onnx", shapes, Precision("fp32", False, False), refittable=False)
    (tmp_path / f"{graph}.plan").write_bytes(bytes(memoryview(plan)))
    engine = load_engine(trt.Runtime(engines.trt_logger(trt)), tmp_path / f"{graph}.plan")
    return EngineSession(trt, engine, torch.device("cuda"))


@pytest.mark.gpu
@needs_trt_gpu
def test_refit_matches_onnx_runtime_and_engines_built_from_merged_graphs(gpu_base, adapters, tiny, tmp_path):
    from loramgr.backends.onnxruntime import OrtRunner

    trt = import_tensorrt()
    loras = AdapterSet(((adapters.a, 0.8), (adapters.b, 0.5)))
    full = AdapterSet(((adapters.controlnet, 1.0), *loras.adapters))
    feeds = _feeds()
    ids = torch.arange(154).reshape(2, 77) % 500
    with OrtRunner.open(gpu_base, full) as ort_runner:
        reference = _step(ort_runner, feeds)
        text_reference = ort_runner.encode_text(ids)
    with TrtRunner.open(gpu_base, full, TrtOptions("fp32", TINY_PROFILE)) as runner:
        assert runner.unrefittable == {UNET: set(), CONTROLNET: set(), TEXT_ENCODER: set()}, runner.unrefittable
        refitted = _step(runner, feeds)
        assert refitted.is_cuda
        _close(refitted, reference, FP32_TOL)
        _close(runner.encode_text(ids), text_reference, FP32_TOL)
    # Engines built from copies of the graphs with the expected weights written in: the LoRA rule
    # computed here for the UNet, the ControlNet file's own tensors for the ControlNet.
    unet = _baked_engine(trt, tiny, gpu_base, tmp_path, UNET, _expected(tiny, loras)[UNET])
    controlnet = _baked_engine(trt, tiny, gpu_base, tmp_path, CONTROLNET, adapters.values["hed"])
    residuals = controlnet.run(feeds)
    baked = unet.run({**{k: feeds[k] for k in ("sample", "timestep", "encoder_hidden_states")},
                      **{n: 0.8 * residuals[n] for n in RESIDUALS}})["noise_pred"]
    _close(refitted, baked, FP32_TOL)


@pytest.mark.gpu
@needs_trt_gpu
def test_switching_adapters_back_and_forth_gives_the_same_outputs(gpu_base, adapters):
    full = AdapterSet(((adapters.a, 0.8), (adapters.b, 0.5), (adapters.controlnet, 1.0)))
    only_b = AdapterSet(((adapters.b, 1.0),))
    feeds = _feeds(seed=1)
    with TrtRunner.open(gpu_base, full, TrtOptions("fp32", TINY_PROFILE)) as runner:
        first = _step(runner, feeds).clone()
        runner.set_adapters(only_b)
        other = _step(runner, feeds).clone()
        runner.set_adapters(full)
        again = _step(runner, feeds)
        assert float((other - first).abs().max()) > 1e-3  # the switch did change the engines
        # Same engines, same weights, same inputs: identical up to kernel non-determinism.
        assert float((again - first).abs().max()) <= 1e-6 * float(first.abs().max())
        runner.set_adapters(AdapterSet())
        plain = _step(runner, feeds)
    with TrtRunner.open(gpu_base, None, TrtOptions("fp32", TINY_PROFILE)) as fresh:
        assert float((_step(fresh, feeds) - plain).abs().max()) <= 1e-6 * float(plain.abs().max())
    assert len(runner.timings.swaps) == 4


@pytest.mark.gpu
@needs_trt_gpu
def test_units_of_several_controlnets_match_onnx_runtime_after_slot_swaps(gpu_base, adapters):
    """Two units (the base's ControlNet and hed), then hed and depth: each slot refit, summed as ORT sums them."""
    from loramgr.backends.onnxruntime import OrtRunner

    cn = adapters.controlnets
    sets = [(AdapterSet(((cn["hed"], 1.0),), base_controlnet=True), (None, "hed")),
            (AdapterSet(((cn["hed"], 1.0), (cn["depth"], 1.0))), ("depth", "hed"))]
    feeds = _feeds(seed=3)
    with TrtRunner.open(gpu_base, None, TrtOptions("fp32", TINY_PROFILE)) as runner:
        for adapter_set, units in sets:
            runner.set_adapters(adapter_set)
            with OrtRunner.open(gpu_base, adapter_set) as ort_runner:
                _close(_step(runner, feeds, units), _step(ort_runner, feeds, units), FP32_TOL)
        assert runner.controlnet_slots() == ["depth", "hed"]


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
        reference = _step(ort_runner, feeds)
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
        _close(_step(runner, feeds), reference, FP16_TOL)
        _close(runner.vae_decode(feeds["sample"]), image_reference, FP16_TOL)
        wide = _feeds(batch=3)
        with pytest.raises(LoramgrError, match="outside the engine's profile"):
            runner.predict_noise(wide["sample"], wide["timestep"], wide["encoder_hidden_states"])
