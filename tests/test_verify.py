"""loramgr verify: every converter format against the independent reference, failures it must catch,
several ControlNets as units and textual-inversion embeddings against diffusers' own pipeline, and the
real test files against SD1.5 shapes.

Tolerances are the ones ``verify`` states (loramgr.verify.TOLERANCES, docs/verify.md): fp32
weights within 1e-6 of the weight's largest value, graph outputs within 1e-4, images
>= 40 dB PSNR. The assertions below also pin the measured margins, so a regression that
stays under the tolerance but grows the error shows here first.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from cli_support import cli, one_error_line
from format_writers import (
    a1111_embedding, bundle_embeddings, cloneofsimo_file, cloneofsimo_walk, kohya_name, lora_factors, lycoris_file,
    peft_layers, save,
)
from loramgr.adapter_file import CHECKSUM_KEY, AdapterFile, content_sha256, load_adapter, save_adapter
from loramgr.adapters import AdapterSet, load_adapter_set
from loramgr.convert import convert_adapter
from loramgr.errors import LoramgrError
from loramgr.manifest import CONTROLNET, TEXT_ENCODER, UNET, GraphInfo, Manifest, WeightEntry
from loramgr.merge import BaseWeights, merge_tensors
from loramgr.samples import write_controlnet, write_kohya_lora
from loramgr.verify import TOLERANCES, VerifySettings, render_report, verify
from loramgr.verify import formulas
from loramgr.verify.compare import tensor_diff
from loramgr.verify.names import Namespace
from loramgr.verify.sources import read_source
from loramgr.workspace import Workspace

# diffusers' schedulers call np.array(tensor, copy=False) under numpy 2: their warning, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

FP32 = TOLERANCES["fp32"]
TENSORS_ONLY = VerifySettings(checks=("tensors",))
FAST = VerifySettings(checks=("tensors", "outputs"))


@pytest.fixture(scope="module")
def ws(tiny_workspace, tmp_path_factory) -> Workspace:
    """A workspace of its own (adapters, cache) over the shared tiny base."""
    home = tmp_path_factory.mktemp("verify-ws")
    (home / "base_models").mkdir()
    (home / "base_models" / "tiny").symlink_to(tiny_workspace.base_dir("tiny"))
    return Workspace.resolve(home)


@pytest.fixture(scope="module")
def manifest(ws) -> Manifest:
    return Manifest.load(ws.base_dir("tiny"))


@pytest.fixture(scope="module")
def tiny(ws) -> dict:
    """The tiny base's source torch components (what the reference merges into)."""
    from loramgr.models.loading import load_components

    return load_components(ws.base_dir("tiny") / "source")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("verify-sources")


@pytest.fixture(scope="module")
def demo(ws, manifest, files) -> list[str]:
    """The seed's stack: kohya LoRA ``blindbox``, LoCon ``moxin`` and the ControlNet ``hed``."""
    shapes = manifest.param_shapes()
    write_kohya_lora(files / "blindbox.safetensors", shapes, seed=1, alpha=3.0)
    write_kohya_lora(files / "moxin.safetensors", shapes, seed=2, rank=8, alpha=5.0, locon=True)
    write_controlnet(files / "hed", manifest.configs["controlnet"], seed=3)
    for name in ("blindbox", "moxin"):
        convert_adapter(ws, files / f"{name}.safetensors")
    convert_adapter(ws, files / "hed", name="hed")
    return ["blindbox:0.8", "moxin:0.7"]


@pytest.fixture(scope="module")
def stack_reference(ws, demo):
    """The seed's stack verified once (tensors only): its merged reference is in the cache from here on."""
    return verify(ws, demo, control="hed", settings=TENSORS_ONLY)


def by_name(report) -> dict:
    return {a.name: a for a in report.adapters}


