"""mezzotint: text-to-image latent diffusion.

    from mezzotint import Pipeline, Request
    pipe = Pipeline.load("path/to/model")
    [result] = pipe(Request("a red circle to the left of a blue square", seed=1))
    result.image.save("out.png")
"""
__version__ = "0.1.0"

from .config import PRESETS, ModelConfig  # noqa: E402
from .pipeline import Pipeline, Request, Result  # noqa: E402

__all__ = ["Pipeline", "Request", "Result", "ModelConfig", "PRESETS", "__version__"]
