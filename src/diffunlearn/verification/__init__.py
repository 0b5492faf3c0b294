"""Verification: does a deletion prove itself? Before/after measures of the forget set against reference images,
verdicts in words, a relearning audit, and a self-contained ``report.html``.

``verify(after, data, forget_idx, before=..., retrained=...)`` returns what ``verification.json`` holds;
``write_report(run_dir)`` writes ``report.html`` from a run directory's files; ``verify_run`` is the hook
``diffunlearn unlearn`` calls after saving its model.
"""

from .audit import AuditSettings
from .command import VerifyConfig, run_verify, verify_run
from .core import verify
from .measures import BUDGETS, Budget
from .report import render, write_report

__all__ = ["AuditSettings", "BUDGETS", "Budget", "VerifyConfig", "render", "run_verify", "verify", "verify_run",
           "write_report"]
