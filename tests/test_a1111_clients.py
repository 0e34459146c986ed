"""Published A1111 clients, used as their own docs show, against loramgr serve (docs/a1111.md, tested clients).

sd-backend-client 0.5.0, aaa1111 0.1.0.dev7 and webuiapi 0.9.17 from the package index, with
their defaults, through txt2img, img2img, a ControlNet unit, the preprocessor preview, the
lists they read at start-up and keyed access (the server wants A1111's HTTP Basic credentials
or a bearer key); plus Open WebUI's A1111 requests, replayed as its
backend/open_webui/routers/images.py sends them. The server is the real app under uvicorn on
a loopback port (tiny base); the reference for every image is the native API of the same
server, for every control map OpenCV's resize + Canny called here.

Generation sizes and steps are cut to 64 px and 2-3 steps (the clients' README values, 512 px
and 20-30 steps, take minutes on a CPU); every other setting is the client's.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import warnings
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

pytest.importorskip("sd_backend_client", reason="sd-backend-client (the test extra) needs Python 3.11")
from sd_backend_client import (ControlNetModel, ControlNetUnit, DiffusionParams, PreprocessorParams,  # noqa: E402
                               connect_to_backend)
from sd_backend_client.api.webui.response_formats import GenerationInfoData  # noqa: E402

from loramgr.serve import ServeConfig, create_app  # noqa: E402
from serve_support import decode, free_port, png_b64, serve_workspace, served, start_server  # noqa: E402

with warnings.catch_warnings():  # beartype's notes on aaa1111's typing.List hints, at import
    warnings.simplefilter("ignore", DeprecationWarning)
    from aaa1111 import AAA1111
    from aaa1111.types import IMG2IMG, TXT2IMG, Script
    from aaa1111.types.extension import ControlNet, ControlNetArgs

USER, PASSWORD, KEY = "artist", "pa:ss w0rd", "the-bearer-key"
CONFIG = ServeConfig(max_resolution=256, max_steps=50, max_num_samples=4, max_image_bytes=256 * 1024,
                     max_queue=8, api_key=KEY, api_auth=f"someone:else,{USER}:{PASSWORD}")
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

# A1111's Processed.js() keys (modules/processing.py, 1.10) with the types clients validate.
A1111_INFO = {"prompt": str, "all_prompts": list, "negative_prompt": str, "all_negative_prompts": list, "seed": int,
              "all_seeds": list, "subseed": int, "all_subseeds": list, "subseed_strength": float, "width": int,
              "height": int, "sampler_name": str, "cfg_scale": float, "steps": int, "batch_size": int,
              "restore_faces": bool, "face_restoration_model": type(None), "sd_model_name": str,
              "sd_model_hash": str, "sd_vae_name": type(None), "sd_vae_hash": type(None), "seed_resize_from_w": int,
              "seed_resize_from_h": int, "denoising_strength": (float, type(None)), "extra_generation_params": dict,
              "index_of_first_image": int, "infotexts": list, "styles": list, "job_timestamp": str, "clip_skip": int,
              "is_using_inpainting_conditioning": bool, "version": str}


@pytest.fixture(scope="module")
def ws(tiny_workspace, tmp_path_factory):
    return serve_workspace(tiny_workspace, tmp_path_factory)


@pytest.fixture(scope="module")
def house(ws) -> Image.Image:
    return Image.open(ws.home / "house.png").convert("RGB")


@pytest.fixture(scope="module")
def url(ws):
    """The app wanting credentials (CONFIG), under uvicorn on a loopback port."""
    with served(create_app(ws, CONFIG)) as url:
        yield url


def native(url, **fields) -> dict:
    """The native API's answer for the same generation (the reference for every image here).

    ``strength=0.0`` stands for an A1111 request without a unit: no ControlNet at all
    (``controls: []``), 64 px without an image unless a width and height are given.
    """
    if fields.get("scheduler") in ("euler", "euler_a", "lms", "heun"):  # A1111's Automatic for them: uniform
        fields.setdefault("schedule", "uniform")
    if fields.get("strength") == 0.0 and "controls" not in fields:
        del fields["strength"]
        fields["controls"] = []
        if "image" not in fields:
            fields.setdefault("width", 64)
            fields.setdefault("height", 64)
    r = httpx.post(f"{url}/v1/generate", json={"a_prompt": "", "n_prompt": "", "scale": 7.0, "resolution": 64,
                                               **fields}, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def canny(image: Image.Image, res: int, low: int, high: int) -> np.ndarray:
    """ControlNet's canny annotator written out with OpenCV (no loramgr code): the short side scaled to
    ``res``, both sides rounded to multiples of 64, LANCZOS4 when k > 1 else AREA, then Canny."""
    array = rgb(image)
    h, w = array.shape[:2]
    k = res / min(h, w)
    size = (int(np.round(w * k / 64)) * 64, int(np.round(h * k / 64)) * 64)
    return cv2.Canny(cv2.resize(array, size, interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA), low, high)


def check_info(info: dict, **expected) -> None:
    """Every key of A1111's info with A1111's type, then the given values."""
    for key, kind in A1111_INFO.items():
        assert isinstance(info[key], kind) and not (kind is int and isinstance(info[key], bool)), (key, info[key])
    GenerationInfoData.model_validate(info)  # sd-backend-client's own check of the reply
    for key, value in expected.items():
        assert info[key] == value, (key, info[key], value)


# -- sd-backend-client 0.5.0: its README, step by step -----------------------------------------------

@pytest.fixture(scope="module")
def backend(url):
    asked = []
    backend = connect_to_backend(url, credentials_provider=lambda: asked.append(1) or (USER, PASSWORD))
    assert type(backend).__name__ == "A1111Webservice" and asked == [1]  # found by its probe, after one 401
    return backend


def test_sd_backend_client_quick_start_and_progress(backend, url):
    params = DiffusionParams(prompt="a corgi astronaut, detailed", steps=3, width=64, height=64, seed=42,
                             scheduler="automatic")
    result = backend.submit_txt2img(params).wait(timeout=300)
    ref = native(url, prompt="a corgi astronaut, detailed", seed=42, steps=3, scheduler="euler_a", strength=0.0)
    assert result.seeds == [42] and result.control_maps == []
    assert np.array_equal(rgb(result.images[0]), decode(ref["images"][0]))
    info = result.raw_info  # the client validated it (GenerationInfoData)
    assert (info.sampler_name, info.seed, info.width, info.sd_model_name) == ("Euler a", 42, 64, "tiny")

    seen = []
    handle = backend.submit_txt2img(DiffusionParams(prompt="a lighthouse at dusk", batch_size=2, steps=2, width=64,
                                                    height=64, scheduler="automatic"))
    result = handle.wait(on_progress=seen.append)
    assert len(result.images) == 2 and result.seeds[1] == result.seeds[0] + 1
    assert seen[-1].status.value == "finished"


def test_sd_backend_client_defaults(backend):
    """The client's default scheduler is A1111's `normal`: accepted (issue 23 item 1)."""
    result = backend.submit_txt2img(DiffusionParams(prompt="a teapot", steps=2, width=64, height=64)).wait(timeout=300)
    assert len(result.images) == 1 and result.images[0].size == (64, 64)


def test_sd_backend_client_controlnet_and_preview(backend, url, ws, house):
    canny_type = backend.get_controlnet_type_categories()["Canny"]
    preprocessor_name = next(name for name in canny_type["module_list"] if name.lower() != "none")
    model_name = next(name for name in canny_type["model_list"] if name.lower() != "none")
    preprocessor = next(p for p in backend.get_controlnet_preprocessors() if p.name == preprocessor_name)
    assert (preprocessor_name, model_name) == ("canny", "canny")
    unit = ControlNetUnit(image=house, preprocessor=PreprocessorParams(typedef=preprocessor, parameter_values={}),
                          model=ControlNetModel(model_name), control_strength=0.8)
    params = DiffusionParams(prompt="a robot with the same outline", controlnet_units=[unit], steps=3, width=64,
                             height=64, seed=7, scheduler="automatic")
    result = backend.submit_txt2img(params).wait(timeout=300)
    # pixel perfect (the client's default): canny with the 96 px house's short side at 64, thresholds 100 / 200
    ref = native(url, prompt="a robot with the same outline", seed=7, steps=3, scheduler="euler_a",
                 image=png_b64(ws.home / "house.png"), strength=0.8, low_threshold=100, high_threshold=200)
    assert np.array_equal(rgb(result.images[0]), decode(ref["images"][0]))
    assert np.array_equal(rgb(result.control_maps[0])[..., 0], canny(house, 64, 100, 200))

    preview = backend.submit_preprocessor_preview(house, PreprocessorParams(
        typedef=preprocessor, parameter_values={"processor_res": 128, "threshold_a": 50})).wait(timeout=120)
    assert np.array_equal(rgb(preview.images[0])[..., 0], canny(house, 128, 50, 200))
    plain = backend.submit_preprocessor_preview(house, preprocessor).wait(timeout=120)  # the server's defaults
    assert np.array_equal(rgb(plain.images[0])[..., 0], canny(house, 512, 100, 200))


def test_sd_backend_client_img2img(backend, url, ws, house):
    params = DiffusionParams(prompt="a red house", init_images=[house], denoising_strength=0.6, steps=3, width=64,
                             height=64, seed=3, scheduler="automatic")
    result = backend.submit_img2img(params).wait(timeout=300)
    ref = native(url, prompt="a red house", seed=3, steps=3, scheduler="euler_a", image=png_b64(ws.home / "house.png"),
                 img2img_strength=0.6, strength=0.0)
    assert np.array_equal(rgb(result.images[0]), decode(ref["images"][0]))
    assert result.raw_info.denoising_strength == 0.6


def test_sd_backend_client_discovery(backend):
    assert [c.name for c in backend.list_checkpoints()] == ["tiny"]
    assert "euler_ancestral" in {s.name for s in backend.list_samplers()}
    capabilities = backend.get_capabilities()
    assert capabilities.controlnet and capabilities.scheduler and not capabilities.interrogate
    assert {"sv_a", "sv_b"} <= {lora.name for lora in backend.list_loras()}
    assert [m.full_model_name for m in backend.list_controlnet_models()][:1] == ["canny"]
    assert backend.list_vaes() == [] and backend.list_upscalers() == [] and backend.list_hypernetworks() == []
    assert backend.get_styles() == [] and backend.get_latent_upscale_modes() == []
    assert {s.name for s in backend.get_script_info()} == {"controlnet"}
    assert backend.get_soft_inpainting_parameters() == []
    assert backend.get_controlnet_settings() == {"control_net_unit_count": 3}
    for refresh in (backend.refresh_loras, backend.refresh_checkpoints, backend.refresh_vae):
        assert refresh().status_code == 200
    assert backend.progress_check().state.job_count == 0


# -- aaa1111 0.1.0.dev7: its README, with the images it sends as lossless WebP ----------------------------

@pytest.fixture(scope="module")
def aaa(url):
    host, port = url.removeprefix("http://").split(":")
    return AAA1111(host=host, port=int(port), username=USER, password=PASSWORD)


README_PARAMS = dict(prompt="masterpiece, best quality, 1girl",
                     negative_prompt="(worst quality, low quality:1.1), text, title, logo, signature",
                     sampler_name="DPM++ 2M Karras", batch_size=2, n_iter=1, cfg_scale=7.5, width=64, height=128,
                     steps=2, override_settings={"CLIP_stop_at_last_layers": 2})


def test_aaa1111_readme(aaa, url, tmp_path):
    resp = aaa.txt2img(TXT2IMG(**README_PARAMS))
    assert len(resp.images) == 2 and resp.images[0].size == (64, 128)
    info = resp.info
    check_info(info, sampler_name="DPM++ 2M", scheduler="karras", batch_size=2, cfg_scale=7.5, steps=2)
    assert info["clip_skip"] == 2  # override_settings.CLIP_stop_at_last_layers
    ref = native(url, prompt=README_PARAMS["prompt"], n_prompt=README_PARAMS["negative_prompt"], seed=info["seed"] + 1,
                 steps=2, scale=7.5, scheduler="dpm++_karras", strength=0.0, width=64, height=128, clip_skip=2)
    assert np.array_equal(rgb(resp.images[1]), decode(ref["images"][0]))
    assert resp.parameters["sampler_name"] == "DPM++ 2M Karras" and resp.parameters["steps"] == 2
    assert resp.parameters["hr_scale"] == 2.0 and resp.parameters["subseed"] == -1  # A1111's defaults, unsent

    (tmp_path / "txt1.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in README_PARAMS.items()))
    from_file = aaa.txt2img(str(tmp_path / "txt1.yaml"), seed=info["seed"])
    assert np.array_equal(rgb(from_file.images[1]), rgb(resp.images[1]))
    async def in_a_loop():  # the client's async side, closed in the loop that used it
        try:
            return await aaa.atxt2img(str(tmp_path / "txt1.yaml"), seed=info["seed"])
        finally:
            await aaa.aclient.aclose()

    from_async = asyncio.run(in_a_loop())
    assert np.array_equal(rgb(from_async.images[0]), rgb(resp.images[0]))

    # the README's script is the "Simple wildcards" extension: absent here, so a 422 as A1111 without it answers
    r = httpx.post(f"{url}/sdapi/v1/txt2img", headers={"Authorization": BASIC},
                   json={**README_PARAMS, "alwayson_scripts": Script("Simple wildcards").asdict()})
    assert r.status_code == 422 and r.json()["field"] == "alwayson_scripts.Simple wildcards"


def test_aaa1111_img2img_and_controlnet_send_webp(aaa, url, ws, house):
    resp = aaa.img2img(IMG2IMG(init_images=[house], prompt="a house", denoising_strength=0.6, seed=3, steps=3,
                               width=64, height=64, sampler_name="Euler"))
    ref = native(url, prompt="a house", seed=3, steps=3, scheduler="euler", image=png_b64(ws.home / "house.png"),
                 img2img_strength=0.6, strength=0.0)
    assert np.array_equal(rgb(resp.images[0]), decode(ref["images"][0]))
    assert resp.parameters["init_images"] is None and resp.parameters["resize_mode"] == 0

    unit = ControlNet(ControlNetArgs(image=house, module="canny", model="sv_hed", weight=0.7, processor_res=64,
                                     resize_mode=0))
    resp = aaa.txt2img(TXT2IMG(prompt="a house", seed=5, steps=3, width=64, height=64, sampler_name="Euler a",
                               alwayson_scripts=[unit]))
    ref = native(url, prompt="a house", seed=5, steps=3, scheduler="euler_a", image=png_b64(ws.home / "house.png"),
                 control="sv_hed", strength=0.7)
    assert np.array_equal(rgb(resp.images[0]), decode(ref["images"][0]))
    assert np.array_equal(rgb(resp.images[1])[..., 0], canny(house, 64, 100, 200))


def test_aaa1111_lists_and_actions(aaa):
    assert [m.title.split(" [")[0] for m in aaa.sd_models()] == ["tiny"]
    assert aaa.sd_vae() == [] and aaa.hypernetworks() == [] and aaa.face_restorers() == []
    assert aaa.realesrgan_models() == [] and aaa.prompt_styles() == [] and aaa.latent_upscale_modes() == []
    assert [u.name for u in aaa.upscalers()] == ["None"]
    assert "Euler a" in {s.name for s in aaa.samplers()}
    assert {"sv_a", "sv_b"} <= {lora.name for lora in aaa.loras()}
    embeddings = aaa.embeddings()
    assert embeddings.loaded == {} and embeddings.skipped == {}  # no embedding adapters in this workspace
    memory = aaa.memory()
    assert memory.ram["used"] > 0 and memory.ram["total"] >= memory.ram["used"] and "error" in memory.cuda
    assert aaa.scripts().txt2img == ["controlnet", "controlnet m2m"]
    assert [(s.name, s.is_img2img) for s in aaa.script_info()] == [("controlnet", False), ("controlnet", True)]
    flags = aaa.cmd_flags()
    assert flags["api"] and not flags["listen"] and flags["api_auth"] == "(set)" and PASSWORD not in json.dumps(flags)
    assert aaa.progress().state["job_count"] == 0
    assert aaa.get_options()["sd_model_checkpoint"].startswith("tiny [")
    aaa.set_options(CLIP_stop_at_last_layers=1)
    aaa.refresh_loras(), aaa.refresh_checkpoints(), aaa.interrupt()


# -- webuiapi 0.9.17 -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(url):
    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), username=USER, password=PASSWORD)


def test_webuiapi_defaults_img2img_controlnet(api, url, ws, house):
    """webuiapi's defaults: Euler a, scheduler automatic (its own), its ControlNetUnit's settings."""
    assert api.has_controlnet  # from the scripts list, as with the extension: see the call without a unit
    unit = webuiapi.ControlNetUnit(image=house, module="canny", model="canny", processor_res=64)
    got = api.txt2img(prompt="a cat", seed=9, steps=3, width=64, height=64, controlnet_units=[unit])
    ref = native(url, prompt="a cat", seed=9, steps=3, scheduler="euler_a", image=png_b64(ws.home / "house.png"),
                 low_threshold=64, high_threshold=64)  # webuiapi's unit thresholds
    assert np.array_equal(rgb(got.image), decode(ref["images"][0]))
    got = api.txt2img(prompt="a cat", seed=9, steps=3, width=64, height=64)  # the unit above is not sent again
    ref = native(url, prompt="a cat", seed=9, steps=3, scheduler="euler_a", strength=0.0)
    assert np.array_equal(rgb(got.image), decode(ref["images"][0]))
    check_info(got.info, sampler_name="Euler a", seed=9)
    got = api.img2img(images=[house], prompt="a cat", seed=9, steps=3, width=64, height=64)
    ref = native(url, prompt="a cat", seed=9, steps=3, scheduler="euler_a", image=png_b64(ws.home / "house.png"),
                 img2img_strength=0.75, strength=0.0)  # webuiapi's denoising_strength default
    assert np.array_equal(rgb(got.image), decode(ref["images"][0]))


def test_webuiapi_lists_and_detect(api, house):
    assert api.get_sd_vae() == [] and api.get_hypernetworks() == [] and api.get_face_restorers() == []
    assert api.get_realesrgan_models() == [] and api.get_prompt_styles() == []
    assert api.get_latent_upscale_modes() == [] and api.get_upscalers()[0]["name"] == "None"
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert set(api.get_memory()) == {"ram", "cuda"} and api.get_cmd_flags()["nowebui"]
    assert api.custom_get("controlnet/settings") == {"control_net_unit_count": 3}
    detected = api.controlnet_detect([house], module="canny", processor_res=96, threshold_a=80, threshold_b=160)
    assert np.array_equal(rgb(detected.image)[..., 0], canny(house, 96, 80, 160))
    odd = house.resize((188, 190))  # 188 * (96 / 188) is a hair under 96: the annotator rounds it to 64, not 128
    detected = api.controlnet_detect([odd], module="canny", processor_res=96, threshold_a=80, threshold_b=160)
    assert np.array_equal(rgb(detected.image)[..., 0], canny(odd, 96, 80, 160))
    none = api.controlnet_detect([house], module="none")
    assert np.array_equal(rgb(none.image), rgb(house))


# -- Open WebUI's requests (backend/open_webui/routers/images.py, engine automatic1111) -------------------

def open_webui_generate(base_url: str, api_auth: str | None, *, prompt: str, size: str, steps: int, n: int,
                        model: str | None = None, negative_prompt: str | None = None) -> list[tuple[bytes, str]]:
    """``image_generations`` for engine "automatic1111": its requests, headers and reading of the reply."""
    authorization = "" if api_auth is None else "Basic " + base64.b64encode(api_auth.encode()).decode()
    headers = {"authorization": authorization}
    with httpx.Client(timeout=120) as session:
        options = session.get(f"{base_url}/sdapi/v1/options", headers=headers)
        options.raise_for_status()
        options = options.json()
        if model and model != options["sd_model_checkpoint"]:  # set_image_model
            options["sd_model_checkpoint"] = model
            session.post(f"{base_url}/sdapi/v1/options", json=options, headers=headers).raise_for_status()
        width, height = map(int, size.split("x"))
        data = {"prompt": prompt, "batch_size": n, "width": width, "height": height, "steps": steps}
        if negative_prompt is not None:
            data["negative_prompt"] = negative_prompt
        res = session.post(f"{base_url}/sdapi/v1/txt2img", json=data, headers=headers).json()
    out = []
    for image in res["images"]:  # get_image_data: no comma, so image/png
        out.append((base64.b64decode(image), res["info"]))
    return out


def test_open_webui_with_api_auth(url):
    models = httpx.get(f"{url}/sdapi/v1/sd-models", headers={"authorization": BASIC}).json()
    model = [{"id": m["title"], "name": m["model_name"]} for m in models][0]["id"]  # get_models
    images = open_webui_generate(url, f"{USER}:{PASSWORD}", prompt="a fox", size="64x64", steps=2, n=2,
                                 model=model, negative_prompt="blurry")
    assert len(images) == 2 and Image.open(io.BytesIO(images[0][0])).size == (64, 64)
    info = json.loads(images[0][1])
    ref = native(url, prompt="a fox", n_prompt="blurry", seed=info["all_seeds"][1], steps=2, scheduler="euler",
                 strength=0.0)  # A1111's default sampler: Euler
    assert np.array_equal(rgb(Image.open(io.BytesIO(images[1][0]))), decode(ref["images"][0]))
    with pytest.raises(httpx.HTTPStatusError) as exc:
        open_webui_generate(url, f"{USER}:wrong", prompt="a fox", size="64x64", steps=2, n=1)
    assert exc.value.response.status_code == 401
    with pytest.raises(httpx.HTTPStatusError):
        open_webui_generate(url, None, prompt="a fox", size="64x64", steps=2, n=1)  # its empty header


# -- keyed access ----------------------------------------------------------------------------------------

def test_credentials_and_key(url):
    def status(path: str, authorization: str | None, method: str = "get") -> httpx.Response:
        headers = {} if authorization is None else {"Authorization": authorization}
        return httpx.request(method.upper(), f"{url}{path}", headers=headers, timeout=30)

    def basic(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    for path in ("/sdapi/v1/options", "/sdapi/v1/sd-vae", "/controlnet/model_list", "/v1/adapters", "/readyz",
                 "/sdapi/v1/no-such-route"):
        for bad in (None, "", basic(USER, "pa:ss"), basic(USER.upper(), PASSWORD), basic("someone", PASSWORD),
                    "Bearer wrong", f"Basic {KEY}", "Basic !!!", BASIC.replace("Basic", "Bearer")):
            r = status(path, bad)
            assert r.status_code == 401, (path, bad)
            assert r.headers["WWW-Authenticate"] == 'Bearer, Basic realm="loramgr"'
            assert r.json()["field"] == "authorization" and PASSWORD not in r.text and KEY not in r.text
    assert status("/sdapi/v1/options", BASIC).status_code == 200
    assert status("/sdapi/v1/options", basic("someone", "else")).status_code == 200  # the other user
    assert status("/sdapi/v1/options", f"Bearer {KEY}").status_code == 200
    assert status("/sdapi/v1/options", f"basic {BASIC.split()[1]}").status_code == 200  # the scheme is caseless
    assert status("/healthz", None).status_code == 200


def test_secrets_from_files_and_environment(ws, tmp_path):
    """The key from --api-key-file, the credentials from $LORAMGR_API_AUTH: not in argv, not in the log."""
    key_file = tmp_path / "key"
    key_file.write_text("file-key-123\n")
    port = free_port()
    proc = start_server(ws, port, "--api-key-file", str(key_file), "--log-level", "debug",
                        env={"LORAMGR_API_AUTH": "envuser:env-pass-456"},
                        headers={"Authorization": "Bearer file-key-123"})
    try:
        base = f"http://127.0.0.1:{port}"
        env_basic = "Basic " + base64.b64encode(b"envuser:env-pass-456").decode()
        assert httpx.get(f"{base}/sdapi/v1/options", headers={"Authorization": env_basic}).status_code == 200
        assert httpx.get(f"{base}/sdapi/v1/options", headers={"Authorization": "Bearer file-key-123"}).status_code \
            == 200
        assert httpx.get(f"{base}/sdapi/v1/options", headers={"Authorization": "Bearer wrong"}).status_code == 401
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert "--api-key-file" in cmdline and "file-key-123" not in cmdline and "env-pass-456" not in cmdline
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=120)
    assert "file-key-123" not in output and "env-pass-456" not in output and "Traceback" not in output


def test_credentials_alone_silence_the_exposed_address_warning(ws, capsys, monkeypatch):
    from loramgr.serve import server

    monkeypatch.setattr(server.DrainingServer, "run", lambda self: None)
    server.serve(ws, ServeConfig(host="0.0.0.0", api_auth="u:p"))
    assert "without an API key" not in capsys.readouterr().err
    server.serve(ws, ServeConfig(host="0.0.0.0"))
    assert "--api-auth" in capsys.readouterr().err


def test_bad_credential_options_are_one_line(ws, tmp_path, capsys):
    from loramgr.cli import main

    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = [(["--api-auth", "no-colon-here"], "--api-auth: entry 1 is not USER:PASS", "no-colon-here"),
             (["--api-auth", "a:b,:nouser"], "--api-auth: entry 2 is not USER:PASS", "nouser"),
             (["--api-key", "k1", "--api-key-file", str(empty)], "--api-key and --api-key-file", "k1"),
             (["--api-auth-file", str(empty)], f"{empty}: --api-auth-file is empty", None),
             (["--api-auth-file", str(tmp_path / "missing")], "cannot read --api-auth-file", None)]
    for args, message, secret in cases:
        assert main(["--home", str(ws.home), "serve", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert secret is None or secret not in err


# -- images in A1111's formats ---------------------------------------------------------------------------

def _encoded(array: np.ndarray, fmt: str, **save) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save)
    return base64.b64encode(buffer.getvalue()).decode()


def test_image_formats_give_the_same_generation(url, ws, house):
    """init_images as lossless WebP, BMP, GIF, with and without a data URL: the PNG's image, pixel for pixel."""
    array = rgb(house)
    quantized = rgb(Image.fromarray(array).quantize(64).convert("RGB"))  # a GIF holds a palette
    first_frame = _gif([quantized, 255 - quantized])
    runs = {"webp": "data:image/webp;base64," + _encoded(array, "WEBP", lossless=True), "bmp": _encoded(array, "BMP"),
            "gif": first_frame, "png": "data:image/png;base64," + _encoded(quantized, "PNG"),
            "second-frame": _encoded(255 - quantized, "PNG")}
    outputs = {}
    for name, data in runs.items():
        r = httpx.post(f"{url}/sdapi/v1/img2img", headers={"Authorization": BASIC}, timeout=120,
                       json={"prompt": "a house", "init_images": [data], "seed": 4, "steps": 2, "width": 64,
                             "height": 64, "denoising_strength": 0.5})
        assert r.status_code == 200, (name, r.text)
        outputs[name] = decode(r.json()["images"][0])
    ref = native(url, prompt="a house", seed=4, steps=2, scheduler="euler", image=_encoded(array, "PNG"),
                 img2img_strength=0.5, strength=0.0)
    assert np.array_equal(outputs["webp"], decode(ref["images"][0]))
    assert np.array_equal(outputs["bmp"], outputs["webp"]) and np.array_equal(outputs["gif"], outputs["png"])
    assert not np.array_equal(outputs["gif"], outputs["second-frame"])  # the GIF's first frame was used


