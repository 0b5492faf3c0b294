"""Verification: does a deletion prove itself? Before/after measures of the forget set against reference images,
verdicts in words, a relearning audit, and a self-contained ``report.html``.

``verify(after, data, forget_idx, before=..., retrained=...)`` returns a typed :class:`Verification` (its verdicts,
the overall decision, the budget and what was measured), whose ``to_dict()`` is what ``verification.json`` holds;
``write_report(run_dir)`` writes ``report.html`` from a run directory's files; ``verify_run`` is the hook
``diffunlearn unlearn`` calls after saving its model.
"""

from .audit import AuditSettings
from .command import VerifyConfig, run_verify, verify_run
from .core import verify
from .measures import BUDGETS, Budget
from .report import render, write_report
from .results import Outcome, Overall, Verdict, Verification
from .verdicts import Status

__all__ = ["AuditSettings", "BUDGETS", "Budget", "Outcome", "Overall", "Status", "Verdict", "Verification",
           "VerifyConfig", "render", "run_verify", "verify", "verify_run", "write_report"]
