"""The one merge (``loramgr.merge``): in place, in the ONNX layout, parallel across tensors.

Equalities here are bit for bit wherever two routes must run the same arithmetic
(parallel vs serial, into dirty buffers vs fresh arrays, from a resident base vs the
data file, fp16 vs fp32 then cast); against the formula, fp32 rounding (rtol 1e-6).
No timings: docs/benchmarks.md has those.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loramgr import merge
from loramgr.adapter_file import AdapterTarget
from loramgr.adapters import AdapterSet, load_adapter_set, union_touched
from loramgr.backends.onnxruntime import OrtOptions, OrtRunner
from loramgr.convert import convert_adapter
from loramgr.formats import WeightDelta, merge_weight
from loramgr.manifest import Manifest
from loramgr.merge import BaseWeights, MergeJob, apply_merge, merge_into, merge_tensors, plan_merge
from loramgr.samples import write_controlnet, write_kohya_lora


@pytest.fixture(scope="module")
def tiny(tiny_workspace, tmp_path_factory):
    """The tiny base with a LoRA (mi_a), a LoCon (mi_b, conv weights too) and a ControlNet (mi_c)."""
    ws = tiny_workspace
    base_dir = ws.base_dir("tiny")
    manifest = Manifest.load(base_dir)
    folder = tmp_path_factory.mktemp("merge-samples")
    shapes = manifest.param_shapes()
    convert_adapter(ws, write_kohya_lora(folder / "a.safetensors", shapes, seed=21), base="tiny", name="mi_a")
    convert_adapter(ws, write_kohya_lora(folder / "b.safetensors", shapes, seed=22, rank=8, alpha=4.0, locon=True),
                    base="tiny", name="mi_b")
    convert_adapter(ws, write_controlnet(folder / "c", manifest.configs["controlnet"], seed=23), base="tiny",
                    name="mi_c")
    sets = {
        "a": load_adapter_set(ws, manifest, ["mi_a:0.8"]),
        "b": load_adapter_set(ws, manifest, ["mi_b:0.5"]),
        "abc": load_adapter_set(ws, manifest, ["mi_a:0.8", "mi_b:-0.6"], "mi_c"),
    }
    return ws, base_dir, manifest, sets


def _equal(a: dict, b: dict) -> None:
    assert {g: set(n) for g, n in a.items()} == {g: set(n) for g, n in b.items()}
    for graph, named in a.items():
        for name, array in named.items():
            np.testing.assert_array_equal(np.asarray(array), np.asarray(b[graph][name]), err_msg=name)


def test_lora_merge_matches_the_formula(tiny):
    """W + sum(w * scale * up @ down), in the torch layout, for Linear (transposed) and conv (identity) weights."""
    _, base_dir, manifest, sets = tiny
    adapter_set = load_adapter_set(tiny[0], manifest, ["mi_a:0.8", "mi_b:-0.6"])
    with BaseWeights(manifest, base_dir) as base:
        merged = merge_tensors(base, adapter_set)
        layouts = set()
        for graph, named in merged.items():
            for name, array in named.items():
                entry = base.entry(graph, name)
                expected = torch.from_numpy(np.array(entry.to_torch_layout(base.read(graph, entry)), np.float64))
                for adapter, weight in adapter_set.adapters:
                    target = adapter.targets.get(name)
                    if target is not None:
                        up = torch.from_numpy(np.array(target.tensors["up"], np.float64))
                        down = torch.from_numpy(np.array(target.tensors["down"], np.float64))
                        expected += weight * target.scale * (up @ down.reshape(down.shape[0], -1)).reshape(
                            entry.torch_shape)
                got = entry.to_torch_layout(array)
                np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
                layouts.add(entry.layout)
    assert {"transpose", "identity"} <= layouts


def test_parallel_equals_serial_bit_for_bit(tiny):
    _, base_dir, manifest, sets = tiny
    with BaseWeights(manifest, base_dir) as base:
        serial = merge_tensors(base, sets["abc"], workers=1)
        _equal(merge_tensors(base, sets["abc"], workers=3), serial)
        _equal(merge_tensors(base, sets["abc"]), serial)
    assert any(t.kind == "full" for a, _ in sets["abc"].adapters for t in a.targets.values())


def test_merge_into_dirty_buffers_equals_fresh_arrays(tiny):
    """Buffers holding another set (and NaN) end up exactly as merge_tensors' fresh arrays; `only` names at base."""
    _, base_dir, manifest, sets = tiny
    names = union_touched(sets.values())
    with BaseWeights(manifest, base_dir) as base:
        buffers = {g: {n: merge.empty_like_entry(base.entry(g, n)) for n in named} for g, named in names.items()}
        merge_into(base, sets["abc"], buffers, only=names)
        for named in buffers.values():
            for tensor in list(named.values())[::3]:
                tensor.fill_(float("nan"))
        merge_into(base, sets["a"], buffers, only=names)
        _equal(buffers, merge_tensors(base, sets["a"], only=names))
        untouched = [(g, n) for g, named in names.items() for n in named if n not in sets["a"].touched().get(g, ())]
        assert untouched
        for graph, name in untouched:
            np.testing.assert_array_equal(buffers[graph][name].numpy(), base.read(graph, base.entry(graph, name)))


