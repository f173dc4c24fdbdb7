"""Checkpoints we cannot or must not load fail with a ModelError that says why."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_sd_common import saved

from mezzotint.checkpoints import ModelError
from mezzotint.sd import load_sd


class Payload:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_truncated_files(tmp_path):
    _, single = saved("sd1")
    data = single.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt safetensors"):
        load_sd(cut)
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": load_file(single)}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(ModelError, match="corrupt or unreadable"):
        load_sd(ckpt)


def test_pickled_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "hook": Payload(marker)}, evil)
    with pytest.raises(ModelError, match="refusing to load.*pickled Python objects"):
        load_sd(evil)
    assert not marker.exists()


def test_unknown_architectures(tmp_path):
    _, single = saved("sd1")
    sd = load_file(single)
    cases = {
        "sdxl": ({**sd, "conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 8)}, "SDXL"),
        "other": ({"encoder.layer.0.weight": torch.zeros(2)}, "not a Stable Diffusion checkpoint"),
        "no_vae": ({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, "no autoencoder"),
        "no_text": ({k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}, "no text encoder"),
        "extra": ({**sd, "model.diffusion_model.label_emb.0.2.weight": torch.zeros(4, 4)}, "unknown tensors"),
        "missing": ({k: v for k, v in sd.items() if "middle_block.2.out_layers.3.weight" not in k}, "missing 1"),
        "shape": ({**sd, "model.diffusion_model.middle_block.2.out_layers.3.bias": torch.zeros(3)}, "has shape"),
        "blocks": ({k: v for k, v in sd.items() if "input_blocks.2.0.op" not in k}, "unsupported Stable Diffusion"),
    }
    for name, (tensors, message) in cases.items():
        file = tmp_path / f"{name}.safetensors"
        save_file(tensors, file)
        with pytest.raises(ModelError, match=message):
            load_sd(file)


def test_bad_paths_and_formats(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_sd(tmp_path / "nope.safetensors")
    (tmp_path / "weights.onnx").write_bytes(b"x")
    with pytest.raises(ModelError, match="unknown weights format"):
        load_sd(tmp_path / "weights.onnx")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelError, match="no model_index.json"):
        load_sd(tmp_path / "folder")


def test_unsupported_diffusers_configs(tmp_path):
    folder, _ = saved("sd1")
    edits = {
        ("unet", "class_embed_type"): ("timestep", "class_embed_type"),
        ("unet", "attention_head_dim"): ([1, 2, 3], "attention heads"),
        ("unet", "up_block_types"): (["UpBlock2D"] * 3, "block types"),
        ("vae", "use_quant_conv"): (False, "use_quant_conv"),
    }
    for (part, key), (value, message) in edits.items():
        copy = tmp_path / f"{part}-{key}"
        shutil.copytree(folder, copy)
        conf = json.loads((copy / part / "config.json").read_text())
        conf[key] = value
        (copy / part / "config.json").write_text(json.dumps(conf))
        with pytest.raises(ModelError, match=message):
            load_sd(copy)
    xl = tmp_path / "xl"
    shutil.copytree(folder, xl)
    index = json.loads((xl / "model_index.json").read_text())
    (xl / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": ["transformers", "X"]}))
    with pytest.raises(ModelError, match="SDXL"):
        load_sd(xl)


def test_lightning_ckpt_loads_without_running_its_classes(tmp_path, monkeypatch):
    # SD 1.x .ckpt files key callback state by Lightning's ModelCheckpoint class and hold
    # numpy scalars: data only, loaded with stand-ins, as A1111's safe unpickler allows
    import sys
    import types

    import numpy as np
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for n in names:
        monkeypatch.setitem(sys.modules, n, types.ModuleType(n))
    ran = []

    class ModelCheckpoint:
        def __setstate__(self, state):
            ran.append(state)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = names[-1], "ModelCheckpoint"
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    _, single = saved("sd2")
    ckpt = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": load_file(single), "global_step": np.int64(875000),
                "callbacks": {ModelCheckpoint: {"best_model_score": np.float32(0.5), "scores": np.arange(3)}},
                "hook": ModelCheckpoint()}, ckpt)
    for n in names:
        monkeypatch.delitem(sys.modules, n)
    unet, _, _, cfg = load_sd(ckpt)
    assert cfg.scheduler.prediction_type == "eps" and not ran  # global_step read; nothing of theirs ran