def checks(report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


# ---------------------------------------------------------------- the full check on the seed's stack

def test_stacked_lora_locon_controlnet_passes_every_check(ws, manifest, demo):
    report = verify(ws, demo, control="hed")
    assert report.passed, report.failures()
    assert checks(report) == dict.fromkeys(("reference", "coverage", "tensors", "untouched", "outputs", "images"), "passed")
    adapters = by_name(report)
    assert [a.name for a in report.adapters] == ["hed", "blindbox", "moxin"]  # the ControlNet first, as loramgr merges
    assert {n: a.route for n, a in adapters.items()} == {
        "hed": "diffusers ControlNetModel", "blindbox": "diffusers", "moxin": "diffusers"}
    for a in report.adapters:  # the reference applied everything in the file, and exactly what loramgr changes
        assert a.file_modules == a.applied == a.changed == a.targets > 0 and a.problem == ""
    assert adapters["moxin"].targets > adapters["blindbox"].targets  # LoCon adds the ResNet convs
    assert len(report.tensors) == len({t.param for a, _ in load_adapter_set(ws, manifest, demo, "hed").adapters
                                       for t in a.targets.values()})
    assert 0 < max(d.rel for d in report.tensors) <= 2.5e-7  # a rounding apart: two computations, one result
    assert min(d.change for d in report.tensors) > 100 * FP32.tensor_rtol  # every change is far above the tolerance
    total = sum(len(g.weights) for g in manifest.graphs.values())
    assert report.untouched == [] and report.untouched_total == total - len(report.tensors)
    assert {o.name for o in report.outputs} == {"controlnet residuals", "noise_pred", "noise_pred, no unit",
                                                "text embeddings"}
    assert max(o.rel for o in report.outputs) <= 1e-5
    assert report.image.psnr_db >= 60 and report.image.max_pixel_diff <= 1
    assert sum(report.coverage["moxin"].values()) == adapters["moxin"].targets
    assert report.coverage["blindbox"]["text_model.encoder.layers.0"] == 6


def test_second_run_reuses_the_cached_reference(ws, demo):
    first = verify(ws, demo, control="hed", settings=TENSORS_ONLY)
    again = verify(ws, demo, control="hed", settings=TENSORS_ONLY)
    assert again.cached and again.merged_export == first.merged_export
    assert [a.changed for a in again.adapters] == [a.changed for a in first.adapters]  # counts kept with the cache
    # a weight no other test verifies blindbox.safetensors at (test_dropped_target_fails_... uses 0.5 on the same
    # source, whose reference the cache then holds): not cached in any test order
    other_weight = verify(ws, ["blindbox:0.45"], settings=TENSORS_ONLY)
    assert not other_weight.cached and other_weight.merged_export != first.merged_export and other_weight.passed


def test_report_renders_and_serializes(ws, demo):
    from rich.console import Console

    report = verify(ws, demo, control="hed", settings=TENSORS_ONLY)
    console = Console(record=True, width=200)
    render_report(report, console, top=3)
    text = console.export_text()
    assert "PASSED" in text and "blindbox" in text and "largest errors" in text and "weights changed per block" in text
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["passed"] is True and data["tolerances"]["tensor_rtol"] == FP32.tensor_rtol
    assert {c["name"] for c in data["checks"]} == {"reference", "coverage", "tensors", "untouched"}


# ---------------------------------------------------------------- the check fails where it must

def _corrupt(src: Path, dst: Path, how: str) -> str:
    """Copy a ``.lora``, breaking one square Linear target: returns that target's torch parameter."""
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    targets = json.loads(props["loramgr.targets"])
    initializer = next(i for i, t in targets.items() if t["param"].endswith("attn1.to_q.weight"))
    tensors = {t.name: t for t in model.graph.initializer}
    up, down = (tensors[f"{initializer}::{part}"] for part in ("up", "down"))
    if how == "perturbed":  # one factor element off by 10% of the factor's range
        array = numpy_helper.to_array(up).copy()
        array[0, 0] += 0.1 * np.abs(array).max()
        up.CopyFrom(numpy_helper.from_array(array, up.name))
    elif how == "transposed":  # the delta's transpose: up' = down^T, down' = up^T (same shapes, square weight)
        up_array, down_array = numpy_helper.to_array(up), numpy_helper.to_array(down)
        up.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(down_array.T), up.name))
        down.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(up_array.T), down.name))
    elif how == "scale":  # alpha / rank off by 10%
        targets[initializer]["scale"] *= 1.1
    else:  # "dropped": the target left out, as if a key had not been matched
        param = targets.pop(initializer)["param"]
        kept = [t for t in model.graph.initializer if not t.name.startswith(f"{initializer}::")]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        props["loramgr.targets"] = json.dumps(targets)
        _save_as_converted(model, props, dst)
        return param
    props["loramgr.targets"] = json.dumps(targets)
    _save_as_converted(model, props, dst)
    return targets[initializer]["param"]


def _save_as_converted(model: onnx.ModelProto, props: dict[str, str], dst: Path) -> None:
    """Save with a matching content checksum, as a converter with that bug would have written it."""
    onnx.helper.set_model_props(model, props)
    onnx.helper.set_model_props(model, {**props, CHECKSUM_KEY: content_sha256(model)})
    onnx.save(model, str(dst))


@pytest.mark.parametrize("how", ["perturbed", "transposed", "scale"])
def test_corrupted_lora_fails_naming_the_tensor(how, ws, demo, stack_reference):
    assert stack_reference.passed
    broken = _corrupt(ws.adapter_path("blindbox"), ws.adapter_path(f"blindbox-{how}"), how)
    report = verify(ws, [f"blindbox-{how}:0.8", "moxin:0.7"], control="hed", settings=TENSORS_ONLY)
    assert report.cached  # same sources and weights: the stack's reference, made by the fixture
    assert not report.passed
    assert checks(report) == {"reference": "passed", "coverage": "passed", "tensors": "failed", "untouched": "passed"}
    (failed,) = [d for d in report.tensors if not d.passed]
    assert failed.param == broken
    assert failed.rel > 1000 * FP32.tensor_rtol
    assert broken in report.failures()[0]
    record = by_name(report)[f"blindbox-{how}"]  # cached counts, this run's names and targets
    assert record.targets == record.applied and record.source.endswith("blindbox.safetensors")