def test_resident_base_equals_the_data_file(tiny):
    """The CUDA route (base values kept resident, only factors move) runs the same arithmetic; checked on the CPU."""
    _, base_dir, manifest, sets = tiny
    names = union_touched(sets.values())
    with BaseWeights(manifest, base_dir) as base:
        resident = {g: {n: merge.empty_like_entry(base.entry(g, n)) for n in named} for g, named in names.items()}
        merge_into(base, AdapterSet(), resident, only=names)
        out = {g: {n: torch.full_like(t, 7.0) for n, t in named.items()} for g, named in resident.items()}
        merge_into(base, sets["abc"], out, only=names, base_values=resident)
        _equal(out, merge_tensors(base, sets["abc"], only=names))


def _first_job(base: BaseWeights, adapter_set: AdapterSet, layout: str) -> MergeJob:
    return next(j for j in plan_merge(base, adapter_set) if j.entry.layout == layout and j.parts)


def test_fp16_weight_is_merged_in_fp32_and_cast_once(tiny):
    _, base_dir, manifest, sets = tiny
    with BaseWeights(manifest, base_dir) as base:
        job = _first_job(base, sets["a"], "transpose")
        value = torch.from_numpy(np.array(base.read(job.graph, job.entry))).half()
        fp32 = value.float()
        apply_merge(job, fp32)
        apply_merge(job, value)
    assert value.dtype == torch.float16
    torch.testing.assert_close(value, fp32.half(), rtol=0, atol=0)
    assert not torch.equal(value, torch.from_numpy(np.array(base.read(job.graph, job.entry))).half())


@pytest.mark.parametrize("layout", ["transpose", "identity"])
def test_other_kinds_go_through_merge_weight(tiny, layout):
    """A LoHa target (no addmm form) equals formats.merge_weight on the torch layout, bit for bit."""
    _, base_dir, manifest, sets = tiny
    gen = torch.Generator().manual_seed(3)
    with BaseWeights(manifest, base_dir) as base:
        lora = _first_job(base, sets["b"], layout)
        shape = lora.entry.torch_shape
        cols = int(np.prod(shape[1:]))
        factors = {"w1_a": torch.randn(shape[0], 2, generator=gen), "w1_b": torch.randn(2, cols, generator=gen),
                   "w2_a": torch.randn(shape[0], 2, generator=gen), "w2_b": torch.randn(2, cols, generator=gen)}
        target = AdapterTarget(lora.entry.initializer, lora.graph, "p", "loha", 0.5,
                               {k: v.numpy() for k, v in factors.items()})
        job = MergeJob(lora.graph, lora.entry, ((target, 0.7),))
        value = torch.from_numpy(np.array(base.read(job.graph, job.entry)))
        torch_base = value.T if layout == "transpose" else value.reshape(shape)
        expected = merge_weight(torch_base.clone(), [(WeightDelta("p", "loha", factors, 0.5), 0.7)])
        apply_merge(job, value)
    got = value.T if layout == "transpose" else value.reshape(shape)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _noise(runner: OrtRunner) -> np.ndarray:
    """One step: the ControlNet's residuals, then the UNet with them."""
    gen = torch.Generator().manual_seed(0)
    context = (torch.randn(2, 4, 8, 8, generator=gen), torch.full((2,), 500.0), torch.randn(2, 77, 32, generator=gen))
    residuals = runner.control_residuals(None, *context, torch.rand(2, 3, 64, 64, generator=gen))
    return runner.predict_noise(*context, residuals).numpy()


def _buffers(runner: OrtRunner) -> dict[str, dict[str, torch.Tensor]]:
    return {g: s.buffers for g, s in runner._graphs.items() if s.buffers}


def test_hot_swap_writes_the_buffers_onnx_runtime_reads(tiny, monkeypatch):
    """A -> B -> A in place equals fresh sessions; the buffers never move; a failed merge leaves the old set."""
    _, base_dir, _, sets = tiny
    with OrtRunner.open(base_dir, sets["a"], OrtOptions(), swappable=union_touched(sets.values())) as hot:
        pointers = {n: t.data_ptr() for named in _buffers(hot).values() for n, t in named.items()}
        assert all(hot._graphs[g].values[n].data_ptr() == t.data_ptr() for g, named in _buffers(hot).items()
                   for n, t in named.items())  # shared through DLPack, not copied
        expected = {}
        for key in ("a", "b", "abc"):
            with OrtRunner.open(base_dir, sets[key], OrtOptions(hot_swap=False)) as fresh:
                expected[key] = _noise(fresh)
        for key in ("b", "a", "abc", "a"):
            hot.set_adapters(sets[key])
            np.testing.assert_array_equal(_noise(hot), expected[key])
        assert pointers == {n: t.data_ptr() for named in _buffers(hot).values() for n, t in named.items()}

        calls = []

        def fail_late(job, out):
            calls.append(job)
            if len(calls) == 5:
                raise RuntimeError("merge failed")
            return apply_merge(job, out)

        monkeypatch.setattr(merge, "apply_merge", fail_late)
        with pytest.raises(RuntimeError, match="merge failed"):
            hot.set_adapters(sets["b"])
        monkeypatch.undo()
        assert hot.adapter_set is sets["a"]
        np.testing.assert_array_equal(_noise(hot), expected["a"])
