"""The registry of unlearning methods. A new method is one new file and one line here."""

from __future__ import annotations

import dataclasses

from ..errors import UserError
from .base import Context, Method, StepBatch, Terms
from .erasediff import EraseDiff, EraseDiffLight
from .naive import NaiveDeletion
from .neggrad import NegGrad
from .retrack import ReTrack
from .retrain import Retrain
from .siss import SISS, SISSNoIS

METHODS: dict[str, type[Method]] = {m.name: m for m in (
    NaiveDeletion, NegGrad, SISS, SISSNoIS, EraseDiff, EraseDiffLight, ReTrack, Retrain)}


def method_params(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(METHODS[name])]


def make_method(name: str, **params) -> Method:
    """Build a method by name; parameters it does not take are an error, not silently ignored."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    known = set(method_params(name))
    extra = sorted(k for k, v in params.items() if v is not None and k not in known)
    if extra:
        flags = ", ".join("--" + ("lambda" if k == "lam" else k.replace("_", "-")) for k in extra)
        raise UserError(f"{flags} does not apply to method {name} (it takes: {', '.join(sorted(known)) or 'nothing'})")
    return METHODS[name](**{k: v for k, v in params.items() if v is not None})


__all__ = ["METHODS", "Method", "Context", "StepBatch", "Terms", "make_method", "method_params"]
