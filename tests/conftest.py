import os

import pytest
import torch

os.environ.setdefault("MEZZOTINT_NO_PROGRESS", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random-weight model folder of the `tiny` preset, with the real MiniLM text encoder."""
    from mezzotint.checkpoints import save_model
    from mezzotint.config import PRESETS
    from mezzotint.unet import UNet
    from mezzotint.vae import AutoencoderKL
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    return save_model(tmp_path_factory.mktemp("models") / "tiny", UNet(cfg.unet), AutoencoderKL(cfg.vae), cfg)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model):
    from mezzotint import Pipeline
    return Pipeline.load(tiny_model, device="cpu")
