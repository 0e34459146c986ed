"""The A1111 web-UI API driven by a published client (webuiapi) against a real server on a loopback port.

Tiny base, 64 px, 3-4 steps. The server is uvicorn in a thread over the real app. The
independent reference is diffusers' pipeline built here (reference_pipelines.py), with the
sampler mapped to its diffusers scheduler by hand: txt2img with a unit and LoRA tags, img2img
without a unit (plain SD img2img, no ControlNet), the Karras schedule. Other tests check the
translation against the native API of the same server (a consistency check).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image

from loramgr.pipeline.canny import detect_edges
from loramgr.samples import sample_image
from loramgr.serve import ServeConfig, create_app
from loramgr.serve.a1111 import fit, parse_lora_tags
from loramgr.serve.catalog import CatalogError
from reference_pipelines import (
    assert_close_images, diffusers_images, documented, reference_process_preprocessing, reference_scheduler,
)
from serve_support import decode, png_b64, reference_for, serve_workspace, served

CONFIG = ServeConfig(max_resolution=256, max_steps=400, max_num_samples=4, max_image_bytes=256 * 1024,
                     max_queue=8)
FAST = {"steps": 3, "width": 64, "height": 64, "cfg_scale": 7.0}


@pytest.fixture(scope="module")
def ws(tiny_workspace, tmp_path_factory):
    return serve_workspace(tiny_workspace, tmp_path_factory)


@pytest.fixture(scope="module")
def url(ws):
    with served(create_app(ws, CONFIG)) as url:
        yield url


@pytest.fixture(scope="module")
def api(url):
    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port))


@pytest.fixture(scope="module")
def house(ws) -> Image.Image:
    return Image.open(ws.home / "house.png").convert("RGB")


@pytest.fixture(scope="module")
def reference(ws, tiny_folder):
    """diffusers' ControlNet pipeline of the tiny base (canny ControlNet, no LoRA)."""
    return reference_for(ws, tiny_folder)


def a1111_settings(**fields):
    """An A1111 request's settings for the reference: no added prompt, no default negative prompt."""
    return documented(**{"a_prompt": "", "n_prompt": "", "resolution": 64, **fields})


