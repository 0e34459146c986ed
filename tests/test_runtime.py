"""ONNX Runtime runtime: parity with diffusers, adapters, hot swap, bake, CLI bad input.

Tolerances: images within 2 uint8 levels of diffusers' (reference_pipelines.assert_close_images:
same fp32 math, different kernels and summation order). Hot swap vs a fresh session: bit-identical noise_pred (the
same tensors reach the same kernels; only how they got there differs).
"""

from __future__ import annotations

import dataclasses

import json
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch

from loramgr.adapters import load_adapter_set, union_touched
from loramgr.backends.onnxruntime import OrtOptions, OrtRunner
from loramgr.bake import bake
from loramgr.convert import convert_adapter
from loramgr.export import export_base
from loramgr.manifest import CONTROLNET, TEXT_ENCODER, UNET, Manifest
from loramgr.models.graphs import RESIDUALS
from loramgr.pipeline.settings import GenerationSettings
from loramgr.runtime import make_pipeline
from loramgr.samples import sample_image
from loramgr.workspace import Workspace

from cli_support import cli
from reference_pipelines import (
    assert_close_images, base_negative_prompt, diffusers_images, documented, reference_pipeline,
)
from serve_support import sample_adapters


FAST = {"resolution": 64, "steps": 4, "n_prompt": "lowres, worst quality"}


@pytest.fixture(scope="module")
def adapters(tiny_workspace, tmp_path_factory):
    """Sample kohya LoRA (rt_a), kohya LoCon (rt_b) and a ControlNet (rt_hed), converted for the tiny base."""
    return sample_adapters(tiny_workspace, tmp_path_factory.mktemp("samples"), "rt")


def _runner(ws: Workspace, loras=(), control=None, **options) -> OrtRunner:
    base_dir = ws.base_dir("tiny")
    adapter_set = load_adapter_set(ws, Manifest.load(base_dir), list(loras), control)
    return OrtRunner.open(base_dir, adapter_set, OrtOptions(**options))


@pytest.mark.parametrize("overrides", [
    pytest.param({}, id="normal"),
    pytest.param({"guess_mode": True, "control_schedule": "diffusers", "strength": 0.7}, id="guess-mode"),
    pytest.param({"img2img_strength": 0.6}, id="img2img"),
])
def test_python_api_matches_diffusers(tiny_workspace, reference, overrides):
    """``Generator.generate`` (the Python API) against diffusers' pipeline; fields not given act as documented."""
    from loramgr.runtime import Generator

    image = sample_image(96)
    with Generator.open(tiny_workspace, "tiny") as generator:
        ours = generator.generate(None, GenerationSettings(prompt="a house", seed=3, **FAST, **overrides), image).images
    assert_close_images(ours, diffusers_images(reference, image, documented(prompt="a house", seed=3, **FAST,
                                                                             **overrides)))


def test_cli_run_with_two_loras_and_a_controlnet_matches_diffusers(tiny_workspace, tiny_folder, adapters, tmp_path,
                                                                   capsys):
    """``loramgr run`` vs diffusers load_lora_weights + set_adapters + its ControlNetModel, defaults as documented."""
    from PIL import Image

    reference = reference_pipeline(tiny_folder, [(adapters["rt_a"], 0.8), (adapters["rt_b"], 0.5)], adapters["rt_hed"])
    image = sample_image(96)
    Image.fromarray(image).save(tmp_path / "in.png")

    def run(*adapter_args: str) -> np.ndarray:
        out = tmp_path / f"out{len(adapter_args)}"
        assert cli(tiny_workspace, "run", "--image", str(tmp_path / "in.png"), "--prompt", "a house", "--seed", "5",
                   "--steps", "4", "--resolution", "64", "--out", str(out), "--name", "x", *adapter_args) == 0
        return np.asarray(Image.open(out / "x-0.png"))

    ours = run("--lora", "rt_a:0.8", "--lora", "rt_b:0.5", "--control", "rt_hed")
    capsys.readouterr()
    settings = documented(prompt="a house", seed=5, steps=4, resolution=64,
                          n_prompt=base_negative_prompt(reference.tokenizer))  # the base's default (tiny: cut)
    assert_close_images([ours], diffusers_images(reference, image, settings))
    assert np.abs(ours.astype(int) - run().astype(int)).mean() > 5  # the adapters matter


