"""Sampling with per-image random generators, so image i is the same whatever the batch size (before/after grids
line up one to one)."""

from __future__ import annotations

import copy

import torch

from . import DiffusionModel
from .schedule import predict_noise

#: images per forward pass: on CPU 64 took about 20% less CPU time than 256 (and than 1024) for bitwise the same images
#: (docs/results/bench-speed.md); on a GPU pass a larger batch.
SAMPLE_BATCH = 64


#: image numbers per seed: image i of seed s has generator seed s * SEED_STRIDE + i, so i < SEED_STRIDE
SEED_STRIDE = 1_000_003


def image_generators(seed: int, indices) -> list[torch.Generator]:
    """One generator per image, seeded by ``(seed, i)``."""
    return [torch.Generator().manual_seed(int(seed) * SEED_STRIDE + int(i)) for i in indices]


def initial_noise(shape: tuple[int, ...], gens: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


def seeded_batches(n: int, batch_size: int, seed: int, start: int = 0, progress: bool = False, indices=None):
    """The generators of each batch of ``n`` images: image ``i`` gets generator ``(seed, start + i)``, or with
    ``indices`` the images of those numbers alone (``n`` is then ``len(indices)``)."""
    idx = range(start, start + n) if indices is None else [int(i) for i in indices]
    it = range(0, len(idx), batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="sampling", unit="batch")
    for b0 in it:
        yield image_generators(seed, idx[b0:b0 + batch_size])


def sample_labels(model: DiffusionModel, n: int, labels=None, start: int = 0, indices=None) -> torch.Tensor | None:
    """The class label of each of ``n`` samples of a class-conditional model: ``labels`` (one class index for all, or
    one per sample), or by default the classes in turn (sample ``i`` gets class ``(start + i) mod K``, or with
    ``indices`` sample number ``indices[j]`` gets class ``indices[j] mod K``). None for an unconditional model, which
    takes no labels."""
    from ..errors import UserError

    if not model.conditional:
        if labels is not None:
            raise UserError("class labels were given but the model is not class-conditional")
        return None
    if labels is None:
        numbers = torch.arange(start, start + n) if indices is None else torch.as_tensor(list(indices))
        return (numbers % len(model.classes)).long()
    from ..data.labels import check_model_labels

    y = torch.as_tensor(labels, dtype=torch.long).flatten()
    return check_model_labels(y.expand(n) if len(y) == 1 else y, model.classes, n, "sample")


def guided_noise(unet, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, guidance: float,
                 null_class: int | None) -> torch.Tensor:
    """The noise prediction at guidance scale ``w``: ``eps(x, t, y)`` for w = 1 (or an unconditional model), else
    classifier-free guidance ``eps(x, t, null) + w (eps(x, t, y) - eps(x, t, null))`` in one batched forward pass
    (w = 0: the model's unconditional prediction)."""
    if y is None or guidance == 1.0:
        return predict_noise(unet, x, t, y)
    null = torch.full_like(y, null_class)
    e_u, e_c = predict_noise(unet, torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, y])).chunk(2)
    return e_u + guidance * (e_c - e_u)


def check_guidance(model: DiffusionModel, guidance: float) -> None:
    from ..errors import UserError

    if not guidance >= 0:
        raise UserError(f"--guidance must be >= 0 (1: plain conditional sampling), got {guidance}")
    if guidance != 1.0 and (not model.conditional or model.null_class is None):
        raise UserError("--guidance other than 1 needs a class-conditional model trained with a null class "
                        "(train --class-conditional)")


#: the samplers ``ddpm_sample`` offers: ancestral DDPM (the protocols' own), and DPM-Solver++ (Lu et al. 2022) from
#: diffusers, 2nd-order multistep, as an ODE solver (deterministic given the initial noise) or its SDE variant. On the
#: shipped MNIST T-Shirt model the SDE form at 20 steps gave 50-step DDPM's T-shirt rate 4.4x faster; the ODE form
#: drew the memorised T-shirt almost twice as often (docs/results/bench-sampler.md)
SAMPLERS = ("ddpm", "dpm++", "dpm++sde")


def check_sampler(sampler: str) -> None:
    from ..errors import UserError

    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}: choose {', '.join(SAMPLERS)}")


