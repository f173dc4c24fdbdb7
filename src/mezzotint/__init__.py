"""mezzotint: text-to-image latent diffusion.

    from mezzotint import Pipeline, Request
    pipe = Pipeline.load("path/to/model")
    [result] = pipe(Request("a red circle to the left of a blue square", seed=1))
    result.image.save("out.png")
    [edited] = pipe.img2img(Request("a blue square", seed=1), result.image, strength=0.6)
    [filled] = pipe.inpaint(Request("a yellow star"), result.image, mask_image)
    explain(pipe, Request("three green stars")).save("xray/")   # trajectory + word heat maps
"""
__version__ = "0.1.0"

from .config import PRESETS, ModelConfig  # noqa: E402
from .pipeline import Pipeline, Request, Result, defaults_for  # noqa: E402
from .explain import Explanation, explain  # noqa: E402

__all__ = ["Pipeline", "Request", "Result", "defaults_for", "ModelConfig", "PRESETS", "explain", "Explanation", "__version__"]