def test_dropped_target_fails_coverage_and_untouched(ws, demo):
    """A weight the .lora forgot: loramgr leaves it alone, the reference changes it."""
    dropped = _corrupt(ws.adapter_path("blindbox"), ws.adapter_path("blindbox-dropped"), "dropped")
    report = verify(ws, ["blindbox-dropped:0.5"], settings=TENSORS_ONLY)  # alone: moxin changes every blindbox weight too
    assert not report.passed
    assert checks(report) == {"reference": "passed", "coverage": "failed", "tensors": "passed", "untouched": "failed"}
    assert report.untouched == [dropped]
    record = by_name(report)["blindbox-dropped"]
    assert record.targets == record.applied - 1
    assert f"blindbox-dropped: loramgr changes {record.targets} weights, the reference applied {record.applied}" in report.failures()[0]
    assert dropped in report.failures()[1]


def test_reference_that_loads_nothing_fails_loudly(ws, manifest, files):
    """diffusers registers 0 modules for the old processor format without ``unet.`` (REFERENCE.md)."""
    path = _old_processor_file(files / "bare.safetensors", manifest.param_shapes(), prefix="", seed=11)
    convert_adapter(ws, path, name="bare")
    report = verify(ws, ["bare:1.0"], settings=VerifySettings(checks=("tensors",), reference="diffusers"))
    assert not report.passed and report.merged_export is None
    assert checks(report) == {"reference": "failed", "coverage": "passed", "tensors": "skipped"}
    assert "diffusers applied 0 of the 8 modules in bare.safetensors" in report.failures()[0]
    auto = verify(ws, ["bare:1.0"], settings=TENSORS_ONLY)  # auto: the formulas read that spelling
    assert auto.passed and by_name(auto)["bare"].route == "formulas"


def test_source_changed_or_missing_is_refused(ws, demo, files, tmp_path):
    changed = tmp_path / "blindbox.safetensors"
    write_kohya_lora(changed, Manifest.load(ws.base_dir("tiny")).param_shapes(), seed=99)
    with pytest.raises(LoramgrError, match=r"blindbox: .* has sha256 \w+, but blindbox.lora was converted from a source with sha256"):
        verify(ws, ["blindbox"], sources={"blindbox": changed})
    with pytest.raises(LoramgrError, match=r"blindbox: source .*nope.safetensors does not exist: pass --source blindbox=PATH"):
        verify(ws, ["blindbox"], sources={"blindbox": tmp_path / "nope.safetensors"})


# ---------------------------------------------------------------- several ControlNets: slots and units

@pytest.fixture(scope="module")
def depth(ws, manifest, files) -> str:
    """A second ControlNet, ``depth`` (other random weights than ``hed``)."""
    write_controlnet(files / "depth", manifest.configs["controlnet"], seed=4)
    convert_adapter(ws, files / "depth", name="depth")
    return "depth"


def test_multi_unit_set_passes_every_check(ws, manifest, demo, depth):
    """Three ControlNets (two converted, the base's own): the export holds ``hed``, ``depth`` is compared in
    its slot against diffusers' module, and the units run against diffusers' MultiControlNetModel."""
    report = verify(ws, demo, control=["hed", depth, "canny"])
    assert report.passed, report.failures()
    assert checks(report) == dict.fromkeys(
        ("reference", "coverage", "tensors", "untouched", "outputs", "images", "units"), "passed")
    assert [a.name for a in report.adapters] == ["hed", "depth", "blindbox", "moxin"]
    adapters = by_name(report)
    assert adapters["depth"].route == "diffusers ControlNetModel"
    controlnet_weights = len(manifest.graphs["controlnet"].weights)
    assert adapters["depth"].file_modules == adapters["depth"].applied == adapters["depth"].changed == \
        adapters["depth"].targets == controlnet_weights
    in_slot = [d for d in report.tensors if d.slot]
    assert {d.slot for d in in_slot} == {"depth"} and len(in_slot) == controlnet_weights
    assert max(d.rel for d in in_slot) == 0.0 and min(d.change for d in in_slot) > 0  # stored as converted, bit for bit
    exported = [d for d in report.tensors if not d.slot]
    total = sum(len(g.weights) for g in manifest.graphs.values())
    assert report.untouched == [] and report.untouched_total == total - len(exported)
    assert report.units.psnr_db >= 60 and report.units.max_pixel_diff <= 1
    assert "64px, 4 steps" in {c.name: c.summary for c in report.checks}["units"]


def test_wrong_controlnet_in_a_slot_fails_tensors_and_units(ws, demo, depth):
    """A ControlNet .lora holding another ControlNet's weights (as a converter mixing up files would write
    it): its slot's weights and the units' image fail; the export's ControlNet still passes."""
    good, other = onnx.load(str(ws.adapter_path(depth))), onnx.load(str(ws.adapter_path("hed")))
    props = {p.key: p.value for p in good.metadata_props}  # depth's source, sha256 and targets
    del good.graph.initializer[:]
    good.graph.initializer.extend(other.graph.initializer)
    _save_as_converted(good, props, ws.adapter_path("depth-wrong"))
    report = verify(ws, demo, control=["hed", "depth-wrong"], settings=VerifySettings(checks=("tensors", "units")))
    assert not report.passed
    assert checks(report) == {"reference": "passed", "coverage": "passed", "tensors": "failed", "untouched": "passed",
                              "units": "failed"}
    failed = [d for d in report.tensors if not d.passed]
    assert failed and {d.slot for d in failed} == {"depth-wrong"}
    assert "depth-wrong/controlnet." in report.failures()[0]
    assert report.units.psnr_db < 20


# ---------------------------------------------------------------- textual-inversion embeddings

