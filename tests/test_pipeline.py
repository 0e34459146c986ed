"""The canny ControlNet pipeline: annotator transcription, control scales, parity with
diffusers' pipelines on the tiny model, sensitivity, validation and files.

Parity tolerance: max |pixel difference| <= 1 uint8 level (mean < 0.01). Both sides run
the same float32 modules on the same inputs and draw the same random numbers, so only
summation order may differ; that moves a value across a .5 rounding boundary at most
(measured: 0 everywhere except guess mode, where diffusers runs the ControlNet on the N
conditional rows and loramgr on all 2N rows with zero scales: max 1).
"""

from __future__ import annotations

import dataclasses
import json
import logging

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from loramgr.backends.base import Runner
from loramgr.backends.torch_runner import TorchRunner
from loramgr.errors import BadFileError, LoramgrError
from loramgr.pipeline.canny import HWC3, detect_edges, resize_image
from loramgr.pipeline.control import control_scales, guess_mode_scales
from loramgr.pipeline.controlnet import ControlNetPipeline, GenerationResult
from loramgr.pipeline.images import load_image
from loramgr.pipeline.outputs import save_result
from loramgr.pipeline.schedulers import SCHEDULERS
from loramgr.pipeline.settings import GenerationSettings
from reference_pipelines import (
    diffusers_images, reference_HWC3, reference_process_preprocessing, reference_resize_image,
)

pytestmark = [
    # diffusers' schedulers call np.array(tensor, copy=False) under numpy 2: their warning, not ours.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    # diffusers' img2img deprecates one image for N samples, the very case loramgr mirrors.
    pytest.mark.filterwarnings("ignore:You have passed 2 text prompts:FutureWarning"),
]

MAX_PIXEL_DIFF = 1
FAST = {"resolution": 64, "steps": 4}


def synthetic_image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Gradients, a disc, a bar and noise: edges for Canny, detail that resampling changes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([255 * xx / width, 255 * yy / height, 128 + 64 * np.sin(xx / 5) * np.cos(yy / 7)], axis=-1)
    image[(yy - height / 2) ** 2 + (xx - width / 3) ** 2 < (min(height, width) / 4) ** 2] = (250, 30, 30)
    image[height // 5 : height // 3, width // 2 :] = (20, 20, 200)
    image += rng.normal(0, 6, image.shape)
    image = image.clip(0, 255).astype(np.uint8)
    if channels == 4:
        alpha = (255 * (xx / width)).astype(np.uint8)[..., None]
        image = np.concatenate([image, alpha], axis=-1)
    return image


# --- canny preprocessing -----------------------------------------------------------------

def test_hwc3_matches_annotator():
    rgba = synthetic_image(40, 30, channels=4)
    gray = rgba[..., 0]
    for image in (rgba, gray, gray[..., None], rgba[..., :3]):
        np.testing.assert_array_equal(HWC3(image), reference_HWC3(image))
    assert HWC3(rgba)[0, 0].tolist() == [255, 255, 255]  # alpha 0 composites over white


@pytest.mark.parametrize(
    ("shape", "resolution", "size", "chosen", "other"),
    [
        ((90, 60), 128, (192, 128), cv2.INTER_LANCZOS4, cv2.INTER_AREA),  # enlarging: k = 2.13
        ((300, 200), 64, (128, 64), cv2.INTER_AREA, cv2.INTER_LANCZOS4),  # shrinking: 96/64 = 1.5 rounds to 2
    ],
)
def test_resize_image_matches_annotator(shape, resolution, size, chosen, other):
    image = synthetic_image(*shape)
    resized = resize_image(image, resolution)
    assert resized.shape == (*size, 3)
    np.testing.assert_array_equal(resized, reference_resize_image(image, resolution))
    np.testing.assert_array_equal(resized, cv2.resize(image, size[::-1], interpolation=chosen))
    assert np.abs(resized.astype(int) - cv2.resize(image, size[::-1], interpolation=other)).max() > 10


@pytest.mark.parametrize("channels", [3, 4])
def test_detect_edges_matches_process(channels):
    image = synthetic_image(90, 70, channels=channels)
    resized, edges = detect_edges(image, 128, 100, 200)
    ref_resized, ref_edges = reference_process_preprocessing(image, 128, 100, 200)
    np.testing.assert_array_equal(resized, ref_resized)
    np.testing.assert_array_equal(edges, ref_edges)
    assert edges.shape == (192, 128, 3) and set(np.unique(edges)) == {0, 255}
    assert 0.01 < (edges[..., 0] == 255).mean() < 0.5  # a real edge map, not empty or full
    _, fewer = detect_edges(image, 128, 200, 250)
    assert (fewer == 255).sum() < (edges == 255).sum()


# --- control scales ----------------------------------------------------------------------

def test_control_scales_normal_mode():
    scales = control_scales(2, 0.6, guess_mode=False, schedule="controlnet")
    assert scales.shape == (4, 13) and scales.dtype == torch.float32
    assert torch.all(scales == torch.tensor(0.6))


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("controlnet", [0.825 ** (12 - i) for i in range(13)]),
        ("diffusers", [10 ** (-1 + i / 12) for i in range(13)]),
    ],
)
def test_control_scales_guess_mode(schedule, expected):
    strength, n = 0.8, 3
    scales = control_scales(n, strength, guess_mode=True, schedule=schedule)
    assert scales.shape == (2 * n, 13)
    assert torch.all(scales[:n] == 0)  # unconditional rows: no ControlNet
    expected_row = torch.tensor(expected) * strength
    torch.testing.assert_close(scales[n:], expected_row.expand(n, 13), rtol=1e-6, atol=0)
    torch.testing.assert_close(guess_mode_scales(strength, schedule), expected_row, rtol=1e-6, atol=0)


