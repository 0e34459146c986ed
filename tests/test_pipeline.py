"""The ControlNet pipeline: annotator transcription, unit scales and windows, parity with
diffusers' pipelines on the tiny model (one unit, several, none, guidance off),
sensitivity, validation and files.

Parity tolerance: max |pixel difference| <= 1 uint8 level (mean < 0.01). Both sides run
the same float32 modules on the same inputs and draw the same random numbers, so only
summation order may differ; that moves a value across a .5 rounding boundary at most.
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
from loramgr.pipeline.control import ControlUnit, soft_weights
from loramgr.pipeline.controlnet import ControlNetPipeline, GenerationResult
from loramgr.pipeline.images import load_image
from loramgr.pipeline.outputs import save_result
from loramgr.pipeline.settings import GenerationSettings
from reference_pipelines import (
    diffusers_images, reference_HWC3, reference_process_preprocessing, reference_resize_image,
)
from reference_units import diffusers_units_images

pytestmark = [
    # diffusers' schedulers call np.array(tensor, copy=False) under numpy 2: their warning, not ours.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    # diffusers' img2img deprecates one image for N samples, the very case loramgr mirrors.
    pytest.mark.filterwarnings("ignore:You have passed 2 text prompts:FutureWarning"),
]

MAX_PIXEL_DIFF = 1
FAST = {"resolution": 64, "steps": 4, "n_prompt": "lowres, bad anatomy"}  # within 77 tokens: diffusers cuts longer ones


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


# --- unit scales and windows --------------------------------------------------------------

def test_unit_scales_balanced():
    scales = ControlUnit(strength=0.6).scales("controlnet")
    assert scales.shape == (13,) and scales.dtype == torch.float32
    assert torch.all(scales == torch.tensor(0.6))


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("controlnet", [0.825 ** (12 - i) for i in range(13)]),
        ("diffusers", [10 ** (-1 + i / 12) for i in range(13)]),
    ],
)
@pytest.mark.parametrize("mode", ["prompt", "control"])
def test_unit_soft_weights(schedule, expected, mode):
    strength = 0.8
    expected_row = torch.tensor(expected) * strength
    torch.testing.assert_close(ControlUnit(strength=strength, mode=mode).scales(schedule), expected_row,
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(soft_weights(strength, schedule), expected_row, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("start", "end", "steps"), [(0.0, 1.0, 4), (0.25, 0.5, 4), (0.1, 0.7, 10), (0.5, 0.5, 4),
                                                       (0.3, 1.0, 3)])
def test_unit_windows(start, end, steps):
    """diffusers' rule (pipeline_controlnet.py: keep = 1 - (i/S < s or (i+1)/S > e)) and A1111's (s <= i/S <= e)."""
    unit = ControlUnit(start=start, end=end)
    diffusers_keep = [not (i / steps < start or (i + 1) / steps > end) for i in range(steps)]
    a1111_acts = [start <= i / steps <= end for i in range(steps)]
    assert [unit.acts(i, steps, "diffusers") for i in range(steps)] == diffusers_keep
    assert [unit.acts(i, steps, "a1111") for i in range(steps)] == a1111_acts
    assert not any(ControlUnit(strength=0.0).acts(i, steps, "a1111") for i in range(steps))


# --- the pipeline over the torch runner vs diffusers' pipelines --------------------------

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
# the rest of SCHEDULERS (the SDE one needs its seed in the reference): tests/test_samplers.py
@pytest.mark.parametrize("scheduler", ["pndm", "lms", "euler", "euler_a", "heun", "dpm++", "unipc", "dpm++_karras"])
def test_matches_diffusers_with_scheduler(pipe, reference, image, scheduler, img2img_strength):
    settings = GenerationSettings(prompt="a bird", scheduler=scheduler, img2img_strength=img2img_strength, **FAST)
    assert_same_images(pipe(image, settings).images, diffusers_images(reference, image, settings))


@pytest.fixture(scope="module")
def other_controlnet(reference):
    """A second ControlNet: the base's with every weight moved (a stand-in for hed, depth, ...)."""
    import copy

    other = copy.deepcopy(reference.controlnet)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return other


