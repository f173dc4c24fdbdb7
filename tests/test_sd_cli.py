"""Stable Diffusion models and LoRAs through the command line: generate, convert, --lora, <lora:...>."""
import numpy as np
import pytest
from PIL import Image

from mezzotint.cli import main
from mezzotint.metadata import read_record
from mezzotint.sd import load_sd
from test_sd_common import saved
from test_sd_lora import handmade, kohya_file

FAST = ["--steps", "2", "--width", "32", "--height", "32", "--seed", "1"]


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture(scope="module")
def sd1():
    return saved("sd1")


@pytest.fixture(scope="module")
def lora(sd1, tmp_path_factory):
    unet, _, text, _ = load_sd(sd1[0])
    root = tmp_path_factory.mktemp("loras")
    kohya_file(root / "ink.safetensors", handmade(unet, text.model, seed=3), alpha=3)
    return root / "ink.safetensors"


def test_generate_from_single_file_and_diffusers_folder_and_converted(sd1, tmp_path):
    folder, single = sd1
    for name, model in (("single", single), ("folder", folder)):
        assert main(["generate", "a red circle", "--model", str(model), *FAST,
                     "--output", str(tmp_path / f"{name}.png")]) == 0
    assert np.abs(pixels(tmp_path / "single.png") - pixels(tmp_path / "folder.png")).max() <= 1
    assert main(["convert", str(single), "--to", "mezzotint", "--output", str(tmp_path / "ours")]) == 0
    assert main(["generate", "a red circle", "--model", str(tmp_path / "ours"), *FAST,
                 "--output", str(tmp_path / "ours.png")]) == 0
    assert np.abs(pixels(tmp_path / "single.png") - pixels(tmp_path / "ours.png")).max() <= 1
    assert read_record(tmp_path / "folder.png")["model"]["sha256"]  # a diffusers folder hashes too


def test_convert_refuses_to_overwrite(sd1, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    assert main(["convert", str(sd1[1]), "--to", "diffusers", "--output", str(tmp_path / "taken")]) == 2
    assert (tmp_path / "taken" / "x").read_text() == "keep me"
    assert main(["convert", str(tmp_path / "nothing.safetensors"), "--output", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


def test_lora_flag_and_prompt_tag_agree(sd1, lora, tmp_path):
    single = str(sd1[1])
    assert main(["generate", "a red circle", "--model", single, *FAST, "--output", str(tmp_path / "plain.png")]) == 0
    assert main(["generate", "a red circle", "--model", single, *FAST, "--lora", f"{lora}:0.8",
                 "--output", str(tmp_path / "flag.png")]) == 0
    assert main(["generate", "a red circle <lora:ink:0.8>", "--model", single, *FAST, "--lora-dir",
                 str(lora.parent), "--output", str(tmp_path / "tag.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "flag.png"), pixels(tmp_path / "tag.png"))
    assert not np.array_equal(pixels(tmp_path / "flag.png"), pixels(tmp_path / "plain.png"))
    rec = read_record(tmp_path / "tag.png")
    assert rec["loras"][0]["weight"] == 0.8 and rec["request"]["prompt"] == "a red circle <lora:ink:0.8>"
    assert "Lora hashes: \"ink: " in Image.open(tmp_path / "tag.png").text["parameters"]


@pytest.mark.parametrize("extra,message", [
    (["--lora", "missing.safetensors"], "--lora file not found"),
    (["--prompt-tag"], "no --lora-dir is given"),
    (["--lora-dir", "{dir}", "--prompt-tag-unknown"], "unknown"),
])
def test_lora_errors(sd1, lora, tmp_path, capsys, extra, message):
    prompt = "a red circle"
    if "--prompt-tag" in extra:
        prompt, extra = "a red circle <lora:ink>", []
    elif "--prompt-tag-unknown" in extra:
        prompt, extra = "a red circle <lora:unknown>", ["--lora-dir", str(lora.parent)]
    assert main(["generate", prompt, "--model", str(sd1[1]), *FAST, *extra, "--output", str(tmp_path / "o")]) == 2
    assert message.lower() in capsys.readouterr().err.lower()
    assert not (tmp_path / "o").exists()