# --- the pipeline over the torch runner vs diffusers' pipelines --------------------------

@pytest.fixture(scope="module")
def reference(tiny_folder):
    """diffusers' pipeline on the tiny folder; its modules are shared with the runner."""
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(reference) -> ControlNetPipeline:
    runner = TorchRunner.from_components(reference.components)
    return ControlNetPipeline(runner, reference.tokenizer, reference.scheduler.config, reference.vae.config.scaling_factor)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return synthetic_image(96, 80)


def assert_same_images(ours: list[np.ndarray], theirs: np.ndarray) -> None:
    ours = np.stack(ours).astype(np.int16)
    assert ours.shape == theirs.shape
    diff = np.abs(ours - theirs.astype(np.int16))
    assert diff.max() <= MAX_PIXEL_DIFF, f"max diff {diff.max()}, mean {diff.mean():.4f}"
    assert diff.mean() < 0.01
    assert ours.std() > 40  # a full-range image, so agreement means something


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"num_samples": 2, "seed": 7}, id="normal"),
        pytest.param({"guess_mode": True, "control_schedule": "diffusers", "strength": 0.7}, id="guess-mode"),
        pytest.param({"eta": 0.7}, id="ddim-eta"),
        pytest.param({"img2img_strength": 0.75, "scale": 5.0}, id="img2img"),
        pytest.param({"img2img_strength": 0.5, "num_samples": 2, "eta": 0.5, "steps": 5}, id="img2img-eta-batch"),
    ],
)
def test_matches_diffusers(pipe, reference, image, overrides):
    settings = GenerationSettings(prompt="a bird", **{**FAST, **overrides})
    assert_same_images(pipe(image, settings).images, diffusers_images(reference, image, settings))


@pytest.mark.parametrize("img2img_strength", [None, 0.6], ids=["txt2img", "img2img"])
@pytest.mark.parametrize("scheduler", [name for name in SCHEDULERS if name != "ddim"])
def test_matches_diffusers_with_scheduler(pipe, reference, image, scheduler, img2img_strength):
    settings = GenerationSettings(prompt="a bird", scheduler=scheduler, img2img_strength=img2img_strength, **FAST)
    assert_same_images(pipe(image, settings).images, diffusers_images(reference, image, settings))


def _depth_like_map(height: int, width: int) -> np.ndarray:
    """A smooth, full-range map unlike any canny output (a stand-in for depth / pose / hed)."""
    y, x = np.mgrid[0:height, 0:width]
    field = 127.5 + 127.5 * np.sin(x / 7.0) * np.cos(y / 11.0)
    return np.repeat(field.astype(np.uint8)[:, :, None], 3, axis=2)


@pytest.mark.parametrize("img2img_strength", [None, 0.6], ids=["txt2img", "img2img"])
def test_precomputed_map_matches_diffusers(pipe, reference, image, img2img_strength):
    """--preprocessor none: the map goes to the ControlNet as it is, exactly as diffusers' control image."""
    settings = GenerationSettings(prompt="a bird", preprocessor="none", img2img_strength=img2img_strength, **FAST)
    size = detect_edges(image, settings.resolution, 100, 200)[0].shape[:2]
    control = _depth_like_map(*size)
    made = pipe(image, settings, control_image=control)
    np.testing.assert_array_equal(made.edge_map, control)
    assert_same_images(made.images, diffusers_images(reference, image, settings, control_map=control))
    canny = pipe(image, dataclasses.replace(settings, preprocessor="canny"))
    assert np.abs(np.stack(made.images).astype(int) - np.stack(canny.images)).mean() > 1  # the map mattered


