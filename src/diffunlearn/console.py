"""What library code reports (progress, what it saved, verdicts): the ``diffunlearn`` logger, never ``print``.

``import diffunlearn`` gives that logger one handler, which writes each message as it is to the standard output of
the moment (what the command line shows; a captured stdout in a test or a notebook sees it too). A program that
embeds the library decides what a person sees: ``logging.getLogger("diffunlearn").setLevel(logging.WARNING)``
silences it, and replacing the handler sends it elsewhere.
"""

from __future__ import annotations

import logging
import sys

ROOT = "diffunlearn"


class _CurrentStdout(logging.StreamHandler):
    """A stream handler bound to whatever ``sys.stdout`` is when a message is written."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # logging.StreamHandler sets it once; the current stdout is used instead
        pass


def _install() -> None:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _CurrentStdout) for h in root.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (a child of ``diffunlearn``)."""
    return logging.getLogger(name)


_install()