def _feeds(n: int = 1, size: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(2 * n, 4, size, size, generator=gen), "timestep": torch.full((2 * n,), 500.0),
        "encoder_hidden_states": torch.randn(2 * n, 77, 32, generator=gen),
        "controlnet_cond": torch.rand(2 * n, 3, 8 * size, 8 * size, generator=gen),
    }


def _step(runner, feeds, controlnet=None) -> torch.Tensor:
    """One denoising step's graph calls: the ControlNet's residuals, then the UNet with them."""
    context = {k: v for k, v in feeds.items() if k != "controlnet_cond"}
    return runner.predict_noise(**context, residuals=runner.control_residuals(controlnet, **feeds))


def _outputs(runner: OrtRunner, feeds) -> tuple[np.ndarray, np.ndarray]:
    ids = torch.arange(77).remainder(500).reshape(1, 77)
    return _step(runner, feeds).numpy(), runner.encode_text(ids).numpy()


SEQUENCE = [
    (["rt_a:0.8"], None), (["rt_b:0.5"], None), (["rt_a:0.8", "rt_b:0.5"], None), ([], None),
    (["rt_a:0.3"], None), (["rt_a:0.8"], "rt_hed"), ([], None),
]


def test_hot_swap_equals_fresh_sessions(tiny_workspace, adapters):
    ws = tiny_workspace
    manifest = Manifest.load(ws.base_dir("tiny"))
    sets = [load_adapter_set(ws, manifest, loras, control) for loras, control in SEQUENCE]
    hot = OrtRunner.open(ws.base_dir("tiny"), sets[0], OrtOptions(), swappable=union_touched(sets))
    sessions_before = {g: s.session for g, s in hot._graphs.items()}
    feeds = _feeds()
    seen = []
    for (loras, control), adapter_set in zip(SEQUENCE, sets):
        hot.set_adapters(adapter_set)
        fresh = _runner(ws, loras, control, hot_swap=False)
        for got, expected in zip(_outputs(hot, feeds), _outputs(fresh, feeds)):
            np.testing.assert_array_equal(got, expected)
        seen.append(_outputs(hot, feeds)[0])
    assert hot._graphs[UNET].session is sessions_before[UNET]  # never re-created
    assert len(hot._slots) == 1  # the ControlNet swaps happened in its one slot
    assert len(hot.timings.swaps) == len(SEQUENCE)
    assert np.abs(seen[0] - seen[3]).max() > 1e-2 and np.abs(seen[0] - seen[4]).max() > 1e-3


def test_swap_outside_the_swappable_set_recreates_sessions(tiny_workspace, adapters):
    runner = _runner(tiny_workspace, ["rt_a:0.8"])
    first = runner._graphs[UNET].session
    manifest = runner.manifest
    runner.set_adapters(load_adapter_set(tiny_workspace, manifest, ["rt_b:0.5"], None))  # rt_b adds conv weights
    assert runner._graphs[UNET].session is not first
    fresh = _runner(tiny_workspace, ["rt_b:0.5"], hot_swap=False)
    np.testing.assert_array_equal(_outputs(runner, _feeds())[0], _outputs(fresh, _feeds())[0])


def test_released_graphs_open_again_with_the_current_set(tiny_workspace, adapters):
    """release() frees a graph's session and buffers; its next call opens it with the set applied by then."""
    ws, base_dir = tiny_workspace, tiny_workspace.base_dir("tiny")
    manifest = Manifest.load(base_dir)
    a, b = (load_adapter_set(ws, manifest, [spec], None) for spec in ("rt_a:0.8", "rt_b:0.5"))
    swappable = union_touched([a, b])
    feeds = _feeds()
    with OrtRunner.open(base_dir, a, OrtOptions(), swappable=swappable) as runner, \
            OrtRunner.open(base_dir, b, OrtOptions(), swappable=swappable) as fresh_b:
        with_a = _outputs(runner, feeds)
        for graph in (TEXT_ENCODER, UNET, CONTROLNET):
            runner.release(graph)
        assert not set(runner._graphs) & {TEXT_ENCODER, UNET} and all(s.graph is None for s in runner._slots)
        assert runner.swappable() == swappable  # still declared: back on the next call
        for got, expected in zip(_outputs(runner, feeds), with_a):
            np.testing.assert_array_equal(got, expected)
        runner.release(UNET)
        runner.set_adapters(b)  # the text encoder's buffers are rewritten, the released UNet opens with b
        assert UNET not in runner._graphs
        for got, expected in zip(_outputs(runner, feeds), _outputs(fresh_b, feeds)):
            np.testing.assert_array_equal(got, expected)
        sessions = {g: s.session for g, s in runner._graphs.items()}
        runner.set_adapters(a)  # everything open again: in place
        assert runner._graphs[UNET].session is sessions[UNET]
        for got, expected in zip(_outputs(runner, feeds), with_a):
            np.testing.assert_array_equal(got, expected)


