"""Typed verification results: what :func:`~diffunlearn.verification.core.verify` returns and ``verification.json``
holds (format ``diffunlearn-verification/2``).

A :class:`Verdict` is one measure's decision (a :class:`~diffunlearn.verification.verdicts.Status`), the sentence
that states it and what its counts could detect, with the figures behind it; :class:`Overall` is the decision over
every measure and the quality; :class:`Verification` is the whole result, or a verification that did not finish
(its :class:`Outcome` and error). ``to_dict`` is the one serialiser of each, ``from_dict`` reads what it wrote, so
``Verification.from_dict(v.to_dict()) == v``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum

from .verdicts import REMOVED, Status

FORMAT = "diffunlearn-verification/2"


class Outcome(str, Enum):
    """Whether a verification finished. The value is what ``verification.json`` holds as ``status``."""

    OK = "ok"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class Verdict:
    """One measure's verdict: ``status`` decided from counts alone, ``text`` its words, ``power`` what its counts
    could and could not detect (None for a quality verdict), ``figures`` the values behind it (means, AUCs, counts,
    intervals; each measure has its own)."""

    measure: str
    status: Status
    text: str
    label: str = ""
    power: str | None = None
    figures: dict = field(default_factory=dict)

    CORE = ("measure", "label", "status", "power", "text")

    @property
    def removed(self) -> bool:
        return self.status.value in REMOVED

    def to_dict(self) -> dict:
        return {"measure": self.measure, "label": self.label, **self.figures, "status": self.status.value,
                **({"power": self.power} if self.power is not None else {}), "text": self.text}

    @classmethod
    def from_dict(cls, d: dict) -> Verdict:
        return cls(d["measure"], Status(d["status"]), d["text"], d.get("label", ""), d.get("power"),
                   {k: v for k, v in d.items() if k not in cls.CORE})


@dataclass(frozen=True)
class Overall:
    """The decision over every measure: ``deletion`` (removed, partly removed, not removed, inconclusive) and
    ``status``, which is ``degraded`` when the quality verdicts say the model is damaged (``quality_degraded``
    names those measures), else the deletion's."""

    status: Status
    deletion: Status
    text: str
    quality_degraded: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"status": self.status.value, "deletion": self.deletion.value,
                "quality_degraded": list(self.quality_degraded), "text": self.text}

    @classmethod
    def from_dict(cls, d: dict) -> Overall:
        return cls(Status(d["status"]), Status(d["deletion"]), d["text"], tuple(d.get("quality_degraded", ())))


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Verification:
    """A verification: the verdicts on A (``verdicts``: similarity, loss, NLL, generation), the quality verdicts on
    the reference images, the overall decision, the budget with what it resolves, and ``record``: what was
    measured on which images and models (seed, models, forget, reference, counts, definitions, spaces, per-model
    measures, the report's images). A verification that did not finish has an ``outcome`` other than OK, an
    ``error`` and no verdicts."""

    outcome: Outcome
    time: str = field(default_factory=_now)
    overall: Overall | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    quality: list[Verdict] = field(default_factory=list)
    budget: dict = field(default_factory=dict)
    seconds: float | None = None
    error: str | None = None
    audit: dict | None = None
    record: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    @property
    def removed(self) -> bool:
        """The deletion passed: every measure that showed A is resolved, none still shows it, the quality held."""
        return self.ok and self.overall is not None and self.overall.status is Status.REMOVED

    def verdict(self, measure: str) -> Verdict:
        """The verdict on A of one measure (``similarity``, ``loss``, ``nll``, ``generation``)."""
        for v in self.verdicts:
            if v.measure == measure:
                return v
        raise KeyError(measure)

    def line(self) -> str:
        """One line for a person: the overall verdict and its text, or what went wrong."""
        if not self.ok:
            return f"verification {self.outcome.value}: {self.error}"
        return f"verification: {self.overall.status.value}. {self.overall.text}"

    def headline(self) -> dict:
        """What a run's summary keeps of its verification: the outcome and the overall status, or the error."""
        head = {"status": self.outcome.value}
        if self.ok:
            head.update(overall=self.overall.status.value, seconds=self.seconds)
        else:
            head["error"] = self.error
        return head

    def to_dict(self) -> dict:
        if not self.ok:
            return {"format": FORMAT, "status": self.outcome.value, "error": self.error, "time": self.time,
                    **({"seconds": self.seconds} if self.seconds is not None else {})}
        return {"format": FORMAT, "status": self.outcome.value, "time": self.time, "budget": self.budget,
                **self.record, "verdicts": [v.to_dict() for v in self.verdicts],
                "quality": [q.to_dict() for q in self.quality], "overall": self.overall.to_dict(),
                "audit": self.audit, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> Verification:
        outcome = Outcome(d.get("status", "failed"))
        if outcome is not Outcome.OK:
            return cls(outcome, d.get("time", ""), error=d.get("error"), seconds=d.get("seconds"))
        own = ("format", "status", "time", "budget", "verdicts", "quality", "overall", "audit", "seconds")
        return cls(outcome, d.get("time", ""), Overall.from_dict(d["overall"]),
                   [Verdict.from_dict(v) for v in d.get("verdicts", [])],
                   [Verdict.from_dict(q) for q in d.get("quality", [])], d.get("budget", {}), d.get("seconds"),
                   None, d.get("audit"), {k: v for k, v in d.items() if k not in own})

    @classmethod
    def failed(cls, outcome: Outcome | str, error: str, seconds: float | None = None) -> Verification:
        """A verification that did not finish (``failed`` or ``interrupted``), with the error that stopped it."""
        return cls(Outcome(outcome), error=error, seconds=None if seconds is None else round(seconds, 2))


__all__ = ["FORMAT", "Outcome", "Verdict", "Overall", "Verification"]
