"""The registry of unlearning methods. A new method is one new file and one line here: its dataclass fields are its
hyperparameters, and they become the ``method:`` block of a YAML config and command-line flags (a field's metadata
may name the flag and give its help)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

from ..config import add_flag, coerce, unwrap_optional
from ..config import flag_of as field_flag
from ..errors import UserError
from .base import Context, GradStep, Method, StepBatch, Terms
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


def flag_of(param: str) -> str:
    """The command-line flag of a hyperparameter of any registered method (``lam`` -> ``--lambda``)."""
    for cls in METHODS.values():
        for f in dataclasses.fields(cls):
            if f.name == param:
                return field_flag(f)
    return "--" + param.replace("_", "-")


def _param_of(key: str) -> str:
    """A block key as the field it names: the field itself, or its flag without dashes (``lambda`` -> ``lam``)."""
    key = key.replace("-", "_")
    for cls in METHODS.values():
        for f in dataclasses.fields(cls):
            if key == field_flag(f)[2:].replace("-", "_"):
                return f.name
    return key


def make_method(name: str, **params) -> Method:
    """Build a method by name; parameters it does not take are an error, not silently ignored."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    known = set(method_params(name))
    extra = sorted(k for k, v in params.items() if v is not None and k not in known)
    if extra:
        takes = ", ".join(sorted(flag_of(k) for k in known)) or "no options"
        raise UserError(f"{', '.join(flag_of(k) for k in extra)} does not apply to method {name} (it takes: {takes})")
    return METHODS[name](**{k: v for k, v in params.items() if v is not None})


#: a setting measured at the input model before the run (SISS's ``scaling_norm``)
AUTO = "auto"


def _or_auto(kind):
    def parse(text: str):
        return AUTO if text == AUTO else kind(text)

    parse.__name__ = f"{kind.__name__} or 'auto'"
    return parse


@dataclass
class MethodSpec:
    """The ``method:`` block of a config: a registered method's name and the hyperparameters set for it (the rest
    take the method's defaults). In YAML ``method: siss`` or ``method: {name: siss, lam: 0.5}``; on the command line
    ``--method NAME`` and the flags generated from every method's fields. ``--method`` naming another method than the
    config file replaces the file's block, so a preset works with every method."""

    name: str = "siss"
    params: dict = field(default_factory=dict)

    @property
    def auto(self) -> bool:
        """Some setting is ``auto``: measured at the input model before the run (``--scaling-norm auto``)."""
        return any(v == AUTO for v in self.params.values())

    def build(self, allow_auto: bool = False) -> Method:
        """The method. ``auto`` settings must have been measured first (:func:`diffunlearn.protocols.calibration.
        calibrated`); ``allow_auto`` builds with a stand-in value, only to validate the other settings."""
        if self.auto and not allow_auto:
            raise UserError(f"{', '.join(k for k, v in self.params.items() if v == AUTO)} is 'auto': it is measured "
                            "at the input model before the run; pass a number to use the method here")
        return make_method(self.name, **{k: (1.0 if v == AUTO else v) for k, v in self.params.items()})

    def measured_by_default(self) -> "MethodSpec":
        """This block with every setting that may be measured at the model (``auto``, e.g. SISS's ``scaling_norm``)
        and was not set here set to ``auto``: the ``unlearn`` command's default, one setting for any model. A fixed
        ``superfactor`` replaces norm-fixing, so it keeps ``scaling_norm`` unmeasured."""
        if self.name not in METHODS:
            return self
        measurable = {f.name for f in dataclasses.fields(METHODS[self.name]) if f.metadata.get("auto")}
        if self.params.get("superfactor") is not None:  # a default 'auto' set before the superfactor was given goes
            return MethodSpec(self.name, {k: v for k, v in self.params.items() if not (k in measurable and v == AUTO)})
        free = {k: AUTO for k in measurable if self.params.get(k) is None}
        return MethodSpec(self.name, {**self.params, **free}) if free else self

    def to_dict(self) -> dict:
        """The block as it would be written in YAML, with every hyperparameter resolved (defaults included; an
        ``auto`` setting stays ``auto``)."""
        return {"name": self.name, **self.build(allow_auto=True).hyperparameters(),
                **{k: v for k, v in self.params.items() if v == AUTO}}

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument("--method", dest="method.name", default=None, metavar="NAME",
                            help=f"unlearning method: {', '.join(METHODS)}")
        seen: dict[str, str] = {}
        for cls in METHODS.values():
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                flag = field_flag(f)
                if flag in seen:
                    continue
                seen[flag] = cls.name
                users = [n for n, c in METHODS.items() if f.name in {g.name for g in dataclasses.fields(c)}]
                kind = unwrap_optional(hints[f.name])
                add_flag(parser, flag, "method." + f.name, _or_auto(kind) if f.metadata.get("auto") else kind,
                         f"{'/'.join(users)}: {f.metadata.get('help', f.name)}")

    @classmethod
    def resolve(cls, raw, args, base: "MethodSpec", where: str) -> "MethodSpec":
        """File block ``raw`` (None, a name or a mapping) over ``base``, then command-line flags over both."""
        name, params = base.name, dict(base.params)
        if isinstance(raw, str):
            name, params = raw, {}
        elif isinstance(raw, dict):
            raw = dict(raw)
            if "name" not in raw:
                raise UserError(f"the method block in {where} needs a name, e.g. method: {{name: siss, lam: 0.5}}")
            name, params = str(raw.pop("name")), raw
        elif raw is not None:
            raise UserError(f"method in {where} must be a name or a mapping with name: and its settings")
        args = args if args is not None else argparse.Namespace()
        cli_name = getattr(args, "method.name", None)
        if cli_name is not None and cli_name != name:
            name, params = cli_name, {}  # another method: the file's settings were for the one it named
        hints = typing.get_type_hints(METHODS[name]) if name in METHODS else {}
        for key in list(params):
            norm = _param_of(key)
            value = params.pop(key)
            kind = unwrap_optional(hints[norm]) if norm in hints and value is not None and value != AUTO else None
            params[norm] = coerce(value, kind, flag_of(norm))  # YAML reads 1e-3 (no dot) as a string
        for f in {f.name for c in METHODS.values() for f in dataclasses.fields(c)}:
            v = getattr(args, "method." + f, None)
            if v is not None:
                params[f] = v
        spec = cls(name, params)
        fields = {f.name: f for f in dataclasses.fields(METHODS[name])} if name in METHODS else {}
        for k, v in params.items():
            if v == AUTO and not (k in fields and fields[k].metadata.get("auto")):
                raise UserError(f"{flag_of(k)} takes a number, not 'auto'")
        spec.build(allow_auto=True)  # an unknown method or a setting it does not take fails before anything runs
        return spec


__all__ = ["METHODS", "Method", "MethodSpec", "Context", "GradStep", "StepBatch", "Terms", "make_method",
           "method_params"]