def test_unit_sets_swap_controlnets_in_slots_bit_exact_with_fresh_sessions(tiny_workspace, adapters):
    """Sets of several ControlNets: each ControlNet's residuals and each unit set's step equal a fresh runner's,
    a ControlNet used again stays in its slot, and slots are reused before new ones are opened."""
    from loramgr.adapters import AdapterSet

    ws, base_dir = tiny_workspace, tiny_workspace.base_dir("tiny")
    manifest = Manifest.load(base_dir)
    sequence = [["canny"], ["canny", "rt_hed"], ["rt_hed"], ["rt_hed", "canny"], [], ["rt_hed"], ["canny"]]
    sets = [load_adapter_set(ws, manifest, ["rt_a:0.8"], controls) for controls in sequence]
    feeds = _feeds()
    with OrtRunner.open(base_dir, sets[0], OrtOptions(), swappable=union_touched(sets)) as hot:
        slots = []
        for controls, adapter_set in zip(sequence, sets):
            hot.set_adapters(adapter_set)
            slots.append(hot.controlnet_slots())
            with OrtRunner.open(base_dir, adapter_set, OrtOptions(hot_swap=False)) as fresh:
                for name in controls:
                    for got, expected in zip(hot.control_residuals(name, **feeds), fresh.control_residuals(name, **feeds)):
                        np.testing.assert_array_equal(got.numpy(), expected.numpy())
                context = {k: v for k, v in feeds.items() if k != "controlnet_cond"}
                np.testing.assert_array_equal(hot.predict_noise(**context).numpy(),
                                              fresh.predict_noise(**context).numpy())
        assert slots == [[None], [None, "rt_hed"], [None, "rt_hed"], [None, "rt_hed"], [None, "rt_hed"],
                         [None, "rt_hed"], [None, "rt_hed"]]
        assert len(hot._slots) == 2  # never a third: each ControlNet stayed in its slot
        hot.set_adapters(AdapterSet(((sets[2].controlnet("rt_hed"), 1.0),)))  # rt_hed alone, not the base's
        base_residuals = hot.control_residuals("rt_hed", **feeds)
        assert not np.array_equal(base_residuals[0].numpy(), fresh_residuals(ws, feeds)[0])


def test_a_controlnet_moves_into_a_freed_slot_in_place_bit_exact(tiny_workspace, adapters):
    """One unit alternating between the base's ControlNet and a converted one: the one slot is rewritten in place
    each time (no second slot, no new session), and every step equals a fresh runner's."""
    ws, base_dir = tiny_workspace, tiny_workspace.base_dir("tiny")
    manifest = Manifest.load(base_dir)
    sequence = [["canny"], ["rt_hed"], ["canny"], ["rt_hed"]]
    sets = [load_adapter_set(ws, manifest, [], controls) for controls in sequence]
    feeds = _feeds()
    with OrtRunner.open(base_dir, sets[0], OrtOptions(), swappable=union_touched(sets)) as hot:
        session = hot._slots[0].graph.session
        for controls, adapter_set in zip(sequence, sets):
            hot.set_adapters(adapter_set)
            assert hot.controlnet_slots() == [None if controls == ["canny"] else "rt_hed"]
            assert hot._slots[0].graph.session is session  # in place: the same session
            with OrtRunner.open(base_dir, adapter_set, OrtOptions(hot_swap=False)) as fresh:
                name = controls[0]
                for got, expected in zip(hot.control_residuals(name, **feeds), fresh.control_residuals(name, **feeds)):
                    np.testing.assert_array_equal(got.numpy(), expected.numpy())


