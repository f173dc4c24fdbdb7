"""The A1111-compatible routes, driven by the real `webuiapi` client, unmodified."""
import json
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image
from serve_helpers import live_server, tiny_models  # noqa: F401

webuiapi = pytest.importorskip("webuiapi")
SMALL = {"width": 32, "height": 32, "steps": 3}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A second model that clients can switch to."""
    import torch

    from mezzotint.checkpoints import save_model
    from mezzotint.config import PRESETS
    from mezzotint.unet import UNet
    from mezzotint.vae import AutoencoderKL
    cfg = PRESETS["tiny"]
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("models")
    save_model(folder / "other", UNet(cfg.unet), AutoencoderKL(cfg.vae), cfg)
    (folder / "notes.txt").write_text("not a model")
    return folder


@pytest.fixture(scope="module")
def server(tiny_models, models_dir):  # noqa: F811
    tiny_models.models_dir = models_dir
    try:
        with live_server(tiny_models, max_width=256, max_height=256, max_steps=1000) as url:
            yield url
    finally:
        tiny_models.models_dir = None


@pytest.fixture
def api(server):
    host, port = server.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port))


def test_txt2img_batches_seeds_and_info(api):
    r = api.txt2img(prompt="a red circle", negative_prompt="blue", seed=5, batch_size=2, n_iter=2,
                    sampler_name="Euler a", cfg_scale=3, **SMALL)
    assert len(r.images) == 4 and all(im.size == (32, 32) for im in r.images)
    info = r.info
    assert info["all_seeds"] == [5, 6, 7, 8] and info["seed"] == 5 and info["sampler_name"] == "Euler a"
    assert info["all_prompts"] == ["a red circle"] * 4 and info["negative_prompt"] == "blue"
    assert info["mezzotint_ignored"] == {}  # webuiapi's defaults are all things we do
    for k, im in enumerate(r.images):
        assert im.info["parameters"] == info["infotexts"][k]
        assert f"Seed: {5 + k}" in im.info["parameters"] and "Sampler: Euler a" in im.info["parameters"]
        assert json.loads(im.info["mezzotint"])["request"]["sampler"] == "euler_a"
    assert r.parameters["prompt"] == "a red circle" and r.parameters["batch_size"] == 2
    again = api.txt2img(prompt="a red circle", seed=-1, **SMALL)
    seed = again.info["seed"]
    assert seed >= 0 and f"Seed: {seed}" in again.image.info["parameters"]


def test_fields_we_cannot_honour_are_reported(api, server):
    r = api.txt2img(prompt="x", enable_hr=True, restore_faces=True, styles=["noir"], scheduler="exponential",
                    override_settings={"CLIP_stop_at_last_layers": 2}, **SMALL)
    assert set(r.info["mezzotint_ignored"]) == {"enable_hr", "restore_faces", "styles", "scheduler",
                                                "override_settings"}
    raw = requests.post(server + "/sdapi/v1/txt2img", json={"prompt": "x", "tiling": True, "made_up_field": 1,
                                                            **SMALL})
    assert raw.status_code == 200 and raw.headers["X-Mezzotint-Ignored"] == "tiling"
    karras = api.txt2img(prompt="x", sampler_name="DPM++ 2M", scheduler="karras", **SMALL)
    assert "Schedule type: Karras" in karras.image.info["parameters"] and not karras.info["mezzotint_ignored"]


def test_img2img_and_inpainting_with_a_mask(api):
    src = api.txt2img(prompt="a red circle", seed=1, **SMALL).image
    r = api.img2img(images=[src], prompt="a blue square", denoising_strength=0.5, seed=2, **SMALL)
    assert len(r.images) == 1 and "Denoising strength: 0.5" in r.image.info["parameters"]
    assert r.parameters["init_images"] is None and r.info["denoising_strength"] == 0.5
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    r = api.img2img(images=[src], mask_image=mask, prompt="a blue square", mask_blur=0, inpainting_fill=1,
                    inpaint_full_res=False, denoising_strength=1.0, seed=3, batch_size=2, **SMALL)
    assert len(r.images) == 2 and r.info["mezzotint_ignored"] == {}
    original = np.asarray(src.convert("RGB"))
    for im in r.images:
        out = np.asarray(im.convert("RGB"))
        assert (out[:, 16:] == original[:, 16:]).all() and (out[:, :16] != original[:, :16]).any()
        assert json.loads(im.info["mezzotint"])["edit"]["mode"] == "inpaint"
    # webuiapi's defaults (inpaint_full_res=True) are reported, and the fill mode is honoured
    r = api.img2img(images=[src], mask_image=mask, prompt="x", inpainting_fill=0, inpainting_mask_invert=1,
                    mask_blur=0, **SMALL)
    assert r.info["mezzotint_ignored"] == {"inpaint_full_res": True}
    out = np.asarray(r.image.convert("RGB"))
    assert (out[:, :16] == original[:, :16]).all()  # inverted mask: the left half is kept


def test_samplers_schedulers_and_listings(api):
    names = api.util_get_sampler_names()
    assert {"DPM++ 2M", "Euler a", "Euler", "Heun", "DDIM"} <= set(names)
    euler_a = next(s for s in api.get_samplers() if s["name"] == "Euler a")
    assert "k_euler_a" in euler_a["aliases"] and isinstance(euler_a["options"], dict)
    assert {"automatic", "karras"} <= set(api.util_get_scheduler_names())
    for alias in ("k_dpmpp_2m", "DPM++ 2M Karras", "dpmpp_2m"):
        assert api.txt2img(prompt="x", sampler_name=alias, **SMALL).info["sampler_name"] == "DPM++ 2M"
    with pytest.raises(RuntimeError, match="unknown sampler"):
        api.txt2img(prompt="x", sampler_name="LMS", **SMALL)
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert api.get_upscalers()[0]["name"] == "None"
    for empty in (api.get_loras, api.get_prompt_styles, api.get_sd_vae, api.get_hypernetworks,
                  api.get_face_restorers):
        assert empty() == []
    assert api.get_cmd_flags()["api"] is True and "loaded" in api.get_embeddings()
    api.refresh_checkpoints()


def test_switching_models_through_options(api, server):
    models = {m["model_name"]: m for m in api.get_sd_models()}
    assert set(models) == {"tiny", "other"}  # notes.txt is not a model
    first = api.util_get_current_model()
    assert first == models["tiny"]["title"] and api.get_options()["sd_checkpoint_hash"] == models["tiny"]["sha256"]
    api.util_set_model(models["other"]["title"])
    assert api.util_get_current_model() == models["other"]["title"]
    r = api.txt2img(prompt="x", seed=4, **SMALL)
    assert r.info["sd_model_name"] == "other" and f"Model hash: {models['other']['hash']}" in r.image.info[
        "parameters"]
    bad = requests.post(server + "/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    assert bad.status_code == 400 and "not found" in bad.json()["detail"]
    api.set_options({"sd_model_checkpoint": "tiny", "samples_save": False})
    assert api.util_get_current_model() == first and api.get_options()["samples_save"] is False


def test_png_info_round_trip(api):
    image = api.txt2img(prompt="a green star, small", negative_prompt="red", seed=9, **SMALL).image
    r = api.png_info(image)
    assert r.info == image.info["parameters"]
    p = r.json["parameters"]
    assert p["Prompt"] == "a green star, small" and p["Negative prompt"] == "red"
    assert (p["Seed"], p["Steps"], p["Size-1"], p["Size-2"]) == ("9", "3", "32", "32")
    assert json.loads(r.json["items"]["mezzotint"])["request"]["seed"] == 9


def test_progress_and_interrupt(api):
    out = {}
    t = threading.Thread(target=lambda: out.update(r=api.txt2img(prompt="x", width=64, height=64, steps=1000)))
    t.start()
    deadline = time.time() + 60
    while True:
        p = api.get_progress()
        if p["progress"] > 0 and p["current_image"]:
            break
        assert time.time() < deadline and t.is_alive()
        time.sleep(0.05)
    assert p["state"]["sampling_steps"] == 1000 and p["state"]["job_count"] == 1 and p["eta_relative"] > 0
    assert api.interrupt() == {}
    t.join(60)
    assert out["r"].info["interrupted"] is True and out["r"].images == []
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_basic_auth_with_the_token(tiny_models):  # noqa: F811
    with live_server(tiny_models, token="s3cret") as url:
        host, port = url.removeprefix("http://").split(":")
        with pytest.raises(RuntimeError, match="401"):
            webuiapi.WebUIApi(host=host, port=int(port)).txt2img(prompt="x", **SMALL)
        api = webuiapi.WebUIApi(host=host, port=int(port), username="me", password="s3cret")
        assert len(api.txt2img(prompt="x", **SMALL).images) == 1
