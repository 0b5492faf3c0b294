"""SISS's ``scaling_norm`` by the paper's rule: about 10% of the logged ||G_x|| (docs/methods.md), measured for the
variant at the model it starts from.

Per variant and per model, because the importance-weighted ``x`` term of SISS (lambda = 0.5) has a far larger
gradient norm than the plain DDPM loss of SISS (No IS) or lambda = 0 (about 8x on the toy digits): one shared value
would be 10% for one variant and far more for another.
"""

from __future__ import annotations

import copy

import torch

from ..methods import Context, MethodSpec
from ..methods.base import global_norm
from ..model import DiffusionModel
from ..trainer import RowSampler

#: ``--scaling-norm auto``: this fraction of ||G_x|| (the paper's "about 10% of the logged ||G_x||")
AUTO_FRACTION = 0.1


def calibrate_scaling_norm(model: DiffusionModel, kept: torch.Tensor, forget: torch.Tensor, spec: MethodSpec,
                           batch: int, fraction: float, seed: int, batches: int = 4, labels=None,
                           micro: int | None = None) -> dict:
    """``fraction`` x ||G_x||: the gradient norm of the batch mean of the variant's own ``x`` term (sum-over-pixels
    loss, ``batch`` rows drawn as the trainer draws them, generator ``seed + 777``) averaged over ``batches`` batches
    at ``model``, which is not modified. ``spec``'s ``auto`` settings do not enter the ``x`` term. ``labels``:
    (labels of ``kept``, labels of ``forget``) for a class-conditional model.

    ``batch`` is the optimiser step's whole batch (micro-batch x accumulation x processes: the batch whose ||G_x||
    the trainer logs), so the measured norm does not depend on how the step is split; ``micro`` rows at a time are
    differentiated (default: all at once), so the measurement needs no more memory than a training micro-batch."""
    unet = copy.deepcopy(model.unet).train()
    method = spec.build(allow_auto=True)
    T = model.num_train_timesteps
    sampler = RowSampler(kept, forget, method, 0, T - 1, seed + 777, labels=labels)
    ctx = Context(model.alphas_cumprod(), kept, forget, 0, T - 1, torch.device("cpu"), sampler.generator, unet=unet,
                  batch_size=batch, draw=sampler.draw, labels=labels)
    method.setup(ctx)
    params = [p for p in unet.parameters() if p.requires_grad]
    norms = []
    micro = batch if micro is None else max(1, min(int(micro), batch))
    for _ in range(max(1, batches)):
        rows = sampler.draw(batch)
        if micro == batch:
            grads = torch.autograd.grad(method.terms(unet, rows, ctx).losses["x"].mean(), params, allow_unused=True)
        else:  # the batch mean's gradient, accumulated over micro-batch slices
            grads = [None] * len(params)
            for start in range(0, batch, micro):
                part = rows.slice(slice(start, start + micro))
                g = torch.autograd.grad(method.terms(unet, part, ctx).losses["x"].sum() / batch, params,
                                        allow_unused=True)
                grads = [b if a is None else a if b is None else a + b for a, b in zip(grads, g)]
        norms.append(float(global_norm([g for g in grads if g is not None])))
    gx = sum(norms) / len(norms)
    return {"grad_norm_x": gx, "fraction": fraction, "scaling_norm": fraction * gx}


def calibrated(model: DiffusionModel, kept: torch.Tensor, forget: torch.Tensor, spec: MethodSpec, batch: int,
               fraction: float, seed: int, batches: int = 4, labels=None, micro: int | None = None
               ) -> tuple[MethodSpec, dict | None]:
    """``spec`` with its ``auto`` settings replaced by the measured scaling_norm, and the measurement (None when
    nothing was ``auto``)."""
    if not any(v == "auto" for v in spec.params.values()):
        return spec, None
    calib = calibrate_scaling_norm(model, kept, forget, spec, batch, fraction, seed, batches, labels, micro)
    return with_scaling_norm(spec, calib["scaling_norm"]), calib


def with_scaling_norm(spec: MethodSpec, value: float) -> MethodSpec:
    return MethodSpec(spec.name, {k: (value if v == "auto" else v) for k, v in spec.params.items()})