def fresh_residuals(ws, feeds) -> list[np.ndarray]:
    """The base's own ControlNet's residuals on a fresh runner."""
    with _runner(ws) as runner:
        return [r.numpy() for r in runner.control_residuals(None, **feeds)]


def test_a_swap_waits_for_the_set_in_use(tiny_workspace, adapters):
    """set_adapters(B) from another thread while this one holds A (``runner.hold()``, as a generation does):
    every call inside the hold still sees all of A, the swap ends only after the hold, and then B is in place.

    The swap is called before the calls inside the hold run, so a swap that did not wait would land
    while they run (a half- or fully-written B); it cannot pass by missing them.
    """
    manifest = Manifest.load(tiny_workspace.base_dir("tiny"))
    set_a = load_adapter_set(tiny_workspace, manifest, ["rt_a:1.0"], None)
    set_b = load_adapter_set(tiny_workspace, manifest, ["rt_a:-1.0"], None)
    runner = OrtRunner.open(tiny_workspace.base_dir("tiny"), set_a, OrtOptions(), swappable=set_a.touched())
    feeds = _feeds(size=8)
    expect_a = _step(runner, feeds).numpy()
    runner.set_adapters(set_b)
    expect_b = _step(runner, feeds).numpy()
    runner.set_adapters(set_a)
    assert np.abs(expect_a - expect_b).max() > 1e-3
    calling, swapped, errors = threading.Event(), threading.Event(), []

    def swap():
        calling.set()
        try:
            runner.set_adapters(set_b)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        swapped.set()

    swapper = threading.Thread(target=swap)
    with runner.hold() as held:
        assert held is set_a
        swapper.start()
        assert calling.wait(60)
        during = [_step(runner, feeds).numpy() for _ in range(4)]
        assert not swapped.is_set(), "set_adapters returned while a generation held the set"
    swapper.join(300)
    assert swapped.is_set() and not errors, errors
    for out in during:
        np.testing.assert_array_equal(out, expect_a)
    np.testing.assert_array_equal(_step(runner, feeds).numpy(), expect_b)
    runner.close()


def test_bake_output_loads_in_plain_onnxruntime(tiny_workspace, adapters, tmp_path):
    outputs = {UNET: tmp_path / "mix.lora", CONTROLNET: tmp_path / "mix-cn.lora", TEXT_ENCODER: tmp_path / "mix-te.lora"}
    written = bake(tiny_workspace, outputs, ["rt_a:0.8", "rt_b:0.5"], control="rt_hed")
    assert written == outputs and sorted(tmp_path.iterdir()) == sorted(outputs.values())  # exactly the files named
    import onnx

    manifest = Manifest.load(tiny_workspace.base_dir("tiny"))
    sessions = {}
    for graph in (UNET, CONTROLNET):
        baked = onnx.load(str(written[graph]))
        assert len(baked.graph.node) == 0
        so = ort.SessionOptions()
        so.log_severity_level = 3
        names = [t.name for t in baked.graph.initializer]
        values = [ort.OrtValue.ortvalue_from_numpy(onnx.numpy_helper.to_array(t)) for t in baked.graph.initializer]
        so.add_external_initializers(names, values)
        sessions[graph] = ort.InferenceSession(str(tiny_workspace.base_dir("tiny") / manifest.graphs[graph].path), so)
    feeds = {k: v.numpy() for k, v in _feeds().items()}
    context = {k: v for k, v in feeds.items() if k != "controlnet_cond"}
    residuals = sessions[CONTROLNET].run(None, feeds)
    plain_onnx = sessions[UNET].run(None, {**context, **dict(zip(RESIDUALS, residuals))})[0]
    injected = _runner(tiny_workspace, ["rt_a:0.8", "rt_b:0.5"], "rt_hed", hot_swap=False, optimization="all",
                       fuse_attention=False)  # the graphs exactly as the plain sessions read them
    np.testing.assert_array_equal(plain_onnx, _step(injected, _feeds()).numpy())


