"""Config dataclasses as the command line: each field's metadata is its ``--help``; ``--config preset.yaml`` sets
defaults that command-line flags override; unknown keys fail at load time."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from importlib import resources
from pathlib import Path

import yaml

from .errors import UserError


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        kind = _unwrap_optional(hints[f.name])
        help_ = f.metadata.get("help", "")
        aliases = [flag]
        if kind is bool:
            parser.add_argument(*aliases, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(*aliases, dest=f.name, type=kind, default=None, metavar=flag[2:].upper().replace("-", "_"),
                                help=help_)


def _unwrap_optional(kind):
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if typing.get_origin(kind) in (typing.Union, type(int | None)) and len(args) == 1 else kind


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what> (see --help)`` and exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def preset_path(name: str) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    res = resources.files("diffunlearn.presets").joinpath(f"{name}.yaml")
    if res.is_file():
        return Path(str(res))
    known = sorted(x.name[:-5] for x in resources.files("diffunlearn.presets").iterdir() if x.name.endswith(".yaml"))
    raise UserError(f"unknown preset or config file {name!r}: known presets are {', '.join(known)}")


def load_yaml(name: str) -> dict:
    path = preset_path(name)
    try:
        obj = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} must hold a mapping of option: value")
    return obj


def build_config(cls, args: argparse.Namespace, section: str | None = None):
    """Defaults < ``--config`` file < command-line flags. Unknown keys in the file are an error."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    aliases = {f.metadata["flag"][2:].replace("-", "_"): f.name for f in names.values() if "flag" in f.metadata}
    values: dict = {}
    if getattr(args, "config", None):
        raw = load_yaml(args.config)
        if section and isinstance(raw.get(section), dict):
            raw = raw[section]
        for k, v in raw.items():
            key = k.replace("-", "_")
            key = aliases.get(key, key)
            if key not in names:
                raise UserError(f"unknown option {k!r} in {args.config}: known are {', '.join(names)}")
            values[key] = v
    for name in names:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    hints = typing.get_type_hints(cls)
    for k, v in list(values.items()):
        kind = _unwrap_optional(hints[k])
        if kind in (int, float, str, bool) and v is not None and not isinstance(v, kind):
            try:
                values[k] = kind(v)
            except (TypeError, ValueError):
                raise UserError(f"option {k} must be {kind.__name__}, got {v!r}") from None
    return cls(**values)
