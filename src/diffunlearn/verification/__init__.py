"""Verification: does a deletion prove itself? Before/after measures of the forget set against reference images,
verdicts in words, a relearning audit, and a self-contained ``report.html``.

``verify(after, data, forget_idx, before=..., retrained=...)`` returns a typed :class:`Verification` (its verdicts,
the overall decision, the budget and what was measured), whose ``to_dict()`` is what ``verification.json`` holds;
``write_report(run_dir)`` writes ``report.html`` from a run directory's files. The ``verify`` command and the
verification a finished ``unlearn`` run ends with are in :mod:`diffunlearn.commands.verify`.
"""

from .audit import AuditSettings
from .core import verify
from .measures import BUDGETS, Budget
from .report import render, write_report
from .results import Outcome, Overall, Verdict, Verification
from .verdicts import Status

__all__ = ["AuditSettings", "BUDGETS", "Budget", "Outcome", "Overall", "Status", "Verdict", "Verification",
           "render", "verify", "write_report"]