WIDTH = 32  # the tiny text encoder's


def _vectors(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def embeddings(ws, manifest, tiny, files) -> dict[str, list[str]]:
    """``easyneg`` (an A1111 file, 3 vectors); ``bundled``, a kohya LoRA bundling ``pivot-a`` (A1111 spelling,
    2 vectors), ``pivot-k`` (kohya spelling) and ``q`` (a token of the tiny tokenizer: diffusers refuses it);
    ``pivotal``, a cloneofsimo text-encoder LoRA with the token ``<s1>``. Adapter -> its triggers."""
    from safetensors.torch import load_file

    convert_adapter(ws, a1111_embedding(files / "easyneg.pt", _vectors(3, seed=30)))
    lora = load_file(write_kohya_lora(files / "to-bundle.safetensors", manifest.param_shapes(), seed=31))
    convert_adapter(ws, save(files / "bundled.safetensors", bundle_embeddings(
        lora, a1111={"pivot-a": _vectors(2, seed=32)}, kohya={"pivot-k": _vectors(1, seed=33), "q": _vectors(1, 34)})))
    modules = cloneofsimo_walk(tiny["text_encoder"], {"CLIPAttention"})
    gen = torch.Generator().manual_seed(35)
    factors = [lora_factors(gen, manifest.param_shapes()[f"text_model.{m}.weight"], 4) for m in modules]
    convert_adapter(ws, cloneofsimo_file(files / "pivotal.safetensors", "text_encoder", ["CLIPAttention"], factors,
                                         {"<s1>": _vectors(1, seed=36)[0]}))
    return {"easyneg": ["easyneg"], "bundled": ["pivot-a", "pivot-k", "q"], "pivotal": ["<s1>"]}


def test_embedding_alone_passes_against_diffusers(ws, embeddings):
    report = verify(ws, ["easyneg"])
    assert report.passed, report.failures()
    assert checks(report) == dict.fromkeys(("reference", "coverage", "vectors", "conditioning", "units"), "passed")
    assert report.merged_export is None and report.tensors == []  # nothing to export: the base's own weights
    (record,) = report.adapters
    assert (record.kind, record.route, record.applied, record.targets) == (
        "embedding", "diffusers load_textual_inversion", 3, 3)
    assert [(v.name, v.rel) for v in report.vectors] == [("easyneg", 0.0)]  # the rows diffusers put in, bit for bit
    (conditioning,) = report.conditioning
    assert "easyneg" in conditioning.name and conditioning.rel <= 1e-5
    assert report.units.psnr_db >= 60


def test_embeddings_with_loras_and_bundled_ones(ws, embeddings):
    """An embedding with LoRAs that bundle embeddings: each bundled one diffusers loads is checked with its
    LoRA; ``q``, which diffusers refuses, is reported as not checked."""
    from rich.console import Console

    from loramgr.verify.report import render_summary

    report = verify(ws, ["bundled:0.6", "pivotal:0.9", "easyneg"], settings=VerifySettings(
        checks=("tensors", "outputs", "units")))
    assert report.passed, report.failures()
    assert checks(report) == dict.fromkeys(
        ("reference", "coverage", "tensors", "untouched", "vectors", "outputs", "conditioning", "units"), "passed")
    adapters = by_name(report)
    assert adapters["bundled"].route == "diffusers" and adapters["bundled"].ignored_keys == []  # embeddings apart
    assert adapters["pivotal"].route == "formulas"  # cloneofsimo: diffusers does not read it
    for trigger in ("pivot-a", "pivot-k", "<s1>"):
        assert adapters[trigger].kind == "bundled embedding" and adapters[trigger].applied == adapters[trigger].targets
    assert adapters["pivot-a"].spelling == "bundle_emb" and adapters["<s1>"].spelling == "cloneofsimo token"
    assert sorted(v.name for v in report.vectors) == ["<s1>", "easyneg", "pivot-a", "pivot-k"]
    assert max(v.rel for v in report.vectors) == 0.0
    assert all(t in report.conditioning[0].name for t in ("easyneg", "pivot-a", "pivot-k", "<s1>"))
    (unchecked,) = report.not_checked()
    assert unchecked.startswith("q (bundled in bundled): diffusers could not load it (ValueError: Token q already")
    assert "not checked: q" in next(c.summary for c in report.checks if c.name == "reference")
    console = Console(record=True, width=200)
    render_summary(report, console)
    assert "! not checked: q (bundled in bundled)" in console.export_text()


@pytest.mark.parametrize("how", ["scaled", "dropped"])
def test_wrong_embedding_fails_vectors_and_conditioning(ws, embeddings, how):
    """An embedding .lora whose vectors are not its source's: one vector 10% off, or the last one dropped."""
    adapter = load_adapter(ws.adapter_path("easyneg"))
    source = adapter.embeddings["easyneg"]
    vectors = source.copy()
    if how == "scaled":
        vectors[0] *= 1.1
    else:
        vectors = vectors[:-1]
    name = f"easyneg-{how}"
    kept = {k: v for k, v in adapter.metadata.items() if k.startswith(("loramgr.source", "loramgr.embedding."))}
    save_adapter(ws.adapter_path(name), "embedding", kept, [], {name: vectors})
    report = verify(ws, [name], settings=FAST)
    assert not report.passed
    assert checks(report) == {"reference": "passed", "coverage": "passed" if how == "scaled" else "failed",
                              "vectors": "failed", "conditioning": "failed"}
    (vector,) = report.vectors
    scaled = 0.1 * np.abs(source[0]).max() / np.abs(source).max()  # rel: against the whole embedding's largest value
    assert vector.rel == (pytest.approx(scaled, rel=1e-5) if how == "scaled" else math.inf)
    assert report.conditioning[0].rel > 100 * FP32.output_rtol
    if how == "dropped":
        assert f"{name}: loramgr's .lora holds 2 vectors, the reference loaded 3" in report.failures()[0]


def test_cli_verifies_several_controlnets_and_embeddings(ws, demo, depth, embeddings, capsys):
    assert cli(ws, "verify", *demo, "--control", "hed", "--control", depth, "--checks", "tensors") == 0
    out = capsys.readouterr().out
    assert "verify blindbox:0.8 + moxin:0.7 + hed + depth: PASSED, 4/4 checks" in out
    assert re.search(r"worst: weight \S+ <= 1e-06\n", out), out
    assert cli(ws, "verify", "easyneg", "--checks", "tensors", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] and [c["name"] for c in data["checks"]] == ["reference", "coverage", "vectors"]
    assert cli(ws, "verify", "easyneg:0.5") == 2
    one_error_line(capsys, "easyneg:0.5: easyneg is a textual-inversion embedding, which takes no weight")


# ---------------------------------------------------------------- every format the converter reads

ATTENTION = [f"down_blocks.1.attentions.0.transformer_blocks.0.attn{i}.{p}" for i in (1, 2)
             for p in ("to_q", "to_k", "to_v", "to_out.0")]


def _old_processor_file(path: Path, shapes, prefix: str, seed: int) -> Path:
    gen, tensors = torch.Generator().manual_seed(seed), {}
    for module in ATTENTION:
        up, down = lora_factors(gen, shapes[f"unet.{module}.weight"], 4)
        old = module.replace(".to_out.0", ".to_out").replace(".to_", ".processor.to_")
        tensors[f"{prefix}{old}_lora.up.weight"], tensors[f"{prefix}{old}_lora.down.weight"] = up, down
    return save(path, tensors)


def _diffusers_peft_file(folder: Path, tiny: dict, use_dora: bool, seed: int) -> tuple[Path, int]:
    """A LoRA as diffusers' ``save_lora_weights`` writes it (PEFT keys, the full LoraConfig as metadata),
    and how many modules PEFT injected."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    unet, text = copy.deepcopy(tiny["unet"]), copy.deepcopy(tiny["text_encoder"])
    unet_config = LoraConfig(r=4, lora_alpha=6, target_modules=["to_k", "to_out.0", "conv2"], use_dora=use_dora,
                             init_lora_weights=False)
    text_config = LoraConfig(r=2, lora_alpha=3, alpha_pattern={"fc1": 8}, target_modules=["q_proj", "fc1"],
                             init_lora_weights=False)
    inject_adapter_in_model(unet_config, unet)
    inject_adapter_in_model(text_config, text)
    if use_dora:  # trained magnitudes, not the initial weight norms
        for module in unet.modules():
            if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
                magnitude = module.lora_magnitude_vector["default"].weight
                magnitude.data *= 1 + 0.3 * torch.rand(magnitude.shape)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), text_encoder_lora_layers=get_peft_model_state_dict(text),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    injected = sum(1 for model in (unet, text) for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    return folder / "pytorch_lora_weights.safetensors", injected


@pytest.fixture(scope="module")
def peft_files(ws, tiny, files) -> dict[str, int]:
    """``peft`` and ``peft-dora`` converted: adapter name -> modules PEFT injected."""
    injected = {}
    for name, dora in (("peft", False), ("peft-dora", True)):
        path, injected[name] = _diffusers_peft_file(files / name, tiny, use_dora=dora, seed=13 + dora)
        convert_adapter(ws, path, name=name)
    return injected


def test_diffusers_read_formats_pass(ws, manifest, files, peft_files):
    """PEFT (with text encoder, alpha_pattern), PEFT DoRA, old processor and diffusers ``.lora.`` names: merged by diffusers."""
    shapes = manifest.param_shapes()
    gen, dotted = torch.Generator().manual_seed(12), {}
    for module in ATTENTION:
        up, down = lora_factors(gen, shapes[f"unet.{module}.weight"], 4)
        dotted[f"unet.{module}.lora.up.weight"], dotted[f"unet.{module}.lora.down.weight"] = up, down
    convert_adapter(ws, _old_processor_file(files / "old.safetensors", shapes, prefix="unet.", seed=15), name="old-processor")
    convert_adapter(ws, save(files / "dotted.safetensors", dotted), name="diffusers")
    report = verify(ws, ["peft:0.6", "peft-dora:1.0", "old-processor:0.9", "diffusers:1.3"], settings=FAST)
    assert report.passed, report.failures()
    adapters = by_name(report)
    assert {n: (a.route, a.spelling) for n, a in adapters.items()} == {
        "peft": ("diffusers", "peft"), "peft-dora": ("diffusers", "peft"),
        "old-processor": ("diffusers", "old-processor"), "diffusers": ("diffusers", "diffusers")}
    assert adapters["peft"].targets == peft_files["peft"] and adapters["peft-dora"].targets == peft_files["peft-dora"]
    assert adapters["old-processor"].targets == adapters["diffusers"].targets == len(ATTENTION)
    for a in report.adapters:
        assert a.file_modules == a.applied == a.changed == a.targets
    assert max(d.rel for d in report.tensors) <= 5e-7
    assert max(o.rel for o in report.outputs) <= 1e-5


def test_peft_dora_below_full_weight_matches_peft(ws, peft_files):
    report = verify(ws, ["peft-dora:0.6"], settings=TENSORS_ONLY)
    assert report.passed, report.failures()


LDM_NAMES = {  # kohya LDM-style module -> diffusers module, written out from SD1.5's block layout
    "input_blocks_1_1_proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_4_0_emb_layers_1": "down_blocks.1.resnets.0.time_emb_proj",
    "middle_block_1_transformer_blocks_0_attn2_to_v": "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks_9_0_skip_connection": "up_blocks.3.resnets.0.conv_shortcut",
    "time_embed_2": "time_embedding.linear_2",
    "out_2": "conv_out",
}
LYCORIS = {  # name: (PEFT config class, config, LyCORIS part prefix, alpha)
    "loha-linear": ("LoHaConfig", {"r": 4, "target_modules": ["attn1.to_q", "ff.net.0.proj"]}, "hada_", 2.0),
    "loha-tucker": ("LoHaConfig", {"r": 3, "target_modules": ["resnets.0.conv1", "upsamplers.0.conv"],
                                    "use_effective_conv2d": True}, "hada_", 5.0),
    "lokr-linear": ("LoKrConfig", {"r": 2, "target_modules": ["attn2.to_q", "attn2.to_out.0"]}, "lokr_", 3.0),
    "lokr-both": ("LoKrConfig", {"r": 2, "target_modules": ["ff.net.2"], "decompose_both": True}, "lokr_", 1.5),
    "lokr-tucker": ("LoKrConfig", {"r": 2, "target_modules": ["resnets.1.conv2"], "use_effective_conv2d": True},
                    "lokr_", 3.0),
    "lokr-conv": ("LoKrConfig", {"r": 2, "target_modules": ["downsamplers.0.conv"]}, "lokr_", 2.0),
}


def _lycoris_layers(tiny: dict, case: str) -> tuple[dict, str, float]:
    import peft

    config_class, config, prefix, alpha = LYCORIS[case]
    config = getattr(peft, config_class)(alpha=alpha, init_weights=False, **config)
    return peft_layers(copy.deepcopy(tiny["unet"]), config), prefix, alpha


def _formula_files(files: Path, tiny: dict, shapes) -> dict[str, Path]:
    """One file per format the reference merges by formulas (diffusers does not read them right)."""
    gen = torch.Generator().manual_seed(20)
    written = {}
    for case in LYCORIS:
        layers, prefix, alpha = _lycoris_layers(tiny, case)
        written[case] = lycoris_file(files / f"{case}.safetensors", layers, prefix, alpha)
    dora = {}
    for module, keep in (("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", 0), ("down_blocks.1.resnets.1.conv1", 1)):
        shape, name = shapes[f"unet.{module}.weight"], kohya_name("unet", module)
        up, down = lora_factors(gen, shape, 4, std=0.3)
        magnitude = 1 + torch.rand([s if i == keep else 1 for i, s in enumerate(shape)], generator=gen)
        dora |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(2.0),
                 f"{name}.dora_scale": magnitude}
    written["dora"] = save(files / "dora.safetensors", dora)
    ldm = {}
    for ldm_name, module in LDM_NAMES.items():
        up, down = lora_factors(gen, shapes[f"unet.{module}.weight"], 2)
        ldm |= {f"lora_unet_{ldm_name}.lora_up.weight": up, f"lora_unet_{ldm_name}.lora_down.weight": down}
    written["ldm"] = save(files / "ldm.safetensors", ldm)
    written["bare-processor"] = _old_processor_file(files / "bare2.safetensors", shapes, prefix="", seed=21)
    unet_modules = cloneofsimo_walk(tiny["unet"], {"CrossAttention", "Attention", "GEGLU"})
    factors = [lora_factors(gen, shapes[f"unet.{m}.weight"], 4) for m in unet_modules]
    written["cloneofsimo"] = cloneofsimo_file(files / "cloneofsimo.safetensors", "unet",
                                              ["CrossAttention", "Attention", "GEGLU"], factors)
    conv = "down_blocks.0.resnets.0.conv2"
    name, out_channels, in_channels = kohya_name("unet", conv), *shapes[f"unet.{conv}.weight"][:2]
    written["tucker-locon"] = save(files / "tucker.safetensors", {
        f"{name}.lora_up.weight": 0.1 * torch.randn(out_channels, 4, 1, 1, generator=gen),
        f"{name}.lora_down.weight": 0.1 * torch.randn(4, in_channels, 1, 1, generator=gen),
        f"{name}.lora_mid.weight": 0.3 * torch.randn(4, 4, 3, 3, generator=gen), f"{name}.alpha": torch.tensor(2.0)})
    mixed = {}
    for module, alpha in (("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_k", 7.0),
                          ("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k", 2.0),
                          ("up_blocks.2.resnets.0.conv1", 2.0)):
        name = kohya_name("unet", module)
        up, down = lora_factors(gen, shapes[f"unet.{module}.weight"], 4)
        mixed |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(alpha)}
    written["mixed-alphas"] = save(files / "mixed.safetensors", mixed)
    return written


FORMULA_WEIGHTS = {"dora": 0.7, "cloneofsimo": 0.9, "mixed-alphas": 1.0}


def test_formula_read_formats_pass(ws, manifest, tiny, files):
    """LoHa, LoKr (plain, both decomposed, Tucker, flattened conv), LyCORIS DoRA (output and input axis),
    LDM block names, the old processor format without prefix, cloneofsimo, Tucker LoCon and per-module alphas."""
    written = _formula_files(files, tiny, manifest.param_shapes())
    for name, path in written.items():
        convert_adapter(ws, path, name=name)
    specs = [f"{name}:{FORMULA_WEIGHTS.get(name, 0.8)}" for name in written]
    report = verify(ws, specs, settings=FAST)
    assert report.passed, report.failures()
    adapters = by_name(report)
    assert {a.route for a in report.adapters} == {"formulas"}
    assert {n: a.spelling for n, a in adapters.items() if a.spelling != "kohya"} == {
        "ldm": "kohya-ldm", "bare-processor": "old-processor-bare", "cloneofsimo": "cloneofsimo"}
    assert "per-module alphas differ" in adapters["mixed-alphas"].note
    assert "dora_scale" in adapters["dora"].note and "kohya-ldm spelling" in adapters["ldm"].note
    for a in report.adapters:
        assert a.file_modules == a.applied == a.changed == a.targets and a.ignored_keys == []
    assert adapters["ldm"].targets == len(LDM_NAMES)
    assert max(d.rel for d in report.tensors) <= 5e-7
    assert max(o.rel for o in report.outputs) <= 1e-5


@pytest.mark.parametrize("case", sorted(LYCORIS))
def test_formulas_match_peft_layers(case, tiny, tmp_path):
    """The reference's LoHa / LoKr products against PEFT's own layers (``get_delta_weight``)."""
    layers, prefix, alpha = _lycoris_layers(tiny, case)
    namespace = Namespace.of(tiny["unet"], tiny["text_encoder"])
    source = read_source(lycoris_file(tmp_path / "lycoris.safetensors", layers, prefix, alpha), namespace)
    assert set(source.modules) == {f"unet.{m}" for m in layers}
    for module, layer in layers.items():
        found = source.modules[f"unet.{module}"]
        assert found.scale == pytest.approx(layer.scaling["default"])
        torch.testing.assert_close(formulas.delta(found, namespace.shapes[f"unet.{module}"]),
                                   layer.get_delta_weight("default"), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- the real files, at SD1.5 shapes

REAL_FILES = {  # file: (multiplier, modules whose change is zero in the file itself)
    "sd15_old_processor_catundchat.safetensors": (0.8, 0),
    "sd15_unet_prefix_lora_down_timohavdk.safetensors": (1.0, 0),
    "sd15_kohya_lycoris_lokr_r4.safetensors": (0.6, 3),  # down_blocks.0.resnets.0 conv1/conv2/time_emb_proj: lokr_w2_a == 0
    "sd15_cloneofsimo_analog_svd_r4.safetensors": (0.9, 0),
}


@pytest.fixture(scope="module")
def sd15(tmp_path_factory, sd15_param_shapes) -> tuple[Workspace, Manifest, Namespace]:
    """A base with sd15's real weight map (every name and shape, exporter layouts) and all-zero weights.

    Its data files are sparse (no disk, no export): loramgr converts and merges against it
    exactly as against a real base, and a zero base makes the merged tensor the adapter's
    change alone, so the comparison measures the change itself, not the change hidden in a weight.
    """
    from loramgr.models.architectures import architecture, build_components

    ws = Workspace.resolve(tmp_path_factory.mktemp("sd15"))
    folder = ws.base_dir("sd15")
    graphs = {}
    for graph, prefixes in ((UNET, ("unet.",)), (CONTROLNET, ("controlnet.",)), (TEXT_ENCODER, ("text_model.",))):
        weights, offset = {}, 0
        for param, shape in sd15_param_shapes.items():
            if param.startswith(prefixes):
                layout = "transpose" if len(shape) == 2 and "embedding" not in param else "identity"
                onnx_shape = shape[::-1] if layout == "transpose" else shape
                weights[param] = WeightEntry(param, layout, shape, onnx_shape, "float32", offset, 4 * math.prod(shape))
                offset += 4 * math.prod(shape)
        (folder / graph).mkdir(parents=True)
        with open(folder / graph / "model.onnx_data", "wb") as data:
            data.truncate(offset)  # a hole: reads as zeros
        graphs[graph] = GraphInfo(f"{graph}/model.onnx", f"{graph}/model.onnx_data", [], [], weights)
    arch = architecture("sd15")
    manifest = Manifest("sd15", "fp32", 17, {"kind": "sparse test base"}, graphs, {"controlnet": arch.controlnet}, 0.18215)
    manifest.fingerprint = manifest.compute_fingerprint()
    manifest.save(folder)
    meta = build_components(arch, device="meta")
    return ws, manifest, Namespace.of(meta["unet"], meta["text_encoder"])


REAL_CASES = [  # (file, compare every n-th target): the LoKr file's 350 Kronecker products take ~40 s in full
    *[(name, 1) for name in sorted(REAL_FILES) if "lokr" not in name],
    ("sd15_kohya_lycoris_lokr_r4.safetensors", 5),
    pytest.param("sd15_kohya_lycoris_lokr_r4.safetensors", 1, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "stride"), REAL_CASES)
def test_real_file_matches_reference_at_sd15_shapes(name, stride, sd15, testdata):
    """Weights loramgr changes, merged by loramgr (.lora, merge_tensors) vs the formulas on the source file."""
    ws, manifest, namespace = sd15
    weight, zero_changes = REAL_FILES[name]
    convert_adapter(ws, testdata / name, name="real")
    adapter = load_adapter(ws.adapter_path("real"))
    source = read_source(testdata / name, namespace)
    assert {t.param for t in adapter.targets.values()} == {m.param for m in source.modules.values()}
    assert source.ignored == []
    base = BaseWeights(manifest, ws.base_dir("sd15"))
    targets = list(adapter.targets.items())[::stride]
    diffs = []
    for start in range(0, len(targets), 16):  # SD1.5 convs are 59 MB each in fp32: merge a few at a time
        part = AdapterFile(adapter.path, adapter.kind, adapter.metadata, dict(targets[start:start + 16]))
        for graph, named in merge_tensors(base, AdapterSet(((part, weight),))).items():
            for initializer, array in named.items():
                entry, param = base.entry(graph, initializer), adapter.targets[initializer].param
                zero = torch.zeros(entry.torch_shape)
                reference = formulas.merged(zero, source.modules[param.removesuffix(".weight")], weight)
                diffs.append(tensor_diff(graph, param, initializer, entry.to_torch_layout(array), reference.numpy(),
                                         zero.numpy(), FP32.tensor_rtol))
    assert len(diffs) == len(targets) and all(d.passed for d in diffs), [d for d in diffs if not d.passed][:3]
    if stride == 1:
        assert sum(d.change == 0 for d in diffs) == zero_changes
    assert max(d.rel for d in diffs) <= 5e-7


# Files diffusers reads (the old processor spelling once its keys carry ``unet.``, REFERENCE.md): their changes
# at SD1.5 shapes against PEFT's own layers as diffusers' load_lora_into_unet builds them. Only the modules the
# file targets are given memory (~370 MB); the rest of the SD1.5 UNet stays on the meta device.
DIFFUSERS_READABLE = {"sd15_old_processor_catundchat.safetensors": ("unet.", 0.8),
                      "sd15_unet_prefix_lora_down_timohavdk.safetensors": ("", 1.0)}


def _diffusers_deltas(path: Path, prefix: str, weight: float) -> dict[str, torch.Tensor]:
    """Module -> ``weight`` x PEFT's ``get_delta_weight`` of the layer diffusers injected into an SD1.5 UNet."""
    import warnings

    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    from loramgr.models.architectures import architecture, build_components

    tensors = {prefix + k: v for k, v in load_file(str(path)).items()}

    def load(materialized=()) -> dict:
        unet = build_components(architecture("sd15"), device="meta")["unet"]
        for name in materialized:
            unet.get_submodule(name).to_empty(device="cpu")
        state, alphas = StableDiffusionPipeline.lora_state_dict(dict(tensors))
        with warnings.catch_warnings():  # loading into meta modules (the first, discovering pass) warns
            warnings.simplefilter("ignore")
            StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, adapter_name="real")
        return {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer) and "real" in m.lora_A}

    layers = load(load())  # first pass: which modules diffusers targets; second: those with memory
    with torch.no_grad():
        return {name: weight * layer.get_delta_weight("real") for name, layer in layers.items()}