def test_convert_cli_summary_json_and_replace(tiny_workspace, adapters, capsys):
    assert cli(tiny_workspace, "convert", str(adapters["rt_a"]), "--name", "rt_a2", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "kohya" and report["keys_used"] == report["keys_total"]
    assert report["modules"] == {"unet": 192, "text_encoder": 12}
    assert report["size_bytes"] <= 1.1 * report["source_bytes"]
    assert report["trigger_words"] == ["blindbox"]
    first = tiny_workspace.adapter_path("rt_a2").stat().st_ino
    assert cli(tiny_workspace, "convert", str(adapters["rt_a"]), "--name", "rt_a2") == 0
    assert tiny_workspace.adapter_path("rt_a2").stat().st_ino != first  # replaced by rename, not rewritten
    assert not list(tiny_workspace.adapters.glob(".*tmp"))


@pytest.fixture(scope="module")
def other_base_adapter(tiny_workspace, adapters, tmp_path_factory):
    """rt_a converted for another base (tiny, seed 1) and copied into the tiny workspace."""
    other = Workspace.resolve(tmp_path_factory.mktemp("other"))
    export_base(other, "tiny1", arch="tiny", seed=1)
    convert_adapter(other, adapters["rt_a"], name="foreign")
    target = tiny_workspace.adapter_path("foreign")
    target.write_bytes(other.adapter_path("foreign").read_bytes())
    return "foreign"


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png"], "missing.png"),
    (["--lora", "nope"], "unknown adapter 'nope'"),
    (["--lora", "rt_a:abc"], "weight 'abc' is not a number"),
    (["--resolution", "0"], "resolution"),
    (["--control", "rt_a"], "not a ControlNet"),
    (["--lora", "foreign"], "convert the source again"),
])
def test_run_bad_input_exits_2(tiny_workspace, adapters, other_base_adapter, tmp_path, capsys, args, message):
    image = tmp_path / "in.png"
    from PIL import Image

    Image.fromarray(sample_image(64)).save(image)
    argv = ["run", "--prompt", "x", "--image", str(image), "--out", str(tmp_path / "out"), *args]
    if args[0] == "--image":
        argv = ["run", "--prompt", "x", "--out", str(tmp_path / "out"), "--image", str(tmp_path / args[1])]
    assert cli(tiny_workspace, *argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_run_cli_writes_images_sidecar_and_sweeps(tiny_workspace, adapters, tmp_path, capsys, caplog):
    from PIL import Image

    Image.fromarray(sample_image(64)).save(tmp_path / "in.png")
    long_prompt = "house " * 25  # over 77 tokens, within 225
    code = cli(tiny_workspace, "run", "--lora", "rt_a:0.8", "--control", "canny", "--image", str(tmp_path / "in.png"),
                "--prompt", long_prompt, "--n-prompt", "bad", "--resolution", "64", "--steps", "3",
                "--sweep", "rt_b:0.5,rt_hed", "--sweep", "none", "--out", str(tmp_path / "out"), "--json")
    assert code == 0
    captured = capsys.readouterr()
    assert "truncated" not in caplog.text  # > 77 tokens: A1111's chunks, nothing cut
    reports = json.loads(captured.out)
    assert len(reports) == 3 and "swap_s" in reports[1]["timings"]
    sidecars = sorted((tmp_path / "out").glob("*.json"))
    assert len(sidecars) == 3
    first = json.loads(sidecars[0].read_text())
    assert first["metadata"]["adapters"][0]["name"] == "rt_a" and first["metadata"]["adapters"][0]["weight"] == 0.8
    assert len(first["metadata"]["adapters"][0]["source_sha256"]) == 64
    assert first["settings"]["seed"] == 0 and first["settings"]["steps"] == 3
    images = [np.asarray(Image.open(tmp_path / "out" / json.loads(s.read_text())["images"][0])) for s in sidecars]
    assert all(im.shape == (64, 64, 3) for im in images)
    assert np.abs(images[0].astype(int) - images[2].astype(int)).mean() > 5


def test_run_cli_control_image_without_preprocessor(tiny_workspace, adapters, tmp_path, capsys):
    """--control-image with --preprocessor none: the file is the map (a converted ControlNet's input)."""
    from PIL import Image

    from loramgr.pipeline.canny import detect_edges

    source = sample_image(64)
    Image.fromarray(source).save(tmp_path / "in.png")
    edges = detect_edges(source, 64, 100, 200)[1]
    Image.fromarray(edges).save(tmp_path / "map.png")
    common = ["run", "--prompt", "a house", "--n-prompt", "bad", "--resolution", "64", "--steps", "3",
              "--out", str(tmp_path / "out"), "--lora", "rt_a:0.8", "--control", "rt_hed"]
    assert cli(tiny_workspace, *common, "--image", str(tmp_path / "in.png"), "--name", "canny") == 0
    assert cli(tiny_workspace, *common, "--control-image", str(tmp_path / "map.png"), "--preprocessor", "none",
                "--name", "map") == 0
    capsys.readouterr()
    sidecar = json.loads((tmp_path / "out" / "map.json").read_text())
    assert sidecar["settings"]["preprocessor"] == "none" and sidecar["metadata"]["image"] is None
    assert sidecar["metadata"]["control_image"] == str(tmp_path / "map.png")
    # the canny map of the image, given as a finished map, gives the same image as the canny run
    canny, mapped = (np.asarray(Image.open(tmp_path / "out" / json.loads((tmp_path / "out" / f"{n}.json")
                                                                         .read_text())["images"][0]))
                     for n in ("canny", "map"))
    np.testing.assert_array_equal(canny, mapped)
    assert cli(tiny_workspace, *common, "--name", "none") == 2
    assert "no input: give --image, --control-image, a --unit image, or --width and --height" in \
        capsys.readouterr().err


# -- one adapter set per image, under concurrent swaps ------------------------------------------

STRESS = {"resolution": 64, "steps": 3, "n_prompt": "lowres"}


def _stress(ws: Workspace, hot_swap: bool, generations: int, swaps: int):
    """A generation loop in one thread, set_adapters in another (bounded both); every image must be
    bit-identical to the fresh-session reference of the set its generation held."""
    from loramgr.adapters import AdapterSet

    manifest = Manifest.load(ws.base_dir("tiny"))
    sets = {"a": load_adapter_set(ws, manifest, ["rt_a:1.0"]), "b": load_adapter_set(ws, manifest, ["rt_a:-1.0"]),
            "plain": AdapterSet()}
    image, settings = sample_image(64), GenerationSettings(prompt="a house", seed=5, **STRESS)
    expected = {}
    for name, adapter_set in sets.items():
        with OrtRunner.open(ws.base_dir("tiny"), adapter_set, OrtOptions(hot_swap=False)) as fresh:
            expected[name] = np.stack(make_pipeline(fresh.base, fresh)(image, settings).images)
    assert not np.array_equal(expected["a"], expected["b"]) and not np.array_equal(expected["a"], expected["plain"])
    runner = OrtRunner.open(ws.base_dir("tiny"), sets["a"], OrtOptions(hot_swap=hot_swap),
                            swappable=sets["a"].touched())
    pipeline = make_pipeline(runner.base, runner)
    made, errors, swapped = [], [], threading.Event()

    def generate_loop():
        try:
            while len(made) < generations or not swapped.is_set():
                result = pipeline(image, settings)
                made.append((result.adapter_set, np.stack(result.images)))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=generate_loop)
    thread.start()
    order = ["b", "a", "plain", "a"]
    try:
        for i in range(swaps):
            target = sets[order[i % len(order)]]
            runner.set_adapters(target)
            assert runner.adapter_set is target  # set_adapters returned: the runner is on the new set
            count, deadline = len(made), time.monotonic() + 300
            while len(made) == count and not errors and time.monotonic() < deadline:
                time.sleep(0.005)  # let a generation run on this set before the next swap (a loaded machine
                # could otherwise run every swap back to back and the images would show one set only)
    finally:
        swapped.set()
        thread.join()
    assert not errors, errors
    names = {id(s): n for n, s in sets.items()}
    seen = set()
    for held, images in made:
        name = names[id(held)]
        seen.add(name)
        np.testing.assert_array_equal(images, expected[name], err_msg=f"an image not made by {name} alone")
    return seen


