"""Typed run summaries: what ``diffunlearn unlearn`` returns and its ``summary.json`` holds.

:class:`UnlearnSummary` is a single deletion request's run, :class:`RequestsSummary` a run of ``--requests``; both
share :class:`RunSummary` (the method as it ran, the steps, the model in and out with their state hashes, the
number of processes, the closed loop's outcome and the verification's headline). ``to_dict`` is the one serialiser
(optional parts that did not happen are left out), ``from_dict`` reads ``summary.json`` back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

#: parts of a summary that are left out of ``summary.json`` when they did not happen
OPTIONAL = ("scaling_norm_calibration", "until", "exit_status", "verification", "resumed_at_step")


@dataclass(kw_only=True)
class RunSummary:
    """What every unlearning run reports. ``model_in`` / ``model_out``: ``{"dir", "sha256"}`` (the UNet's state
    hash); ``model``: the model's description (:func:`~diffunlearn.model.model_summary`); ``until``: the closed
    loop's summary (``--until removed``), whose outcome sets ``exit_status``; ``verification``: the headline of the
    run's verification (its status, overall verdict and file), set once it ran."""

    command: str = "unlearn"
    method: str
    hyperparameters: dict
    steps: int
    kept: int
    forget: int
    model_in: dict
    model_out: dict
    processes: int = 1
    model: dict = field(default_factory=dict)
    until: dict | None = None
    exit_status: int | None = None
    verification: dict | None = None

    @property
    def exit_code(self) -> int:
        """The command's exit status: 0, or the closed loop's outcome (3 not removed, 4 stopped by the guard)."""
        return int(self.exit_status or 0)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v for k, v in out.items() if not (k in OPTIONAL and v is None)}

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(kw_only=True)
class UnlearnSummary(RunSummary):
    """A single deletion request's run: the measured ``auto`` strength (``scaling_norm_calibration``), the first 50
    names of A, A's classes, and the last step's log record."""

    scaling_norm_calibration: dict | None = None
    forget_names: list[str] = field(default_factory=list)
    forget_classes: dict | None = None
    last_step: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class RequestsSummary(RunSummary):
    """A run of deletion requests: one record per request (``per_request``), the similarity and quality measure
    the ledger's metrics use, the ledger and the hash of its last line, and where a resumed run continued."""

    requests: int
    per_request: list[dict] = field(default_factory=list)
    similarity: str = ""
    quality_measure: str = ""
    resumed_after_request: int | None = None
    resumed_at_step: int | None = None
    ledger: str = ""
    ledger_head: str = ""


__all__ = ["RunSummary", "UnlearnSummary", "RequestsSummary"]
