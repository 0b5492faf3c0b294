from dataclasses import dataclass

from .base import Method, Terms, ddpm_terms


@dataclass
class NegGrad(Method):
    """NegGrad: gradient ascent on the DDPM loss of A (SISS paper, Sec. 3). Forgets fast, destroys quality."""

    name = "neggrad"
    summary = "gradient ascent on A's DDPM loss"
    coefficients = {"a": -1.0}

    def terms(self, unet, batch, ctx):
        return Terms({"a": ddpm_terms(unet, batch.a, batch.eps, batch.t, ctx, batch.a_y)})