def test_control_image_sizes(pipe, image):
    """The output size follows the input image; a map of another size is resized to it (bilinear)."""
    settings = GenerationSettings(prompt="a bird", preprocessor="none", **FAST)
    size = detect_edges(image, settings.resolution, 100, 200)[0].shape[:2]
    small = _depth_like_map(size[0] // 2, size[1] // 2)
    resized, control = pipe.prepare_control(image, small, settings)
    assert resized.shape[:2] == control.shape[:2] == size
    np.testing.assert_array_equal(control, cv2.resize(small, (size[1], size[0]), interpolation=cv2.INTER_LINEAR))
    # without an input image the map sets the size; canny on a separate control image
    resized, control = pipe.prepare_control(None, _depth_like_map(*size), settings)
    assert resized is None and control.shape[:2] == size
    resized, control = pipe.prepare_control(image, image[::-1], dataclasses.replace(settings, preprocessor="canny"))
    np.testing.assert_array_equal(control, detect_edges(image[::-1], settings.resolution, 100, 200)[1])
    with pytest.raises(LoramgrError, match="img2img_strength needs an input image"):
        pipe(None, dataclasses.replace(settings, img2img_strength=0.5), control_image=small)
    with pytest.raises(LoramgrError, match="unknown preprocessor 'depth'"):
        pipe(image, dataclasses.replace(settings, preprocessor="depth"))


def test_torch_runner_is_a_runner(pipe):
    assert isinstance(pipe.runner, Runner)
    assert pipe.runner.device == torch.device("cpu")


# --- sensitivity: the tiny model reacts to seed, scale, strength and prompts ------------

@pytest.fixture(scope="module")
def baseline(pipe, image) -> GenerationResult:
    return pipe(image, GenerationSettings(prompt="a bird", **FAST))


def mean_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.abs(np.stack(a).astype(float) - np.stack(b).astype(float)).mean())


@pytest.mark.parametrize(
    "overrides",
    [{"seed": 1}, {"scale": 3.0}, {"strength": 0.3}, {"prompt": "a photo of a dog in the snow"},
     {"n_prompt": "blurry"}, {"guess_mode": True}],
    ids=lambda o: ",".join(o),
)
def test_output_reacts_to(pipe, image, baseline, overrides):
    changed = pipe(image, GenerationSettings(**{"prompt": "a bird", **FAST, **overrides}))
    assert mean_abs_diff(changed.images, baseline.images) > 5


def test_output_is_deterministic_and_full_range(pipe, image, baseline):
    again = pipe(image, GenerationSettings(prompt="a bird", **FAST))
    np.testing.assert_array_equal(np.stack(again.images), np.stack(baseline.images))
    assert np.stack(baseline.images).std() > 40
    assert np.stack(baseline.images).min() < 30 and np.stack(baseline.images).max() > 225


def test_output_reacts_to_the_control_image(pipe, image, baseline):
    other = synthetic_image(96, 80, seed=1)[::-1].copy()
    changed = pipe(other, GenerationSettings(prompt="a bird", **FAST))
    assert mean_abs_diff(changed.images, baseline.images) > 5


def test_zero_strength_ignores_the_control_image(pipe, image):
    settings = GenerationSettings(prompt="a bird", strength=0.0, **FAST)
    other = synthetic_image(96, 80, seed=1)[::-1].copy()
    np.testing.assert_array_equal(np.stack(pipe(image, settings).images), np.stack(pipe(other, settings).images))


# --- what the pipeline hands the runner --------------------------------------------------

class RecordingRunner:
    """Wraps a runner and records every ``predict_noise`` input."""

    def __init__(self, runner):
        self.runner, self.device, self.calls, self.released = runner, runner.device, [], []

    def encode_text(self, input_ids):
        return self.runner.encode_text(input_ids)

    def predict_noise(self, sample, timestep, encoder_hidden_states, controlnet_cond, control_scales):
        self.calls.append({"sample": sample, "timestep": timestep, "embeds": encoder_hidden_states,
                           "cond": controlnet_cond, "scales": control_scales})
        return self.runner.predict_noise(sample, timestep, encoder_hidden_states, controlnet_cond, control_scales)

    def vae_decode(self, latent):
        return self.runner.vae_decode(latent)

    def vae_encode(self, image):
        return self.runner.vae_encode(image)

    def hold(self):
        return self.runner.hold()

    def release(self, graph):
        self.released.append(graph)
        self.runner.release(graph)