@pytest.fixture(scope="module")
def units_pipe(reference, other_controlnet) -> ControlNetPipeline:
    runner = TorchRunner.from_components(reference.components, {"other": other_controlnet})
    return ControlNetPipeline(runner, reference.tokenizer, reference.scheduler.config, reference.vae.config.scaling_factor)


UNIT_CASES = {
    # (controlnets by name, strengths, starts, ends, guess mode, img2img)
    "two units, the same ControlNet twice": (["canny", "canny"], [0.7, 0.5], [0.0, 0.25], [0.5, 1.0], False, None),
    "two ControlNets": (["canny", "other"], [1.0, 0.8], [0.0, 0.0], [1.0, 0.75], False, None),
    "three units": (["other", "canny", "other"], [0.6, 0.9, 0.4], [0.0, 0.2, 0.5], [0.8, 1.0, 1.0], False, None),
    "two units, guess mode": (["canny", "other"], [0.9, 0.7], [0.0, 0.25], [1.0, 1.0], True, None),
    "two units, img2img": (["other", "canny"], [0.8, 0.6], [0.0, 0.0], [1.0, 0.5], False, 0.75),
}


@pytest.mark.parametrize("case", UNIT_CASES.values(), ids=UNIT_CASES.keys())
def test_units_match_diffusers_multicontrolnet(units_pipe, reference, other_controlnet, image, case):
    """Several units against diffusers' MultiControlNetModel with control_guidance_start/end and guess_mode."""
    names, strengths, starts, ends, guess, img2img = case
    maps = [_depth_like_map(96, 80)[::k + 1, ::k + 1] if k % 2 else image for k in range(len(names))]
    preprocessors = ["none" if k % 2 else "canny" for k in range(len(names))]
    units = tuple(ControlUnit(n, p, s, a, b, "control" if guess else "balanced")
                  for n, p, s, a, b in zip(names, preprocessors, strengths, starts, ends))
    settings = GenerationSettings(prompt="a bird", a_prompt="", n_prompt="blurry", steps=6, resolution=64, seed=3,
                                  units=units,
                                  control_schedule="diffusers", img2img_strength=img2img)
    made = units_pipe(image, settings, control_images=maps)
    modules = {"canny": reference.controlnet, "other": other_controlnet}
    theirs = diffusers_units_images(reference, [modules[n] for n in names], made.control_maps, prompt="a bird",
                                    negative="blurry", steps=6, seed=3, scale=settings.scale, strengths=strengths,
                                    starts=starts, ends=ends, guess_mode=guess,
                                    init=None if img2img is None else resize_image(image, 64),
                                    img2img_strength=img2img)
    assert_same_images(made.images, theirs)
    alone = units_pipe(image, dataclasses.replace(settings, units=units[:1]), control_images=maps[:1])
    assert mean_abs_diff(alone.images, made.images) > 1  # the other units mattered


@pytest.mark.parametrize("img2img", [None, 0.6], ids=["txt2img", "img2img"])
@pytest.mark.parametrize("scale", [7.5, 1.0], ids=["guidance", "guidance-off"])
def test_no_unit_matches_plain_stable_diffusion(pipe, reference, image, img2img, scale):
    """No unit: diffusers' StableDiffusion[Img2Img]Pipeline, no ControlNet anywhere; cfg 1 skips the negative half."""
    settings = GenerationSettings(prompt="a bird", a_prompt="", n_prompt="blurry", steps=5, resolution=64, seed=2,
                                  scale=scale,
                                  units=(), img2img_strength=img2img, width=64, height=128)
    made = pipe(None if img2img is None else image, settings)
    init = None if img2img is None else resize_image(image, 64)
    theirs = diffusers_units_images(reference, [], [np.zeros((128, 64, 3), np.uint8)], prompt="a bird",
                                    negative="blurry", steps=5, seed=2, scale=scale, strengths=[], starts=[], ends=[],
                                    init=init, img2img_strength=img2img)
    assert made.control_maps == [] and made.edge_map is None
    assert_same_images(made.images, theirs)


