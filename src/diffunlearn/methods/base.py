"""The interface every unlearning method implements, and the batch it receives.

A method is a small dataclass: hyperparameters are its fields (their ``metadata`` gives the command-line flag and
help), ``terms`` returns named per-sample losses for a micro-batch, and how the gradients of those terms become one
update is the method's own business, through two hooks the trainer calls without knowing any term or method:
``backward`` (once per micro-batch) and ``finish`` (once per optimiser step, leaving the update in ``p.grad``). The
defaults cover both common cases: fixed coefficients (one backward pass of the weighted sum) or ``combine`` over the
separately accumulated gradients (SISS norm-fixing, EraseDiff's adaptive weight).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import UserError
from ..model.schedule import gamma_sigma, predict_noise, sum_sq


@dataclass
class StepBatch:
    """Rows for one optimiser step (or a micro-batch slice of it): a pair (x from X \\ A, a from A) per row, one shared
    noise ``eps`` and timestep ``t`` per row, and whatever per-row randomness the method drew for itself. The images
    ``x`` and ``a`` are None until fetched (and stay None for a part a method did not ask ``draw`` for). For a
    class-conditional model ``x_y`` and ``a_y`` are the rows' class labels (int64, shape (B,)); None otherwise."""

    x_idx: torch.Tensor
    a_idx: torch.Tensor
    x: torch.Tensor | None
    a: torch.Tensor | None
    eps: torch.Tensor
    t: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    x_y: torch.Tensor | None = None
    a_y: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.t)

    def slice(self, sl: slice) -> "StepBatch":
        return self._map(lambda v: v[sl])

    def to(self, device) -> "StepBatch":
        return self._map(lambda v: v.to(device))

    def _map(self, fn) -> "StepBatch":
        tensors = [None if v is None else fn(v) for v in (self.x_idx, self.a_idx, self.x, self.a, self.eps, self.t)]
        labels = [None if v is None else fn(v) for v in (self.x_y, self.a_y)]
        return StepBatch(*tensors, {k: fn(v) for k, v in self.extra.items()}, *labels)


@dataclass
class Terms:
    """Per-sample loss terms (each of shape (B,)) and scalar statistics to log."""

    losses: dict[str, torch.Tensor]
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class Context:
    """What a method may use besides its batch: the schedule, the kept and forget sets (tensors, or lazy image arrays
    whose indexing decodes the rows asked for), the optimiser."""

    alphas_cumprod: torch.Tensor
    kept: object
    forget: object
    t_min: int
    t_max: int
    device: torch.device
    generator: torch.Generator
    unet: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    batch_size: int = 1
    draw: object = None  # callable(n_rows, parts=("x", "a")) -> StepBatch with those parts' images, set by the trainer
    autocast: object = None
    #: (labels of X \ A, labels of A) for a class-conditional model, else None
    labels: tuple[torch.Tensor, torch.Tensor] | None = None

    def gs(self, t: torch.Tensor, ndim: int = 4):
        return gamma_sigma(self.alphas_cumprod, t, ndim)


