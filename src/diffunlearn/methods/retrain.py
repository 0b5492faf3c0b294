from dataclasses import dataclass

from .base import Method, Terms, ddpm_terms


@dataclass
class Retrain(Method):
    """Retrain, the gold standard: train from re-initialised weights on X \\ A with the DDPM loss.

    ``diffunlearn train --forget`` runs the base model's full recipe (schedule, EMA); this entry lets every method
    be run through one interface with the same steps, batch and optimiser.
    """

    name = "retrain"
    summary = "train from scratch on X \\ A (the gold standard)"
    coefficients = {"x": 1.0}
    from_scratch = True

    def terms(self, unet, batch, ctx):
        return Terms({"x": ddpm_terms(unet, batch.x, batch.eps, batch.t, ctx, batch.x_y)})
