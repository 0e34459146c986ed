"""Several ControlNet units through both HTTP APIs, each against a reference built here, not through loramgr:

* native `controls` (diffusers' window rule and guess mode) against diffusers' pipeline with a
  `MultiControlNetModel` of the base's ControlNet and the converted one (its own diffusers folder);
* A1111 units (the extension's window rule `start <= i / S <= end`, soft weights `0.825 ** (12 - k)`
  for both non-balanced modes, the conditional half only for "ControlNet is more important")
  against a denoising loop written here from those documented rules over diffusers' modules.

Tiny base, 64 px, 4 steps; <= 2 uint8 levels.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image

from loramgr.adapter_file import load_adapter
from loramgr.serve import ServeConfig, create_app
from reference_pipelines import reference_pipeline
from serve_support import decode, served, serve_workspace

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SIZE, STEPS, SEED, SCALE = 64, 4, 6, 7.0


@pytest.fixture(scope="module")
def ws(tiny_workspace, tmp_path_factory):
    return serve_workspace(tiny_workspace, tmp_path_factory)


@pytest.fixture(scope="module")
def url(ws):
    with served(create_app(ws, ServeConfig(max_resolution=256, max_controlnets=3))) as url:
        yield url


@pytest.fixture(scope="module")
def modules(ws):
    """diffusers' own modules: the base's source folder and the converted ControlNet's source folder."""
    from diffusers import ControlNetModel

    pipe = reference_pipeline(ws.base_dir("tiny") / "source", scheduler="ddim")
    hed = ControlNetModel.from_pretrained(load_adapter(ws.adapter_path("sv_hed")).metadata["loramgr.source_path"])
    return pipe, {"canny": pipe.controlnet, "sv_hed": hed}