class Method:
    """Base class. Subclasses are dataclasses whose fields are their hyperparameters."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: True when ``combine`` needs each term's gradient separately (costs one extra backward pass per extra term)
    separate_grads: ClassVar[bool] = False
    #: fixed coefficient of each term's batch mean in the loss that is back-propagated (when not ``separate_grads``)
    coefficients: ClassVar[dict[str, float]] = {}
    #: the method re-initialises the weights (retrain)
    from_scratch: ClassVar[bool] = False

    def setup(self, ctx: Context) -> None:
        """Precompute what the method needs once (e.g. ReTrack's neighbours)."""

    def check_labels(self, kept_labels: torch.Tensor, forget_labels: torch.Tensor) -> None:
        """Refuse (``UserError``) class labels the method cannot unlearn with; called before anything is written."""

    def draw(self, n: int, shape: tuple[int, ...], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-row randomness of the method's own, drawn for all rows of a step at once (so micro-batching and the
        number of processes do not change it)."""
        return {}

    def terms(self, unet: torch.nn.Module, batch: StepBatch, ctx: Context) -> Terms:
        raise NotImplementedError(f"{type(self).__name__} must define terms()")

    def loss_coefficients(self) -> dict[str, float]:
        return dict(self.coefficients)

    def backward(self, losses: dict[str, torch.Tensor], params: list[torch.Tensor], step: "GradStep") -> None:
        """Back-propagate one micro-batch's per-sample losses, divided by ``step.micro_batches`` so that the sum over
        micro-batches is the mean over the step's rows. Default: with ``separate_grads`` each term's gradient is
        accumulated in its own buffer (``step.buffers``); otherwise the fixed-coefficient sum goes into ``p.grad``."""
        if step.separate:
            names = list(losses)
            for i, k in enumerate(names):
                grads = torch.autograd.grad(losses[k].mean() / step.micro_batches, params,
                                            retain_graph=i + 1 < len(names), allow_unused=True)
                buf = step.buffers.setdefault(k, [torch.zeros_like(p) for p in params])
                for b, g in zip(buf, grads):
                    if g is not None:
                        b.add_(g)
        else:
            coefs = self.loss_coefficients()
            (sum(coefs[k] * v.mean() for k, v in losses.items()) / step.micro_batches).backward()

    def finish(self, params: list[torch.Tensor], step: "GradStep") -> dict[str, float]:
        """After every micro-batch: leave the step's update in each ``p.grad`` (averaged over processes through
        ``step.reduce``) and return statistics to log."""
        if step.separate:
            bufs = {k: [step.reduce(b) for b in v] for k, v in step.buffers.items()}
            update, stats = self.combine(bufs)
            for p, g in zip(params, update):
                p.grad = g
            return stats
        for p in params:
            p.grad = torch.zeros_like(p) if p.grad is None else step.reduce(p.grad)
        return {}

    def combine(self, grads: dict[str, list[torch.Tensor]]) -> tuple[list[torch.Tensor], dict[str, float]]:
        """Turn the accumulated gradient of each term into the update direction (only with ``separate_grads``)."""
        raise NotImplementedError(f"{type(self).__name__} must define combine() when separate_grads is set")

    def before_step(self, ctx: Context) -> dict[str, float]:
        """Work done before each optimiser step's gradients (EraseDiff's inner passes); returns stats to log."""
        return {}

    def state_dict(self) -> dict:
        """Mutable state that checkpoints must carry (most methods have none)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""

    def hyperparameters(self) -> dict:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


@dataclass
class GradStep:
    """What ``Method.backward`` / ``Method.finish`` know of one optimiser step: ``micro_batches`` per process,
    ``single`` = the step is one micro-batch in one process, ``separate`` = the method's ``separate_grads`` this step,
    ``reduce`` averages a tensor over processes (identity in one process), ``buffers`` the per-term gradients and
    ``stats`` whatever ``backward`` measured for ``finish`` to return."""

    micro_batches: int
    single: bool
    separate: bool
    reduce: object = staticmethod(lambda t: t)
    buffers: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


def ddpm_terms(unet, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, ctx: Context,
               y: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample ``||eps - eps_theta(gamma_t x0 + sigma_t eps, t[, y])||^2`` (sum over dims; ``y``: class labels of a
    class-conditional model)."""
    g, s = ctx.gs(t, x0.ndim)
    return sum_sq(predict_noise(unet, g * x0 + s * eps, t, y) - eps)


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all parameters' gradients together."""
    return torch.sqrt(sum((g.double() ** 2).sum() for g in tensors))


def check_range(name: str, value: float, lo: float, hi: float) -> None:
    if value is None or not (lo <= float(value) <= hi):
        raise UserError(f"{name} must lie in [{lo}, {hi}], got {value}")
