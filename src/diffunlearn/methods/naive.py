from dataclasses import dataclass

from .base import Method, Terms, ddpm_terms


@dataclass
class NaiveDeletion(Method):
    """Naive deletion: fine-tune on X \\ A with the DDPM loss (SISS paper, Sec. 3). Keeps quality, forgets slowly."""

    name = "naive"
    summary = "fine-tune on X \\ A with the ordinary DDPM loss"
    coefficients = {"x": 1.0}

    def terms(self, unet, batch, ctx):
        return Terms({"x": ddpm_terms(unet, batch.x, batch.eps, batch.t, ctx, batch.x_y)})