def _gif(frames: list[np.ndarray]) -> str:
    buffer = io.BytesIO()
    images = [Image.fromarray(f) for f in frames]
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:])
    return base64.b64encode(buffer.getvalue()).decode()


def test_decode_image_rules():
    """EXIF orientation (A1111 turns the image), GIF's first frame, limits checked on the header."""
    import zlib

    from loramgr.serve.catalog import CatalogError
    from loramgr.serve.codec import decode_image

    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", lossless=True, exif=exif)
    turned = base64.b64encode(buffer.getvalue()).decode()
    assert np.array_equal(decode_image(turned, "f", 1 << 20, 1 << 20, exif_orientation=True), np.rot90(array, -1))
    assert np.array_equal(decode_image(turned, "f", 1 << 20, 1 << 20), array)
    assert np.array_equal(decode_image(_gif([array[:, :, :1].repeat(3, 2), 255 - array]), "f", 1 << 20, 1 << 20),
                          array[:, :, :1].repeat(3, 2))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    def huge(side: int) -> str:  # a PNG whose header says side x side and that holds no pixel data
        header = chunk(b"IHDR", side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0]))
        return base64.b64encode(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b"")).decode()

    for side, words in ((5000, "5000x5000 pixels exceeds the limit of 16,777,216"), (30000, "decompression bomb")):
        with pytest.raises(CatalogError) as exc:  # refused on the header: decoding would fail (422), not this
            decode_image(huge(side), "init_images.0", 1 << 20, 4096 * 4096)
        assert exc.value.status == 413 and words in exc.value.reason, exc.value.reason
    with pytest.raises(CatalogError) as exc:
        decode_image(_encoded(array, "TIFF"), "mask", 1 << 20, 1 << 20)
    assert exc.value.status == 422 and exc.value.field == "mask" and "WebP" in exc.value.reason


