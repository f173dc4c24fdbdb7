"""Training: tiny runs end to end, exact resume, resume after SIGKILL, DDP with 2 processes."""
import json
import platform
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mezzotint.checkpoints import load_model, load_vae, save_vae
from mezzotint.cli import main
from mezzotint.config import PRESETS
from mezzotint.vae import AutoencoderKL

FAST = ["--size", "32", "--batch", "2", "--log-every", "1", "--sample-every", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    torch.manual_seed(0)
    return save_vae(tmp_path_factory.mktemp("vae") / "vae", AutoencoderKL(PRESETS["tiny"].vae), PRESETS["tiny"].vae)


def unet_cmd(run, vae, steps, *extra):
    return ["train", "--run-dir", str(run), "--preset", "tiny", "--vae", str(vae), "--steps", str(steps),
            "--ckpt-every", "2", *FAST, *extra]


def weights(folder):
    return load_file(folder / "unet.safetensors")


def test_train_vae_end_to_end(tmp_path, capsys):
    run = tmp_path / "vae"
    assert main(["train-vae", "--run-dir", str(run), "--preset", "tiny", "--steps", "3", "--ckpt-every", "2",
                 "--sample-every", "3", *FAST[:-4], "--threads", "1"]) == 0
    vae = load_vae(run / "model")
    assert vae.cfg.scaling_factor != 1.0  # measured from the data at export
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-00000002", "step-00000003"]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] > 0 for r in log)
    assert Image.open(run / "samples" / "step-00000003.png").size == (32 * 8, 64)


def test_resume_continues_exactly(tmp_path, tiny_vae):
    assert main(unet_cmd(tmp_path / "a", tiny_vae, 4)) == 0
    assert main(unet_cmd(tmp_path / "b", tiny_vae, 4, "--stop-after", "2")) == 0
    assert not (tmp_path / "b" / "model").exists()
    assert main(unet_cmd(tmp_path / "b", tiny_vae, 4)) == 0  # same run folder: resumes at step 2
    a, b = weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    unet, vae, cfg = load_model(tmp_path / "a" / "model")  # the export is a usable model
    assert cfg.name == "tiny"


def _cli(*args):
    return [sys.executable, "-m", "mezzotint", *map(str, args)]


def test_sigkill_then_rerun_resumes(tmp_path, tiny_vae):
    run = tmp_path / "run"
    cmd = _cli(*unet_cmd(run, tiny_vae, 400))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # kill it once at least two checkpoints exist, mid-write or not
            done = [p for p in (run / "checkpoints").glob("step-*") if ".tmp" not in p.name] if run.exists() else []
            if len(done) >= 2:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    kept = sorted(int(p.name[5:13]) for p in (run / "checkpoints").iterdir() if ".tmp" not in p.name)
    assert kept and kept[-1] >= 2
    r = subprocess.run(_cli(*unet_cmd(run, tiny_vae, kept[-1] + 2)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr and f"(step {kept[-1]})" in r.stderr
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]
    assert json.loads((run / "checkpoints" / f"step-{kept[-1] + 2:08d}" / "train_state.json").read_text())["step"] \
        == kept[-1] + 2


def test_ddp_two_processes_equal_one_process_with_double_batch(tmp_path, tiny_vae):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = unet_cmd(tmp_path / "ddp", tiny_vae, 2)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_port", "29517", "-m", "mezzotint", *base],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    single = unet_cmd(tmp_path / "one", tiny_vae, 2)
    single[single.index("--batch") + 1] = "4"
    assert main(single) == 0
    a, b = weights(tmp_path / "ddp" / "model"), weights(tmp_path / "one" / "model")
    for k in a:  # same items, same per-item noise; only the order of float sums differs
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_finetune_from_model_and_folder_data(tmp_path, tiny_vae):
    assert main(unet_cmd(tmp_path / "base", tiny_vae, 2)) == 0
    data = tmp_path / "imgs"
    data.mkdir()
    for k, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (40, 48), colour).save(data / f"{k}.png")
        (data / f"{k}.txt").write_text(f"a {colour} picture")
    run = tmp_path / "ft"
    assert main(["train", "--run-dir", str(run), "--init", str(tmp_path / "base" / "model"), "--data", str(data),
                 "--steps", "2", "--ckpt-every", "2", *FAST]) == 0
    before, after = weights(tmp_path / "base" / "model"), weights(run / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_bad_training_input(tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--preset", "tiny", "--steps", "2"]) == 2
    assert "give --vae" in capsys.readouterr().err
    assert main(["train-vae", "--run-dir", str(tmp_path / "r"), "--data", str(tmp_path / "none"), "--steps", "2"]) == 2
    assert "error" in capsys.readouterr().err


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, tiny_vae):
    big = unet_cmd(tmp_path / "big", tiny_vae, 2)
    big[big.index("--batch") + 1] = "4"
    assert main(big) == 0
    assert main(unet_cmd(tmp_path / "acc", tiny_vae, 2, "--accum", "2")) == 0
    a, b = weights(tmp_path / "big" / "model"), weights(tmp_path / "acc" / "model")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_bf16_autocast_runs(tmp_path, tiny_vae):
    assert main(unet_cmd(tmp_path / "bf16", tiny_vae, 2, "--precision", "bf16")) == 0
    log = [json.loads(x) for x in (tmp_path / "bf16" / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)


def test_decoder_only_keeps_the_latent_space(tmp_path, tiny_vae):
    run = tmp_path / "dec"
    assert main(["train-vae", "--run-dir", str(run), "--init", str(tiny_vae), "--decoder-only", "--steps", "2",
                 "--ckpt-every", "2", *FAST]) == 0
    before, after = load_file(tiny_vae / "vae.safetensors"), load_file(run / "model" / "vae.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert load_vae(run / "model").cfg == load_vae(tiny_vae).cfg  # same latent scale and shift
    assert main(["train-vae", "--run-dir", str(tmp_path / "x"), "--decoder-only", "--steps", "1", *FAST]) == 2


def test_pool_first_pass_equals_streaming_then_cycles(tmp_path, tiny_vae):
    """--pool encodes items once; on the first pass the UNet sees what streaming shows it."""
    assert main(unet_cmd(tmp_path / "stream", tiny_vae, 3, "--caption-dropout", "0.5")) == 0
    assert main(unet_cmd(tmp_path / "pool", tiny_vae, 3, "--caption-dropout", "0.5", "--pool", "6")) == 0
    a, b = weights(tmp_path / "stream" / "model"), weights(tmp_path / "pool" / "model")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    shards = sorted((tmp_path / "pool" / "pool").iterdir())
    assert [p.name for p in shards] == ["rank0-00000.safetensors"]
    stamp = shards[0].stat().st_mtime_ns
    # two more steps read pool items 0..3 again, with new noise; the pool is loaded, not rebuilt
    assert main(unet_cmd(tmp_path / "pool", tiny_vae, 5, "--caption-dropout", "0.5", "--pool", "6")) == 0
    assert shards[0].stat().st_mtime_ns == stamp
    losses = [json.loads(x)["loss"] for x in (tmp_path / "pool" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 5 and losses[3] != losses[0]


def test_pool_refuses_a_pool_built_for_other_settings(tmp_path, tiny_vae, capsys):
    assert main(unet_cmd(tmp_path / "r", tiny_vae, 2, "--pool", "4", "--stop-after", "1")) == 0
    cmd = unet_cmd(tmp_path / "r", tiny_vae, 2, "--pool", "4")
    cmd[cmd.index("--batch") + 1] = "4"
    assert main(cmd) == 2
    assert "built for another pool" in capsys.readouterr().err
    assert main(["train-vae", "--run-dir", str(tmp_path / "v"), "--preset", "tiny", "--pool", "4"]) == 2
    # another caption-kind mix is another pool too
    assert main(unet_cmd(tmp_path / "r", tiny_vae, 2, "--pool", "4", "--kinds", "1,3,3,3")) == 2
    assert "built for another pool" in capsys.readouterr().err


def test_kinds_only_for_the_shapes_world(tmp_path, capsys):
    assert main(["train-vae", "--run-dir", str(tmp_path / "v"), "--data", str(tmp_path), "--kinds", "1,3,3,3",
                 "--steps", "1"]) == 2
    assert "not the Shapes world" in capsys.readouterr().err
    assert main(["train-vae", "--run-dir", str(tmp_path / "w"), "--kinds", "1,3", "--steps", "1"]) == 2
    assert "caption-kind weights" in capsys.readouterr().err
    assert not (tmp_path / "v").exists() and not (tmp_path / "w").exists()


def test_loss_weight_min_snr_and_floor():
    from mezzotint.train.tasks import loss_weight
    snr = torch.tensor([0.01, 0.5, 2.0, 50.0])
    torch.testing.assert_close(loss_weight(snr, 0, 0, True), torch.ones(4))
    # the x0 error's weight = v weight * (snr + 1) = eps weight * snr
    torch.testing.assert_close(loss_weight(snr, 5, 0, True) * (snr + 1), torch.tensor([0.01, 0.5, 2.0, 5.0]))
    torch.testing.assert_close(loss_weight(snr, 5, 1, True) * (snr + 1), torch.tensor([1.0, 1.0, 2.0, 5.0]))
    torch.testing.assert_close(loss_weight(snr, 5, 1, False) * snr, torch.tensor([1.0, 1.0, 2.0, 5.0]))
    torch.testing.assert_close(loss_weight(snr, 0, 1, False) * snr, torch.tensor([1.0, 1.0, 2.0, 50.0]))


def test_zero_terminal_snr_schedule_is_trained_and_stored(tmp_path, tiny_vae, capsys):
    assert main(unet_cmd(tmp_path / "eps", tiny_vae, 2, "--zero-terminal-snr")) == 2
    assert "needs v-prediction" in capsys.readouterr().err
    assert main(unet_cmd(tmp_path / "base", tiny_vae, 2, "--prediction", "v")) == 0
    run = tmp_path / "z"
    assert main(["train", "--run-dir", str(run), "--init", str(tmp_path / "base" / "model"), "--zero-terminal-snr",
                 "--snr-floor", "1", "--steps", "2", "--ckpt-every", "2", *FAST]) == 0
    _, _, cfg = load_model(run / "model")
    assert cfg.scheduler.rescale_betas_zero_snr and cfg.scheduler.prediction_type == "v"
    # a rerun without the option would go on with another schedule: refused, nothing written
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert main(["train", "--run-dir", str(run), "--init", str(tmp_path / "base" / "model"), "--snr-floor", "1",
                 "--steps", "4", "--ckpt-every", "2", *FAST]) == 2
    assert "was started with another scheduler config" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert not load_model(tmp_path / "base" / "model")[2].scheduler.rescale_betas_zero_snr
    from mezzotint.pipeline import Pipeline, defaults_for
    pipe = Pipeline.load(run / "model")
    req = defaults_for(cfg, "a red circle", seed=0, steps=3, width=32, height=32)
    image = pipe(req, ["a red circle"])[0].image
    assert image.size == (32, 32)


def test_high_noise_share_of_timesteps():
    from mezzotint.train.tasks import draw_timestep

    def draws(share, seed=0):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([draw_timestep(g, 1000, share) for _ in range(4000)])
    plain, high = draws(0.0), draws(0.5)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(plain, torch.cat([torch.randint(0, 1000, (1,), generator=g) for _ in range(4000)]))
    assert abs((plain >= 900).float().mean().item() - 0.1) < 0.02
    assert abs((high >= 900).float().mean().item() - 0.55) < 0.03  # 0.5 + 0.5 * 0.1
    assert bool((draws(1.0) >= 900).all()) and torch.equal(high, draws(0.5))
    g = torch.Generator().manual_seed(0)
    last = torch.cat([draw_timestep(g, 1000, 0.0, 0.3) for _ in range(4000)])
    assert abs((last == 999).float().mean().item() - 0.3) < 0.03  # uniform draws give it 0.001
    assert int(last.max()) == 999 and int(last.min()) >= 0


def test_ddp_with_the_contrast_loss(tmp_path, tiny_vae):
    """The swapped captions ride in the same forward, so DDP sees one pass per step."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = unet_cmd(tmp_path / "ddp", tiny_vae, 2, "--contrast", "0.1")
    cmd[cmd.index("--batch") + 1] = "6"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_port", "29518", "-m", "mezzotint", *cmd],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(row["contrast_loss"] > 0 for row in log)


def test_unet_trains_on_channels_last_inputs_like_contiguous_ones():
    """The UNet task feeds x_t channels-last (faster on the CPU): the same loss and gradients."""
    from mezzotint.unet import UNet
    torch.manual_seed(0)
    model = UNet(PRESETS["shapes"].unet)
    x, t, ctx = torch.randn(4, 8, 16, 16), torch.tensor([10.0, 300.0, 600.0, 990.0]), torch.randn(4, 7, 384)
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        model.zero_grad()
        out = model(x.contiguous(memory_format=fmt), t, ctx)
        (out - x).pow(2).mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, ga), (b, gb) = grads
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-3, atol=1e-5)


FAULTS = """
import resource, sys, torch
from mezzotint.config import PRESETS
from mezzotint.train.loop import keep_freed_memory
from mezzotint.vae import AutoencoderKL
if sys.argv[1] == "keep":
    keep_freed_memory()
torch.manual_seed(0)
torch.set_num_threads(1)
m = AutoencoderKL(PRESETS["shapes"].vae)
opt = torch.optim.AdamW(m.parameters(), 1e-4)
x, noise = torch.rand(8, 3, 32, 32), torch.randn(8, 8, 8, 8)
def step():
    loss = (m(x, noise)[0] - x).abs().mean()
    opt.zero_grad(); loss.backward(); opt.step()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_keep_freed_memory_spares_the_page_faults_of_each_step():
    """Training steps allocate and free the same activations: kept, their pages fault in once
    (seen: 60-66k faults in 30 autoencoder steps by default, 5-7k kept: the first step's)."""
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS, mode], check=True, capture_output=True,
                                       text=True).stdout.split()[-1]) for mode in ("default", "keep")}
    assert faults["keep"] * 3 < faults["default"], faults