def maps() -> list[np.ndarray]:
    """Two full-range control maps at the output size (precomputed: the preprocessor is not under test)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    first = (127.5 + 127.5 * np.sin(x / 5.0) * np.cos(y / 9.0)).astype(np.uint8)
    second = ((x * 3 + y * 5) % 256).astype(np.uint8)
    return [np.repeat(m[:, :, None], 3, axis=2) for m in (first, second)]


def b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_native_controls_match_diffusers_multicontrolnet(url, modules):
    from diffusers import MultiControlNetModel, StableDiffusionControlNetPipeline

    pipe, controlnets = modules
    the_maps = maps()
    units = [{"name": "canny", "control_map": b64(the_maps[0]), "strength": 0.8, "start": 0.0, "end": 0.5,
              "mode": "control"},
             {"name": "sv_hed", "control_map": b64(the_maps[1]), "strength": 0.6, "start": 0.25, "end": 1.0,
              "mode": "control"}]
    r = httpx.post(f"{url}/v1/generate", json={
        "prompt": "a house", "a_prompt": "", "n_prompt": "blurry", "controls": units, "steps": STEPS, "scale": SCALE,
        "seed": SEED, "resolution": SIZE, "control_schedule": "diffusers"}, timeout=300)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["controls"] == ["canny", "sv_hed"] and len(got["control_maps"]) == 2
    assert [a["name"] for a in got["adapters"]] == ["sv_hed"]
    multi = StableDiffusionControlNetPipeline(**{**pipe.components, "controlnet": MultiControlNetModel(
        [controlnets["canny"], controlnets["sv_hed"]])})
    multi.set_progress_bar_config(disable=True)
    theirs = multi(prompt="a house", negative_prompt="blurry", image=[Image.fromarray(m) for m in the_maps],
                   num_inference_steps=STEPS, guidance_scale=SCALE, generator=torch.Generator().manual_seed(SEED),
                   height=SIZE, width=SIZE, controlnet_conditioning_scale=[0.8, 0.6], control_guidance_start=[0.0, 0.25],
                   control_guidance_end=[0.5, 1.0], guess_mode=True, output_type="np").images[0]
    diff = np.abs(decode(got["images"][0]).astype(int) - (theirs * 255).round().astype(int))
    assert diff.max() <= 2, f"max diff {diff.max()}"


def a1111_reference(pipe, controlnets, units: list[dict], the_maps: list[np.ndarray]) -> np.ndarray:
    """The A1111 ControlNet extension's rules, written out over diffusers' modules (DDIM, CFG in one batch)."""
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    cond, uncond = pipe.encode_prompt("a house", "cpu", 1, True, "blurry")
    context = torch.cat([uncond, cond])
    images = [torch.from_numpy(m[None].astype(np.float32) / 255.0).permute(0, 3, 1, 2) for m in the_maps]
    latents = randn_tensor((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(SEED))
    latents = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            sample = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            down_sum = mid_sum = None
            for unit, image in zip(units, images):
                if not unit["guidance_start"] <= i / STEPS <= unit["guidance_end"]:
                    continue
                down, mid = controlnets[unit["name"]](sample, t, encoder_hidden_states=context,
                                                      controlnet_cond=image.expand(2, -1, -1, -1),
                                                      conditioning_scale=1.0, return_dict=False)
                mode = unit["control_mode"]
                scales = [unit["weight"] * (0.825 ** (12 - k) if mode != "Balanced" else 1.0) for k in range(13)]
                rows = torch.tensor([0.0, 1.0] if mode == "ControlNet is more important" else [1.0, 1.0])
                down = [r * s * rows[:, None, None, None] for r, s in zip(down, scales)]
                mid = mid * scales[12] * rows[:, None, None, None]
                down_sum = down if down_sum is None else [a + b for a, b in zip(down_sum, down)]
                mid_sum = mid if mid_sum is None else mid_sum + mid
            extra = {} if down_sum is None else {"down_block_additional_residuals": down_sum,
                                                 "mid_block_additional_residual": mid_sum}
            noise_uncond, noise_cond = pipe.unet(sample, t, encoder_hidden_states=context, return_dict=False,
                                                 **extra)[0].chunk(2)
            latents = scheduler.step(noise_uncond + SCALE * (noise_cond - noise_uncond), t, latents,
                                     return_dict=False)[0]
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return ((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()[0] * 255).round().astype(np.uint8)


def test_a1111_units_follow_the_extensions_rules(url, modules):
    pipe, controlnets = modules
    the_maps = maps()
    units = [{"name": "canny", "weight": 0.9, "guidance_start": 0.0, "guidance_end": 0.5,
              "control_mode": "My prompt is more important"},
             {"name": "sv_hed", "weight": 0.7, "guidance_start": 0.25, "guidance_end": 1.0,
              "control_mode": "ControlNet is more important"}]
    host, port = url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    cn = [webuiapi.ControlNetUnit(image=Image.fromarray(m), module="none",
                                  model="None" if u["name"] == "canny" else "sv_hed [1234abcd]", weight=u["weight"],
                                  guidance_start=u["guidance_start"], guidance_end=u["guidance_end"],
                                  control_mode=u["control_mode"], resize_mode="Just Resize")
          for u, m in zip(units, the_maps)]
    got = api.txt2img(prompt="a house", negative_prompt="blurry", seed=SEED, sampler_name="DDIM", eta=0.0, steps=STEPS,
                      cfg_scale=SCALE, width=SIZE, height=SIZE, controlnet_units=cn)
    assert len(got.images) == 3  # the image, then each unit's map
    info = got.info["loramgr"]["controls"]
    assert [c["control_mode"] for c in info] == [u["control_mode"] for u in units]
    diff = np.abs(np.asarray(got.images[0]).astype(int) - a1111_reference(pipe, controlnets, units, the_maps))
    assert diff.max() <= 2, f"max diff {diff.max()}"
    # the window rule matters: at 4 steps A1111 keeps step 2 for [0, 0.5], diffusers' rule does not
    assert sum(0.0 <= i / STEPS <= 0.5 for i in range(STEPS)) == 3