def test_every_image_comes_from_one_set_with_hot_swap(tiny_workspace, adapters):
    seen = _stress(tiny_workspace, hot_swap=True, generations=8, swaps=12)
    assert len(seen) >= 2  # the swaps did land between generations


def test_every_image_comes_from_one_set_when_sessions_are_recreated(tiny_workspace, adapters):
    seen = _stress(tiny_workspace, hot_swap=False, generations=5, swaps=6)
    assert len(seen) >= 2


def test_a_swap_inside_a_generations_lease_is_refused(tiny_workspace, adapters):
    from loramgr.errors import LoramgrError

    runner = _runner(tiny_workspace, ["rt_a:0.8"])
    with runner.hold() as held:
        assert held is runner.adapter_set
        _step(runner, _feeds())  # graph calls re-enter the lease
        with pytest.raises(LoramgrError, match="inside runner.hold"):
            runner.set_adapters(held)
    runner.set_adapters(held)  # outside the block it goes through
    runner.close()


# -- the runner contract and the in-memory entry point ----------------------------------------


def test_every_backend_satisfies_the_runner_protocol(tiny_workspace):
    from loramgr.backends.base import Runner
    from loramgr.backends.tensorrt import TrtRunner
    from loramgr.backends.torch_runner import TorchRunner

    methods = ("encode_text", "control_residuals", "predict_noise", "vae_decode", "vae_encode", "set_adapters", "hold",
               "swappable",
               "release", "close", "__enter__", "__exit__")
    for cls in (OrtRunner, TrtRunner, TorchRunner):
        missing = [m for m in methods if not callable(getattr(cls, m, None))]
        assert not missing, f"{cls.__name__} lacks {missing}"
    with _runner(tiny_workspace) as runner:
        assert isinstance(runner, Runner)
        assert runner.swappable() == {} and isinstance(runner.timings.session_s, float)