def test_parameters_and_info_as_a1111(url):
    r = httpx.post(f"{url}/sdapi/v1/txt2img", headers={"Authorization": BASIC}, timeout=120,
                   json={"prompt": "a <lora:sv_a:0.5> house", "negative_prompt": "", "seed": 11, "steps": 2,
                         "width": 64, "height": 64, "styles": ["not here"], "restore_faces": True})
    assert r.status_code == 200, r.text
    parameters, info = r.json()["parameters"], json.loads(r.json()["info"])
    assert parameters["prompt"] == "a <lora:sv_a:0.5> house" and parameters["styles"] == ["not here"]
    assert parameters["sampler_index"] == "Euler" and parameters["enable_hr"] is False and parameters["n_iter"] == 1
    check_info(info, styles=["not here"], restore_faces=False, seed=11, all_seeds=[11], denoising_strength=None,
               sd_model_name="tiny", sampler_name="Euler")
    assert len(info["job_timestamp"]) == 14 and info["job_timestamp"].isdigit()
    assert info["extra_generation_params"]["Lora hashes"].startswith("sv_a: ")
    text = info["infotexts"][0]
    assert text.startswith("a <lora:sv_a:0.5> house\nSteps: 2, Sampler: Euler, Schedule type: Uniform, CFG scale: 7.0"
                           ", Seed: 11, Size: 64x64, Model hash: ") and '"sv_a: ' in text
    assert {"restore_faces", "styles"} <= set(info["loramgr"]["ignored_fields"])