@pytest.mark.parametrize("name", sorted(DIFFUSERS_READABLE))
def test_real_file_matches_diffusers_at_sd15_shapes(name, sd15, testdata):
    """loramgr's merged change (.lora, merge_tensors on the all-zero SD1.5 base) vs diffusers/PEFT, per module."""
    ws, manifest, _ = sd15
    prefix, weight = DIFFUSERS_READABLE[name]
    expected = _diffusers_deltas(testdata / name, prefix, weight)
    convert_adapter(ws, testdata / name, name="real-diffusers")
    adapter = load_adapter(ws.adapter_path("real-diffusers"))
    assert {t.param.removeprefix("unet.").removesuffix(".weight") for t in adapter.targets.values()} == set(expected)
    assert len(expected) == 128  # every module of the file: diffusers did load it
    base = BaseWeights(manifest, ws.base_dir("sd15"))
    merged = merge_tensors(base, AdapterSet(((adapter, weight),)))
    for initializer, target in adapter.targets.items():
        entry = base.entry(target.graph, initializer)
        ours = entry.to_torch_layout(merged[target.graph][initializer]).astype(np.float64)
        reference = expected[target.param.removeprefix("unet.").removesuffix(".weight")].double().numpy()
        assert np.abs(reference).max() > 0, target.param
        assert np.abs(ours - reference).max() <= FP32.tensor_rtol * np.abs(reference).max(), target.param