def native(url, **fields) -> dict:
    r = httpx.post(f"{url}/v1/generate", json={"a_prompt": "", **fields}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


# -- same images as the native API ---------------------------------------------------------------

UNITS = [
    pytest.param({"model": "None"}, {"control": "canny", "strength": 1.0}, id="base-controlnet"),
    pytest.param({"model": "sv_hed [0123abcd]", "weight": 0.7, "control_mode": 2},
                 {"control": "sv_hed", "strength": 0.7, "guess_mode": True}, id="converted-controlnet-guess-mode"),
]


@pytest.mark.parametrize("unit, expected", UNITS)
def test_txt2img_with_unit_and_lora_tags_equals_native(api, url, ws, house, unit, expected):
    cn = webuiapi.ControlNetUnit(image=house, module="canny", processor_res=64, threshold_a=90, threshold_b=180,
                                 resize_mode="Just Resize", **{"model": "None", **unit})
    got = api.txt2img(prompt="a house <lora:sv_a:0.8> <lora:sv_b>", negative_prompt="lowres", seed=5,
                      sampler_name="Euler a", controlnet_units=[cn], **FAST)
    ref = native(url, prompt="a house", n_prompt="lowres", image=png_b64(ws.home / "house.png"), seed=5,
                 loras=[{"name": "sv_a", "weight": 0.8}, {"name": "sv_b"}], steps=3, scale=7.0, scheduler="euler_a",
                 schedule="uniform", resolution=64, low_threshold=90, high_threshold=180, **expected)
    assert len(got.images) == 2  # the image, then the control map
    assert np.array_equal(pixels(got.images[0]), decode(ref["images"][0]))
    assert np.array_equal(pixels(got.images[1]), decode(ref["control_map"]))
    info = got.info
    assert info["seed"] == 5 and info["all_seeds"] == [5] and info["sampler_name"] == "Euler a"
    assert info["prompt"] == "a house <lora:sv_a:0.8> <lora:sv_b>" and (info["width"], info["height"]) == (64, 64)
    assert [(a["name"], a["weight"]) for a in info["loramgr"]["adapters"]] == \
        [(a["name"], a["weight"]) for a in ref["adapters"]]
    assert all(len(a["sha256"]) == 64 for a in info["loramgr"]["adapters"])
    assert "styles" in info["loramgr"]["ignored_fields"] and "eta" not in info["loramgr"]["ignored_fields"]
    assert "denoise" in info["loramgr"]["timings"][0]


def test_img2img_without_unit_is_plain_sd(api, reference, ws):
    """No unit: diffusers' plain StableDiffusionImg2ImgPipeline (no ControlNet) on the same base gives the image."""
    from diffusers import StableDiffusionImg2ImgPipeline

    init = Image.fromarray(sample_image(64))  # at the output size: no resize mode involved
    got = api.img2img(images=[init], prompt="a red house", denoising_strength=0.6, seed=3, sampler_name="DDIM",
                      eta=0.5, alwayson_scripts={}, **{**FAST, "steps": 4})  # webuiapi's default dict keeps the
    # ControlNet unit an earlier img2img call put into it (a mutable default): passed empty, no unit is sent
    assert len(got.images) == 1  # no unit: no control map
    assert got.info["denoising_strength"] == 0.6 and got.parameters["init_images"] is None
    parts = {k: v for k, v in reference.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet")}
    plain = StableDiffusionImg2ImgPipeline(**parts, scheduler=reference_scheduler("ddim", reference.scheduler.config),
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    expected = plain(prompt="a red house", negative_prompt="", image=init, strength=0.6, num_inference_steps=4,
                     guidance_scale=7.0, eta=0.5, generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert_close_images([pixels(got.image)], np.asarray(expected)[None])


def test_img2img_unit_without_image_uses_the_init_image(api, url, ws, house):
    cn = webuiapi.ControlNetUnit(module="canny", processor_res=64, threshold_a=100, threshold_b=200)
    got = api.img2img(images=[house], prompt="a house", denoising_strength=0.75, seed=4, sampler_name="Euler",
                      controlnet_units=[cn], **{**FAST, "steps": 4})
    ref = native(url, prompt="a house", n_prompt="", image=png_b64(ws.home / "house.png"), seed=4, steps=4,
                 scale=7.0, scheduler="euler", schedule="uniform", resolution=64, img2img_strength=0.75)
    assert np.array_equal(pixels(got.images[0]), decode(ref["images"][0]))
    assert np.array_equal(pixels(got.images[1]), decode(ref["control_map"]))


def test_batch_has_a1111_seeds(api, house):
    cn = webuiapi.ControlNetUnit(image=house, module="canny", processor_res=64)
    got = api.txt2img(prompt="a house", seed=-1, batch_size=2, n_iter=2, controlnet_units=[cn], **FAST)
    seeds = got.info["all_seeds"]
    assert len(got.images) == 5 and seeds == [seeds[0] + i for i in range(4)] and got.info["seed"] == seeds[0]
    assert len({got.images[i].tobytes() for i in range(4)}) == 4
    third = api.txt2img(prompt="a house", seed=seeds[2], controlnet_units=[cn], **FAST)
    assert np.array_equal(pixels(third.image), pixels(got.images[2]))  # each image is its own seed's


def test_precomputed_map_with_module_none(api, url, ws, house):
    edges = native(url, prompt="x", image=png_b64(ws.home / "house.png"), steps=1, resolution=64)["control_map"]
    edge_image = Image.open(io.BytesIO(base64.b64decode(edges)))
    cn = webuiapi.ControlNetUnit(image=edge_image, module="none")
    got = api.txt2img(prompt="a house", seed=8, sampler_name="UniPC", controlnet_units=[cn], **FAST)
    ref = native(url, prompt="a house", n_prompt="", control_map=edges, seed=8, steps=3, scale=7.0,
                 scheduler="unipc", schedule="uniform", resolution=64)
    assert np.array_equal(pixels(got.image), decode(ref["images"][0]))
    assert np.array_equal(pixels(got.images[1]), decode(edges))


def test_non_square_output_with_crop_and_pixel_perfect(api, house):
    cn = webuiapi.ControlNetUnit(image=house, module="canny", resize_mode="Crop and Resize", pixel_perfect=True)
    got = api.txt2img(prompt="a house", seed=1, controlnet_units=[cn], **{**FAST, "width": 128, "height": 64})
    assert got.image.size == (128, 64) and got.images[1].size == (128, 64)
    # pixel perfect: canny at 96 * max(128 / 96, 64 / 96) = 128 (webuiapi's thresholds 64 / 64), centre rows kept
    expected = detect_edges(pixels(house), 128, 64, 64)[1][32:96]
    assert np.array_equal(pixels(got.images[1]), expected)


def test_schedule_types(api, url, ws, house):
    """A1111 1.9+: DPM++ 2M's Automatic is Karras, the old "DPM++ 2M Karras" names both; any schedule type
    A1111 has is accepted (sd-backend-client sends "normal"), approximations named in the warnings."""
    cn = webuiapi.ControlNetUnit(image=house, module="canny", processor_res=64)
    karras = api.txt2img(prompt="a house", seed=2, sampler_name="DPM++ 2M", scheduler="karras",
                         controlnet_units=[cn], **FAST)
    named = api.txt2img(prompt="a house", seed=2, sampler_name="DPM++ 2M Karras", controlnet_units=[cn], **FAST)
    plain = api.txt2img(prompt="a house", seed=2, sampler_name="DPM++ 2M", controlnet_units=[cn], **FAST)
    exponential = api.txt2img(prompt="a house", seed=2, sampler_name="DPM++ 2M", scheduler="Exponential",
                              controlnet_units=[cn], **FAST)
    assert np.array_equal(pixels(karras.image), pixels(named.image))
    assert np.array_equal(pixels(karras.image), pixels(plain.image))
    assert not np.array_equal(pixels(karras.image), pixels(exponential.image))
    assert (named.info["sampler_name"], named.info["scheduler"]) == ("DPM++ 2M", "karras")
    assert "Schedule type: Karras" in named.info["infotexts"][0]
    ref = native(url, prompt="a house", n_prompt="", image=png_b64(ws.home / "house.png"), seed=2, steps=3,
                 scale=7.0, scheduler="dpm++", schedule="karras", resolution=64)
    assert np.array_equal(pixels(karras.image), decode(ref["images"][0]))
    for schedule, warning in (("normal", None), ("sgm_uniform", "approximated"), ("kl_optimal", "instead")):
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a house", "sampler_name": "Euler",
                                                        "scheduler": schedule, **FAST}, timeout=60)
        assert r.status_code == 200, r.text
        warnings = json.loads(r.json()["info"])["loramgr"]["warnings"]
        assert (warning is None and warnings == []) or any(warning in w for w in warnings), warnings


@pytest.mark.parametrize("sampler_name, schedule, scheduler", [
    ("DPM++ 2M", "karras", "dpm++_karras"),
    ("DPM++ 2M Karras", None, "dpm++_karras"),
    ("DPM++ 2M", None, "dpm++_karras"),  # A1111 1.9+: DPM++ 2M's Automatic schedule is Karras
])
def test_dpm_samplers_and_the_karras_schedule_match_diffusers(api, reference, house, sampler_name, schedule,
                                                             scheduler):
    """Each spelling against diffusers' DPMSolverMultistepScheduler, built by hand (with or without Karras sigmas)."""
    cn = webuiapi.ControlNetUnit(image=house, module="canny", processor_res=64, threshold_a=100, threshold_b=200,
                                 resize_mode="Just Resize")
    got = api.txt2img(prompt="a house", seed=2, sampler_name=sampler_name, controlnet_units=[cn], **FAST,
                      **({"scheduler": schedule} if schedule else {}))
    settings = a1111_settings(prompt="a house", seed=2, steps=3, scale=7.0, scheduler=scheduler)
    assert_close_images([pixels(got.image)], diffusers_images(reference, pixels(house), settings))
    assert (got.info["sampler_name"], got.info["scheduler"]) == ("DPM++ 2M", "karras")


def test_txt2img_with_a_converted_controlnet_and_lora_tags_matches_diffusers(api, ws, tiny_folder, house):
    """LoRA tags (one at its default weight), a converted ControlNet at weight 0.7, Euler a: diffusers with the files."""
    cn = webuiapi.ControlNetUnit(image=house, module="canny", model="sv_hed [0123abcd]", weight=0.7, processor_res=64,
                                 threshold_a=90, threshold_b=180, resize_mode="Just Resize")
    got = api.txt2img(prompt="a house <lora:sv_a:0.8> <lora:sv_b>", negative_prompt="lowres", seed=5,
                      sampler_name="Euler a", controlnet_units=[cn], **FAST)
    reference = reference_for(ws, tiny_folder, [("sv_a", 0.8), ("sv_b", 1.0)], "sv_hed")
    settings = a1111_settings(prompt="a house", n_prompt="lowres", seed=5, steps=3, scale=7.0, scheduler="euler_a",
                              schedule="uniform",  # A1111's Automatic for Euler a: uniform
                              strength=0.7, low_threshold=90, high_threshold=180)
    assert_close_images([pixels(got.images[0])], diffusers_images(reference, pixels(house), settings))
    np.testing.assert_array_equal(pixels(got.images[1]), reference_process_preprocessing(pixels(house), 64, 90, 180)[1])


# -- lists and options ------------------------------------------------------------------------------

def test_lists(api):
    loras = {lora["name"] for lora in api.get_loras()}  # test_serve may have uploaded more to this workspace
    assert {"sv_a", "sv_b"} <= loras and "sv_hed" not in loras
    assert all(len(lora["metadata"]["sha256"]) == 64 for lora in api.get_loras())
    titles = api.util_get_model_names()
    assert len(titles) == 1 and titles[0].startswith("tiny [")
    assert {"Euler a", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DDIM", "PLMS", "UniPC", "LCM"} \
        <= set(api.util_get_sampler_names())
    samplers = {s["name"]: s for s in api.get_samplers()}
    assert samplers["DPM++ 2M"]["options"]["scheduler"] == "karras" and "k_euler_a" in samplers["Euler a"]["aliases"]
    assert [s["name"] for s in api.get_schedulers()] == [
        "automatic", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "kl_optimal",
        "align_your_steps", "simple", "normal", "ddim", "beta"]
    assert {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False} \
        in api.get_schedulers()
    controlnets = api.controlnet_model_list()
    assert controlnets[0] == "canny" and "sv_hed" in controlnets and not loras & set(controlnets)
    assert api.controlnet_module_list() == ["none", "canny", "inpaint", "inpaint_global_harmonious", "inpaint_only"]
    assert api.controlnet_version() == 2
    assert api.get_scripts()["txt2img"] == ["controlnet", "controlnet m2m"]
    assert api.get_options()["sd_model_checkpoint"] == titles[0]
    assert api.set_options({"sd_model_checkpoint": titles[0], "CLIP_stop_at_last_layers": 2}) == \
        {"ignored": ["CLIP_stop_at_last_layers"]}
    assert api.util_get_current_model() == titles[0]


# -- progress and interrupt ------------------------------------------------------------------------

def test_progress_and_interrupt(api, url, house):
    cn = webuiapi.ControlNetUnit(image=house, module="canny", processor_res=128)
    outcome = {}

    def long_run():
        try:
            api.txt2img(prompt="a house", seed=1, controlnet_units=[cn], **{**FAST, "steps": 400, "width": 128,
                                                                             "height": 128})
        except RuntimeError as exc:
            outcome["error"] = exc.args

    thread = threading.Thread(target=long_run)
    thread.start()
    deadline = time.monotonic() + 120
    state = api.get_progress()
    while state["state"]["sampling_step"] < 2:
        assert time.monotonic() < deadline and thread.is_alive(), "the generation did not start"
        time.sleep(0.05)
        state = api.get_progress()
    assert state["state"]["sampling_steps"] == 400 and 0 < state["progress"] < 1 and state["eta_relative"] > 0
    assert api.interrupt() == {"interrupted": True}
    thread.join(120)
    status, text = outcome["error"]
    assert status == 409 and "interrupted" in json.loads(text)["error"]
    assert api.get_progress()["progress"] == 0.0 and api.interrupt() == {"interrupted": False}
    again = api.txt2img(prompt="a house", seed=1, controlnet_units=[cn], **FAST)  # the server goes on
    assert len(again.images) == 2


# -- bad input: 4xx naming the field, the server goes on -----------------------------------------------

def _unit(**fields) -> dict:
    return {"alwayson_scripts": {"controlnet": {"args": [{"image": "IMAGE", "module": "canny", **fields}]}}}


BAD = [
    pytest.param({"sampler_name": "Warp 9"}, "sampler_name", "DPM++ 2M", id="unknown-sampler"),
    pytest.param({"sampler_name": "Restart"}, "sampler_name", "no diffusers equivalent", id="refused-sampler"),
    pytest.param({"scheduler": "warp"}, "scheduler", "automatic", id="unknown-schedule"),
    pytest.param({"prompt": "x <lora:nope:0.5>"}, "prompt", "'nope'", id="unknown-lora"),
    pytest.param({"prompt": "x <lora:sv_a:heavy>"}, "prompt", "'heavy' is not a number", id="text-weight"),
    pytest.param({"prompt": "x <lora:sv_hed:1>"}, "prompt", "controlnet", id="controlnet-as-lora"),
    pytest.param({"width": 100}, "width", "multiple of 64", id="width-not-64"),
    pytest.param({"batch_size": 5}, "batch_size", "limit", id="batch-over-limit"),
    pytest.param({"steps": 0}, "steps", "steps", id="zero-steps"),
    pytest.param({"alwayson_scripts": {"ADetailer": {"args": [True]}}}, "alwayson_scripts.ADetailer",
                 "not available", id="unknown-script"),
    pytest.param({"alwayson_scripts": {"ControlNet": {"args": {"image": "x"}}}}, "alwayson_scripts.ControlNet.args",
                 "list", id="args-not-a-list"),
    pytest.param({"alwayson_scripts": {"ControlNet": {"args": ["canny"]}}}, "alwayson_scripts.ControlNet.args.0",
                 "object", id="unit-not-an-object"),
    pytest.param(_unit(weight="strong"), "alwayson_scripts.controlnet.args.0.weight", "number", id="text-unit-weight"),
    pytest.param({"alwayson_scripts": {"ControlNet": {"args": [{"image": "IMAGE"}] * 4}}},
                 "alwayson_scripts.ControlNet.args.3", "more than 3", id="units-over-the-limit"),
    pytest.param(_unit(image="bm90IGFuIGltYWdl"), "alwayson_scripts.controlnet.args.0.image", "PNG, JPEG, WebP",
                 id="undecodable-unit-image"),
    pytest.param(_unit(image=""), "alwayson_scripts.controlnet.args.0.image", "required", id="no-unit-image"),
    pytest.param(_unit(module="depth_midas"), "alwayson_scripts.controlnet.args.0.module", "canny",
                 id="unknown-module"),
    pytest.param(_unit(guidance_start=0.8, guidance_end=0.5), "alwayson_scripts.controlnet.args.0.guidance_start",
                 "must not exceed", id="guidance-range"),
    pytest.param(_unit(control_mode=7), "alwayson_scripts.controlnet.args.0.control_mode", "0, 1 or 2",
                 id="bad-control-mode"),
    pytest.param(_unit(threshold_a=300), "alwayson_scripts.controlnet.args.0.threshold_a", "[1, 255]",
                 id="threshold"),
    pytest.param(_unit(model="nope"), "alwayson_scripts.controlnet.args.0.model", "'nope'", id="unknown-model"),
    pytest.param(_unit(model="sv_a"), "alwayson_scripts.controlnet.args.0.model", "not a ControlNet",
                 id="lora-as-model"),
]


@pytest.mark.parametrize("fields, field, reason", BAD)
def test_bad_txt2img_is_a_4xx_naming_the_field(url, ws, fields, field, reason):
    image = png_b64(ws.home / "house.png")
    payload = json.loads(json.dumps({"prompt": "a house", **FAST, **fields}).replace('"IMAGE"', json.dumps(image)))
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json=payload, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["field"] == field and reason in r.json()["error"], r.json()
    assert httpx.get(f"{url}/sdapi/v1/progress").status_code == 200


def test_bad_img2img(url, ws):
    for fields, field in (({"init_images": ["!!"]}, "init_images.0"), ({"init_images": []}, "init_images"),
                          ({"mask": "!!"}, "mask"),
                          ({"denoising_strength": 0}, "denoising_strength"),
                          ({"sd_model_checkpoint": "x", "resize_mode": 9}, "resize_mode")):
        payload = {"prompt": "a house", "init_images": [png_b64(ws.home / "house.png")], **FAST, **fields}
        r = httpx.post(f"{url}/sdapi/v1/img2img", json=payload, timeout=60)
        assert r.status_code == 422 and r.json()["field"] == field, r.text
    r = httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "sd15 [abc]"})
    assert r.status_code == 422 and r.json()["field"] == "sd_model_checkpoint"


def test_unknown_fields_and_override_settings_are_listed(url, ws):
    payload = {"prompt": "a house", **FAST, "hr_checkpoint_name": "x", "my_own_field": [1, 2],
               "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_vae": "x"},
               "negative_prompt": "ugly <lora:sv_a:1>"}
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["clip_skip"] == 2
    extra = json.loads(r.json()["info"])["loramgr"]
    assert {"hr_checkpoint_name", "my_own_field"} <= set(extra["ignored_fields"]) and extra["adapters"] == []
    assert any("override_settings ignored: sd_vae" in w for w in extra["warnings"])
    assert any("negative_prompt" in w for w in extra["warnings"])
    assert r.json()["parameters"]["my_own_field"] == [1, 2]