def make_sampler(model: DiffusionModel, sampler: str, steps: int):
    """A fresh diffusers scheduler for ``sampler`` on the model's noise schedule (never the model's own object), set to
    ``steps`` timesteps. Multistep solvers keep state from step to step: each batch of samples needs a fresh one."""
    check_sampler(sampler)
    if sampler == "ddpm":
        sched = copy.deepcopy(model.scheduler)
    else:
        from diffusers import DPMSolverMultistepScheduler

        algorithm = "dpmsolver++" if sampler == "dpm++" else "sde-dpmsolver++"
        # thresholding at sample_max_value 1 clips each step's x0 prediction to [-1, 1], as the DDPM scheduler's
        # clip_sample does: without it the x0 predicted at the first steps (alpha_T ~ 0.006) throws samples off range
        sched = DPMSolverMultistepScheduler.from_config(model.scheduler.config, algorithm_type=algorithm,
                                                        solver_order=2, final_sigmas_type="zero",
                                                        lower_order_final=True, thresholding=True,
                                                        sample_max_value=1.0)
    sched.set_timesteps(steps)
    return sched


@torch.inference_mode()
def ddpm_sample(model: DiffusionModel, n: int, steps: int = 50, seed: int = 0, batch_size: int = SAMPLE_BATCH,
                start: int = 0, progress: bool = False, device: str | torch.device = "cpu",
                bf16: bool = False, labels=None, guidance: float = 1.0, sampler: str = "ddpm", indices=None
                ) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020) on ``steps`` evenly spaced timesteps; returns (n, C, H, W) in [-1, 1]
    (a latent model's samples decoded to images).

    Image ``i`` uses generator ``(seed, start + i)`` for its initial noise and every step's noise; ``indices`` draws
    only the images of those numbers (``n`` is then their count), the same images a full run draws at them, to look
    again at chosen samples without drawing the rest. ``bf16`` runs the
    network under bfloat16 autocast (the scheduler's arithmetic stays float32): faster on hardware with bfloat16
    matrix units, and other numbers (a few percent of the images take visibly different trajectories).
    A class-conditional model samples image ``i`` of class ``labels[i]`` (see :func:`sample_labels`; default: the
    classes in turn) at classifier-free guidance scale ``guidance`` (1: the conditional model alone).
    ``sampler``: ``ddpm`` (ancestral), or DPM-Solver++ (``dpm++``: the ODE, the initial noise its only randomness;
    ``dpm++sde``: stochastic, each image's noise from its own generator) with far fewer ``steps`` (see
    :data:`SAMPLERS` for which kept the rate of memorised copies).
    """
    check_guidance(model, guidance)
    if indices is not None:
        indices = [int(i) for i in indices]
        if start or n not in (0, len(indices)) or not all(0 <= i < SEED_STRIDE for i in indices):
            raise ValueError(f"indices: pass n=0 (or their count) and no start, and image numbers in [0, "
                             f"{SEED_STRIDE}); got n={n}, start={start}")
        n = len(indices)
    y_all = sample_labels(model, n, labels, start, indices)
    sched = make_sampler(model, sampler, steps)
    unet = model.unet.to(device).eval()
    out = []
    bar = None
    if progress:  # counts denoising steps over all batches, so its ETA is right from the first batch on
        from tqdm import tqdm

        bar = tqdm(total=-(-n // batch_size) * len(sched.timesteps), desc=f"sampling {n} images", unit="step")
    done = 0
    for gens in seeded_batches(n, batch_size, seed, start, indices=indices):
        if done:  # every batch after the first starts from a fresh solver
            sched = make_sampler(model, sampler, steps)
        x = initial_noise(model.sample_shape, gens).to(device)
        y = None if y_all is None else y_all[done:done + len(gens)].to(device)
        done += len(gens)
        for t in sched.timesteps:
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                eps = guided_noise(unet, x, t.expand(len(x)).to(device), y, guidance, model.null_class)
            x = sched.step(eps.float(), t, x, generator=gens).prev_sample
            if bar is not None:
                bar.update()
        out.append(model.decode(x).cpu())  # a latent model decodes with its autoencoder
    if bar is not None:
        bar.close()
    return torch.cat(out) if out else torch.empty((0, *model.image_shape))


def save_grid(images: torch.Tensor, path, ncol: int | None = None, labels: list[str] | None = None,
              title: str | None = None) -> None:
    """Save model-space images as one PNG grid, tiles upscaled (nearest neighbour) so the grid is at least 256 px
    wide, with a label under each tile and a title above when given (:mod:`diffunlearn.runs.images`)."""
    from ..runs.images import grid, save_png

    save_png(grid(images, ncol, labels, title), path)
