"""Model format: save/load round trips, and clear errors for broken models."""
import json

import pytest
import torch

from mezzotint import Pipeline, Request
from mezzotint.checkpoints import ModelError, load_model, read_config, save_model


def test_folder_and_single_file_round_trip(tiny_model, tmp_path):
    unet, vae, cfg = load_model(tiny_model)
    single = save_model(tmp_path / "tiny.safetensors", unet, vae, cfg)
    folder = save_model(tmp_path / "again", unet, vae, cfg)
    assert read_config(single) == read_config(folder) == cfg
    for path in (single, folder):
        u2, v2, _ = load_model(path)
        for a, b in ((unet, u2), (vae, v2)):
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys()
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    req = Request("a blue ring", steps=2, seed=5)
    a = Pipeline.load(tiny_model, device="cpu")(req)[0].latent
    assert torch.equal(a, Pipeline.load(tiny_model, device="cpu")(req)[0].latent)
    # the same weights at other memory offsets (mmap of another file layout) may take other
    # SIMD paths in the CPU kernels: equal up to float rounding, not bit for bit
    b = Pipeline.load(single, device="cpu")(req)[0].latent
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())


def test_saved_keys_have_no_wrapper_prefixes(tiny_model, tmp_path):
    unet, vae, cfg = load_model(tiny_model)
    wrapped = torch.nn.Module()
    wrapped.module = unet  # as DistributedDataParallel holds it
    path = save_model(tmp_path / "m.safetensors", wrapped, vae, cfg)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        assert all(k.startswith(("unet.", "vae.")) and "module." not in k for k in f.keys())


def test_missing_model(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        read_config(tmp_path / "nope")


def _copy(model, tmp_path):
    import shutil
    return shutil.copytree(model, tmp_path / "bad")


def test_truncated_weights(tiny_model, tmp_path):
    bad = _copy(tiny_model, tmp_path)
    data = (bad / "unet.safetensors").read_bytes()
    (bad / "unet.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt safetensors"):
        read_config(bad)


def test_weights_that_do_not_fit_the_config(tiny_model, tmp_path):
    bad = _copy(tiny_model, tmp_path)
    meta = json.loads((bad / "model.json").read_text())
    meta["config"]["unet"]["channels"] = 64
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="UNet weights do not fit"):
        load_model(bad)


def test_unknown_config_key_is_an_error(tiny_model, tmp_path):
    bad = _copy(tiny_model, tmp_path)
    meta = json.loads((bad / "model.json").read_text())
    meta["config"]["unet"]["chanels"] = 64
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="chanels"):
        read_config(bad)


def test_not_json(tiny_model, tmp_path):
    bad = _copy(tiny_model, tmp_path)
    (bad / "model.json").write_text("{oops")
    with pytest.raises(ModelError, match="corrupt model config"):
        read_config(bad)


def test_loaded_weights_are_aligned(tiny_model):
    # a safetensors file packs tensors back to back; on the CPU misaligned weights take other
    # kernel paths, so the same weights in two files gave images 1e-6 apart (test_layout_map's
    # fit-layout test compares a model with its copy bit for bit)
    unet, vae, _ = load_model(tiny_model)
    assert all(p.data_ptr() % 64 == 0 for p in [*unet.parameters(), *vae.parameters()])
    half, _, _ = load_model(tiny_model, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