def test_generator_in_memory_equals_the_files_of_generate(tiny_workspace, adapters, tmp_path):
    from PIL import Image

    from loramgr.adapters import AdapterChoice
    from loramgr.runtime import Generator, generate

    image = sample_image(64)
    Image.fromarray(image).save(tmp_path / "in.png")
    settings = GenerationSettings(prompt="a house", seed=2, **STRESS)
    choices = [AdapterChoice(("rt_a:0.8",)), AdapterChoice(("rt_b:0.5",), "rt_hed")]
    reports = generate(tiny_workspace, tmp_path / "in.png", settings, choices, base="tiny", out_dir=tmp_path / "out",
                       stem="run")
    files = [np.asarray(Image.open(r.files[0])) for r in reports]
    with Generator.open(tiny_workspace, "tiny", choices=choices) as generator:
        made = [generator.generate(c, settings, image) for c in choices]
        map_only = dataclasses.replace(settings, preprocessor="none")  # no input image, the map as is
        again = generator.generate(choices[0], map_only, control_image=made[0].control_map)
    for generation, png in zip(made, files):
        np.testing.assert_array_equal(generation.images[0], png)
    assert made[0].adapters[0]["name"] == "rt_a" and made[0].adapters[0]["weight"] == 0.8
    assert len(made[0].adapters[0]["source_sha256"]) == 64
    assert [a["name"] for a in made[1].adapters] == ["rt_hed", "rt_b"]
    assert "open_s" in made[0].timings and "swap_s" in made[1].timings and made[1].timings["run_s"] > 0
    np.testing.assert_array_equal(again.images[0], made[0].images[0])  # the control map stands for the image
    np.testing.assert_array_equal(again.control_map, made[0].control_map)


def test_generator_calls_from_two_threads_each_get_their_set(tiny_workspace, adapters):
    from loramgr.adapters import AdapterChoice
    from loramgr.runtime import Generator

    image = sample_image(64)
    settings = GenerationSettings(prompt="a house", seed=4, **STRESS)
    choices = [AdapterChoice(("rt_a:1.0",)), AdapterChoice(("rt_a:-1.0",))]
    with Generator.open(tiny_workspace, "tiny", choices=choices) as generator:
        expected = [generator.generate(c, settings, image).images[0] for c in choices]
        got, errors = {0: [], 1: []}, []

        def work(i):
            try:
                for _ in range(3):
                    got[i].append(generator.generate(choices[i], settings, image).images[0])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert not np.array_equal(expected[0], expected[1])
    for i in (0, 1):
        for image_made in got[i]:
            np.testing.assert_array_equal(image_made, expected[i])