@pytest.mark.parametrize("mode", ["balanced", "control"])
def test_guidance_off_matches_diffusers(pipe, reference, image, mode):
    """scale <= 1: diffusers' do_classifier_free_guidance is off, the batch is N (one unit, either mode)."""
    settings = GenerationSettings(prompt="a bird", steps=4, resolution=64, scale=1.0, guess_mode=mode == "control",
                                  control_schedule="diffusers")
    assert_same_images(pipe(image, settings).images, diffusers_images(reference, image, settings))


def test_prompt_mode_is_soft_weights_on_both_halves(pipe, image):
    """A1111's "My prompt is more important": each residual k scaled by 0.825 ** (12 - k), on both halves."""
    recorder, recording = _recording(pipe)
    unit = ControlUnit(strength=0.5, mode="prompt")
    recording(image, GenerationSettings(prompt="a bird", n_prompt="lowres", steps=1, resolution=64, units=(unit,)))
    (control,), (unet,) = recorder.controlnet, recorder.unet
    assert control["sample"].shape[0] == unet["sample"].shape[0] == 2  # both halves
    raw = pipe.runner.control_residuals(None, control["sample"], control["timestep"], control["embeds"], control["cond"])
    for k, (got, r) in enumerate(zip(unet["residuals"], raw)):
        torch.testing.assert_close(got, r * (0.5 * 0.825 ** (12 - k)), rtol=1e-6, atol=1e-7)


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
    unit = settings.control_units()
    size = detect_edges(image, settings.resolution, 100, 200)[0].shape[:2]
    small = _depth_like_map(size[0] // 2, size[1] // 2)
    resized, (control,) = pipe.prepare_control(image, [small], unit, settings)
    assert resized.shape[:2] == control.shape[:2] == size
    np.testing.assert_array_equal(control, cv2.resize(small, (size[1], size[0]), interpolation=cv2.INTER_LINEAR))
    # without an input image the map sets the size; canny on a separate control image
    resized, (control,) = pipe.prepare_control(None, [_depth_like_map(*size)], unit, settings)
    assert resized is None and control.shape[:2] == size
    canny = dataclasses.replace(settings, preprocessor="canny")
    resized, (control,) = pipe.prepare_control(image, [image[::-1]], canny.control_units(), canny)
    np.testing.assert_array_equal(control, detect_edges(image[::-1], settings.resolution, 100, 200)[1])
    with pytest.raises(LoramgrError, match="img2img_strength needs an input image"):
        pipe(None, dataclasses.replace(settings, img2img_strength=0.5), control_image=small)
    with pytest.raises(LoramgrError, match="unknown preprocessor 'depth'"):
        pipe(image, dataclasses.replace(settings, preprocessor="depth"))
    with pytest.raises(LoramgrError, match="no input: give an image, a control image, or a width and height"):
        pipe(None, dataclasses.replace(settings, units=()))


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
    """Wraps a runner and records every ControlNet and UNet call."""

    def __init__(self, runner):
        self.runner, self.device, self.controlnet, self.unet, self.released = runner, runner.device, [], [], []

    def encode_text(self, input_ids, token_vectors=None, token_mask=None):
        return self.runner.encode_text(input_ids, token_vectors, token_mask)

    def control_residuals(self, controlnet, sample, timestep, encoder_hidden_states, controlnet_cond):
        self.controlnet.append({"controlnet": controlnet, "sample": sample, "timestep": timestep,
                                "embeds": encoder_hidden_states, "cond": controlnet_cond})
        return self.runner.control_residuals(controlnet, sample, timestep, encoder_hidden_states, controlnet_cond)

    def predict_noise(self, sample, timestep, encoder_hidden_states, residuals=None):
        self.unet.append({"sample": sample, "timestep": timestep, "embeds": encoder_hidden_states,
                          "residuals": residuals})
        return self.runner.predict_noise(sample, timestep, encoder_hidden_states, residuals)

    def vae_decode(self, latent):
        return self.runner.vae_decode(latent)

    def vae_encode(self, image):
        return self.runner.vae_encode(image)

    def hold(self):
        return self.runner.hold()

    def release(self, graph):
        self.released.append(graph)
        self.runner.release(graph)


def _recording(pipe) -> tuple[RecordingRunner, ControlNetPipeline]:
    recorder = RecordingRunner(pipe.runner)
    return recorder, ControlNetPipeline(recorder, pipe.tokenizer, pipe.scheduler_config, pipe.vae_scaling_factor)


def test_runner_inputs_and_progress(pipe, image):
    recorder, recording = _recording(pipe)
    settings = GenerationSettings(prompt="a bird", n_prompt="lowres", num_samples=2, guess_mode=True, steps=3,
                                  resolution=64)  # both prompts one chunk: one batch per step
    steps = []
    result = recording(image, settings, progress=lambda done, total: steps.append((done, total)))

    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert len(recorder.unet) == len(recorder.controlnet) == 3 and len(result.images) == 2
    assert len(result.timesteps) == 3
    unet, control = recorder.unet[0], recorder.controlnet[0]
    assert unet["sample"].shape == (4, 4, 8, 8) and unet["timestep"].shape == (4,)
    assert unet["timestep"].dtype == torch.float32
    # guess mode: the ControlNet sees the conditional half only, the unconditional rows get zeros
    assert control["cond"].shape == (2, 3, 64, 64) and control["sample"].shape == (2, 4, 8, 8)
    assert torch.equal(control["sample"], unet["sample"][2:])
    assert all(torch.all(r[:2] == 0) and torch.any(r[2:] != 0) for r in unet["residuals"])
    embeds = unet["embeds"]  # [uncond, uncond, cond, cond]
    assert torch.equal(embeds[0], embeds[1]) and torch.equal(embeds[2], embeds[3])
    assert not torch.equal(embeds[0], embeds[2])
    _, edges = detect_edges(image, 64, 100, 200)
    np.testing.assert_array_equal(result.edge_map, edges)
    np.testing.assert_array_equal((control["cond"][1].permute(1, 2, 0) * 255).round().byte().numpy(), edges)
    assert set(result.timings) == {"encode_prompt", "prepare_control", "prepare_latents", "denoise", "decode"}


def test_no_controlnet_work_where_no_unit_acts(pipe, image):
    """A step outside every window, a strength-0 unit, or no unit at all: no ControlNet call, the UNet alone."""
    units = (ControlUnit(strength=0.5, start=0.0, end=0.5), ControlUnit(strength=0.0), ControlUnit(start=0.75))
    recorder, recording = _recording(pipe)
    recording(image, GenerationSettings(prompt="a bird", n_prompt="lowres", steps=4, resolution=64, units=units))
    # step 0, 1: unit 0; step 3: unit 2; step 2: nothing; the strength-0 unit never
    assert len(recorder.controlnet) == 3 and len(recorder.unet) == 4
    assert [call["residuals"] is None for call in recorder.unet] == [False, False, True, False]
    recorder, recording = _recording(pipe)
    recording(None, GenerationSettings(prompt="a bird", steps=2, units=(), width=64, height=128, scale=1.0))
    assert recorder.controlnet == [] and [c["residuals"] for c in recorder.unet] == [None, None]
    assert recorder.unet[0]["sample"].shape == (1, 4, 16, 8)  # guidance off: the conditional half alone


def test_prompts_of_different_lengths_are_predicted_apart(pipe, image, caplog):
    """A prompt over 75 tokens is two chunks, nothing cut; with a one-chunk negative prompt the halves of the
    guidance batch have different lengths, so each step makes two UNet calls (A1111 pads neither)."""
    recorder, recording = _recording(pipe)
    with caplog.at_level(logging.WARNING):
        recording(image, GenerationSettings(prompt="bird " * 30, a_prompt="", n_prompt="lowres", steps=2,
                                            resolution=64))
    assert "truncated" not in caplog.text
    assert [call["embeds"].shape[:2] for call in recorder.unet] == [(1, 77), (1, 154)] * 2
    recorder, recording = _recording(pipe)
    recording(image, GenerationSettings(prompt="bird", a_prompt="", n_prompt="lowres", steps=2, resolution=64))
    assert [call["embeds"].shape[:2] for call in recorder.unet] == [(2, 77)] * 2


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