def test_embeddings_are_the_workspace_embedding_adapters(tiny_workspace, tmp_path):
    """/sdapi/v1/embeddings from adapters of kind `embedding` (converted from an A1111 file), in aaa1111's types;
    one of another text width (written directly: convert refuses it) is skipped."""
    import numpy as np
    import torch
    from aaa1111.types.info import EmbeddingItem

    from format_writers import a1111_embedding
    from loramgr.adapter_file import save_adapter
    from loramgr.convert import convert_adapter
    from loramgr.manifest import Manifest
    from loramgr.serve.a1111_api import list_embeddings
    from loramgr.serve.catalog import AdapterCatalog
    from loramgr.workspace import Workspace

    (tmp_path / "base_models").mkdir()
    os.symlink(tiny_workspace.base_dir("tiny"), tmp_path / "base_models" / "tiny")
    ws = Workspace.resolve(tmp_path)
    manifest = Manifest.load(ws.base_dir("tiny"))
    source = a1111_embedding(tmp_path / "easyneg.pt", torch.randn(2, 32), step=500, checkpoint="abcd1234",
                             checkpoint_name=None)
    convert_adapter(ws, source, base="tiny")
    save_adapter(ws.adapter_path("for_sdxl"), "embedding", {}, [], {"for_sdxl": np.zeros((4, 1280), np.float32)})
    listed = list_embeddings(AdapterCatalog(ws, manifest))
    assert listed == {"loaded": {"easyneg": {"step": 500, "sd_checkpoint": "abcd1234", "sd_checkpoint_name": None,
                                             "shape": 32, "vectors": 2}},
                      "skipped": {"for_sdxl": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                               "shape": 1280, "vectors": 4}}}
    for items in listed.values():
        for item in items.values():
            EmbeddingItem(**item)  # aaa1111's (beartype-checked) types
