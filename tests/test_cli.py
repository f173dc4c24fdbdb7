"""The command line: outputs, metadata round trips, reproduce, and clear errors."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from mezzotint.cli import main

PROMPT = "a red circle to the left of a blue square"


def run_cli(*args, cwd=None):
    env = dict(os.environ, MEZZOTINT_NO_PROGRESS="0")
    return subprocess.run([sys.executable, "-m", "mezzotint", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_generate_then_reproduce_real_process(tiny_model, tmp_path):
    out = tmp_path / "out"
    r = run_cli("generate", PROMPT, "--model", tiny_model, "--steps", 3, "--seed", 42,
                "--negative-prompt", "green, blurry", "--output", out, "--batch", 2)
    assert r.returncode == 0, r.stderr
    paths = r.stdout.split()
    assert [os.path.basename(p) for p in paths] == ["0000.png", "0001.png"]
    assert "generating" in r.stderr  # the progress bar
    rec = json.loads(Image.open(paths[1]).text["mezzotint"])
    assert rec["request"]["seed"] == 43 and rec["request"]["negative_prompt"] == "green, blurry"
    r = run_cli("reproduce", paths[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("match")


def test_a1111_parameters_read_by_sd_parsers(tiny_model, tmp_path):
    from sd_parsers import ParserManager
    out = tmp_path / "img.png"
    assert main(["generate", PROMPT, "--model", str(tiny_model), "--steps", "3", "--seed", "9",
                 "--cfg", "6.5", "--sampler", "euler_a", "--negative-prompt", "blurry, text",
                 "--guidance-rescale", "0.7", "--output", str(out)]) == 0
    info = ParserManager().parse(str(out))
    assert info.generator.name == "AUTOMATIC1111"
    [sampler] = info.samplers
    assert sampler.name == "Euler a"
    assert sampler.parameters["cfg_scale"] == "6.5" and sampler.parameters["seed"] == "9"
    assert sampler.parameters["steps"] == "3"
    assert [p.value for p in sampler.prompts] == [PROMPT]
    assert [p.value for p in sampler.negative_prompts] == ["blurry, text"]
    assert sampler.model.name == "tiny" and len(sampler.model.hash) == 10
    assert info.metadata["Size"] == "64x64"
    assert info.metadata["CFG Rescale phi"] == "0.7"


def test_same_inputs_give_byte_identical_pngs(tiny_model, tmp_path):
    for name in ("a.png", "b.png"):
        assert main(["generate", PROMPT, "--model", str(tiny_model), "--steps", "3", "--seed", "5",
                     "--sampler", "ddpm", "--output", str(tmp_path / name)]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_prompt_file_writes_numbered_images_in_order(tiny_model, tmp_path, capsys):
    prompts = ["a red circle", "a blue square", "two green stars"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    out = tmp_path / "set"
    assert main(["generate", "--prompt-file", str(tmp_path / "p.txt"), "--model", str(tiny_model),
                 "--steps", "2", "--seed", "10", "--batch", "2", "--output", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0000.png", "0001.png", "0002.png"]
    for i, p in enumerate(prompts):
        rec = json.loads(Image.open(out / f"{i:04d}.png").text["mezzotint"])
        assert rec["request"]["prompt"] == p and rec["request"]["seed"] == 10 + i
    assert capsys.readouterr().out.split() == [str(out / n) for n in names]


def test_folder_output_does_not_overwrite(tiny_model, tmp_path):
    for _ in range(2):
        assert main(["generate", PROMPT, "--model", str(tiny_model), "--steps", "1",
                     "--output", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000.png", "0001.png"]


def test_samplers_lists_all(capsys):
    assert main(["samplers"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m"]


@pytest.mark.parametrize("args,message", [
    (["--sampler", "plms"], "unknown sampler 'plms'; allowed: ddpm"),
    (["--width", "30"], "width must be a positive multiple of 4"),
    (["--height", "0"], "height must be a positive multiple of 4"),
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--guidance-rescale", "1.5"], "guidance rescale must be in [0, 1], got 1.5"),
])
def test_bad_arguments_fail_cleanly(tiny_model, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    assert main(["generate", PROMPT, "--model", str(tiny_model), "--output", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mezzotint: error: ") and message in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "abc"])
def test_non_finite_cfg_is_rejected_by_the_parser(tiny_model, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["generate", PROMPT, "--model", str(tiny_model), "--cfg", value, "--output", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "--cfg" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_and_corrupt_models(tmp_path, tiny_model, capsys):
    out = tmp_path / "never"
    assert main(["generate", PROMPT, "--model", str(tmp_path / "nope"), "--output", str(out)]) == 2
    assert "model not found" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert main(["generate", PROMPT, "--model", str(bad), "--output", str(out)]) == 2
    assert "corrupt safetensors file" in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_output(tiny_model, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    # root may write anywhere but not into a read-only mount such as /sys
    target = locked / "o" if os.geteuid() != 0 else __import__("pathlib").Path("/sys/mezzotint-test/o")
    try:
        assert main(["generate", PROMPT, "--model", str(tiny_model), "--output", str(target)]) == 2
        assert "output not writable" in capsys.readouterr().err
        assert list(locked.iterdir()) == [] and not target.parent.exists()
    finally:
        locked.chmod(0o700)


def test_output_is_a_file_not_a_folder(tiny_model, tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    assert main(["generate", PROMPT, "--model", str(tiny_model), "--output", str(f)]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert f.read_text() == "keep me"


def test_reproduce_reports_a_changed_image(tiny_model, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", PROMPT, "--model", str(tiny_model), "--steps", "2", "--output", str(out)]) == 0
    im = Image.open(out)
    px = im.load()
    px[0, 0] = tuple((c + 40) % 256 for c in px[0, 0])
    info = __import__("PIL.PngImagePlugin", fromlist=["PngInfo"]).PngInfo()
    for k, v in im.text.items():
        info.add_text(k, v)
    im.save(out, pnginfo=info)
    capsys.readouterr()
    assert main(["reproduce", str(out)]) == 1
    assert capsys.readouterr().out.startswith("differs: 1 of 4096 pixels")


def test_reproduce_needs_our_metadata(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert main(["reproduce", str(tmp_path / "plain.png")]) == 2
    assert "no mezzotint record" in capsys.readouterr().err