# -- the translation in isolation --------------------------------------------------------------------

def test_parse_lora_tags():
    assert parse_lora_tags("a <lora:x:0.5> b <lyco:y> <lora:z:-1>") == ("a  b  ", [("x", 0.5), ("y", None),
                                                                                 ("z", -1.0)])
    for bad in ("<lora::1>", "<lora:x:1:2>", "<lora:x:nan>", "<lora:x:one>"):
        with pytest.raises(CatalogError) as exc:
            parse_lora_tags(bad)
        assert exc.value.field == "prompt" and bad in exc.value.reason


def test_fit_modes():
    image = np.arange(4 * 8 * 3, dtype=np.uint8).reshape(4, 8, 3)  # 8 wide, 4 high
    assert fit(image, 4, 4, "resize").shape == (4, 4, 3)
    cropped = fit(image, 4, 4, "crop")  # scale 1, centre 4 columns
    assert np.array_equal(cropped, image[:, 2:6])
    filled = fit(image, 16, 16, "fill")  # scale 2 -> 16x8, 4 rows of padding above and below
    assert filled.shape == (16, 16, 3)
    assert np.array_equal(filled[0], filled[4]) and np.array_equal(filled[15], filled[11])  # edge rows repeated
    edges = np.zeros((8, 8, 3), np.uint8)
    edges[::3] = 255
    assert set(np.unique(fit(edges, 20, 20, "resize"))) <= {0, 255}  # a canny map stays binary


def test_detect_holds_the_servers_pixel_limit():
    """/controlnet/detect makes its maps under --max-image-pixels, as the generation routes do (not the default)."""
    from loramgr.serve.a1111_api import DetectRequest, detect

    buffer = io.BytesIO()
    Image.fromarray(sample_image(300)).save(buffer, format="PNG")  # 90,000 pixels: within both limits below
    square = base64.b64encode(buffer.getvalue()).decode()
    request = DetectRequest(controlnet_module="inpaint", controlnet_input_images=[square])  # a 512x512 map
    assert decode(detect(request, ServeConfig())["images"][0]).shape == (512, 512, 3)  # the default limit
    with pytest.raises(CatalogError) as refused:
        detect(request, ServeConfig(max_image_pixels=200_000))
    assert 400 <= refused.value.status < 500 and refused.value.field == "controlnet_image", refused.value
    assert "200,000" in refused.value.reason