def test_runner_inputs_and_progress(pipe, image):
    recorder = RecordingRunner(pipe.runner)
    recording = ControlNetPipeline(recorder, pipe.tokenizer, pipe.scheduler_config, pipe.vae_scaling_factor)
    settings = GenerationSettings(prompt="a bird", num_samples=2, guess_mode=True, steps=3, resolution=64)
    steps = []
    result = recording(image, settings, progress=lambda done, total: steps.append((done, total)))

    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert len(recorder.calls) == 3 and len(result.images) == 2 and len(result.timesteps) == 3
    call = recorder.calls[0]
    assert call["sample"].shape == (4, 4, 8, 8) and call["cond"].shape == (4, 3, 64, 64)
    assert call["timestep"].dtype == torch.float32 and call["timestep"].shape == (4,)
    torch.testing.assert_close(call["scales"], control_scales(2, 1.0, True, "controlnet"))
    embeds = call["embeds"]  # [uncond, uncond, cond, cond]
    assert torch.equal(embeds[0], embeds[1]) and torch.equal(embeds[2], embeds[3])
    assert not torch.equal(embeds[0], embeds[2])
    _, edges = detect_edges(image, 64, 100, 200)
    np.testing.assert_array_equal(result.edge_map, edges)
    np.testing.assert_array_equal((call["cond"][3].permute(1, 2, 0) * 255).round().byte().numpy(), edges)
    assert set(result.timings) == {"encode_prompt", "prepare_control", "prepare_latents", "denoise", "decode"}


def test_long_prompt_is_truncated_with_a_warning(pipe, image, caplog):
    with caplog.at_level(logging.WARNING, logger="loramgr.pipeline.controlnet"):
        pipe(image, GenerationSettings(prompt="bird " * 100, n_prompt="", steps=1, resolution=64))
    assert any("prompt, a_prompt" in r.message and "truncated" in r.message for r in caplog.records)


# --- validation --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"resolution": 32}, ("resolution", "32")),
        ({"resolution": 256.0}, ("resolution", "256.0")),
        ({"steps": 0}, ("steps", "0")),
        ({"num_samples": 0}, ("num_samples", "0")),
        ({"seed": -1}, ("seed", "-1")),
        ({"low_threshold": 0}, ("low_threshold", "0")),
        ({"high_threshold": 256}, ("high_threshold", "256")),
        ({"low_threshold": 200, "high_threshold": 100}, ("low_threshold (200)", "high_threshold (100)")),
        ({"img2img_strength": 0.0}, ("img2img_strength", "0.0")),
        ({"img2img_strength": 1.5}, ("img2img_strength", "1.5")),
        ({"img2img_strength": 0.01, "steps": 20}, ("img2img_strength=0.01", "steps=20", "no denoising step")),
        ({"scheduler": "dpmpp"}, ("scheduler 'dpmpp'", "ddim, pndm, lms, euler, euler_a, heun, dpm++, unipc")),
        ({"control_schedule": "linear"}, ("control_schedule 'linear'", "controlnet, diffusers")),
        ({"eta": 0.5, "scheduler": "euler"}, ("eta=0.5", "'euler'")),
        ({"scheduler": "pndm", "steps": 3}, ("scheduler 'pndm'", "steps=3")),
        ({"eta": -0.1}, ("eta", "-0.1")),
        ({"strength": float("nan")}, ("strength", "nan")),
        ({"guess_mode": "yes"}, ("guess_mode", "'yes'")),
        ({"prompt": None}, ("prompt", "None")),
    ],
)
def test_bad_settings_name_the_argument(pipe, image, overrides, fragments):
    with pytest.raises(LoramgrError) as info:
        pipe(image, GenerationSettings(**{"prompt": "a bird", **overrides}))
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "bad", [np.zeros((64, 64, 3), np.float32), np.zeros((64, 64, 2), np.uint8), np.zeros((0, 64, 3), np.uint8)]
)
def test_bad_image_is_refused(pipe, bad):
    with pytest.raises(LoramgrError, match="^image must be"):
        pipe(bad, GenerationSettings(prompt="a bird"))


# --- files in and out --------------------------------------------------------------------

def test_load_image(tmp_path):
    rgba = synthetic_image(20, 30, channels=4)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "rgb.jpg")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgba)
    assert load_image(tmp_path / "rgb.jpg").shape == (20, 30, 3)
    with pytest.raises(BadFileError, match="missing.png: no such image file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "fake.png").write_bytes(b"not a png")
    with pytest.raises(BadFileError, match="fake.png: not a readable image"):
        load_image(tmp_path / "fake.png")


def test_save_result(tmp_path, baseline):
    written = save_result(baseline, tmp_path, "bird", metadata={"backend": "torch"})
    assert [p.name for p in written] == ["bird-0.png", "bird-edges.png", "bird.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bird-0.png", "bird-edges.png", "bird.json"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "bird-0.png")), baseline.images[0])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "bird-edges.png")), baseline.edge_map)
    sidecar = json.loads((tmp_path / "bird.json").read_text())
    assert sidecar["settings"]["prompt"] == "a bird" and sidecar["metadata"] == {"backend": "torch"}
    assert (sidecar["height"], sidecar["width"]) == (64, 64) and len(sidecar["timesteps"]) == 4
    with pytest.raises(LoramgrError, match="bird-0.png already exists"):
        save_result(baseline, tmp_path, "bird")
    save_result(baseline, tmp_path, "bird", overwrite=True)
