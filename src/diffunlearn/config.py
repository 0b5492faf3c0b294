"""Config dataclasses as the command line. A command's settings are a dataclass whose fields are settings or
blocks: a nested dataclass (e.g. ``trainer:``) is a block of its own in YAML and an argument group in ``--help``; a
field whose type has ``add_arguments``/``resolve`` (the method block) makes its own flags. Each field's metadata is
its ``--help``; ``--config preset.yaml`` sets defaults that command-line flags override; unknown keys fail at load
time, with the nearest known key suggested."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from importlib import resources
from pathlib import Path

import yaml

from .errors import UserError

#: the settings that many commands share, declared once (help, default); a config declares one with
#: ``threads: int = run_field("threads")`` and may change its default, or its help where the command means more
RUN_FIELDS: dict[str, tuple[str, object]] = {
    "out": ("run directory to create; the model goes to <out>/model", ""),
    "bench_out": ("benchmark directory (re-runs resume)", ""),
    "threads": ("CPU threads for torch (0: torch's default)", 0),
    "allow_pickle": ("allow loading pickle weights (.bin/.ckpt): only for files you trust", False),
    "overwrite": ("replace a non-empty output directory", False),
    "cache_dir": ("folder for cached latents of latent models and decompressed .npz arrays (default: "
                  "$DIFFUNLEARN_CACHE or ~/.cache/diffunlearn)", ""),
}


def run_field(name: str, default=dataclasses.MISSING, help: str | None = None):
    """A dataclass field for a shared setting of :data:`RUN_FIELDS`: one help text and default for every command."""
    text, value = RUN_FIELDS[name]
    return dataclasses.field(default=value if default is dataclasses.MISSING else default,
                             metadata={"help": help or text})


def unwrap_optional(kind):
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if typing.get_origin(kind) in (typing.Union, type(int | None)) and len(args) == 1 else kind


def flag_of(f: dataclasses.Field) -> str:
    """A field's command-line flag: its metadata's ``flag``, else ``--field-name``."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_flag(parser, flag: str, dest: str, kind, help_: str) -> None:
    """One optional flag whose absence is None (so a config file or a default can fill it): ``--x/--no-x`` for
    booleans, a typed value otherwise."""
    if kind is bool:
        parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_)
    else:
        parser.add_argument(flag, dest=dest, type=kind, default=None, metavar=flag[2:].upper().replace("-", "_"),
                            help=help_)


def _is_block(kind) -> bool:
    return hasattr(kind, "add_arguments") and hasattr(kind, "resolve")


def add_dataclass_args(parser, cls, defaults=None) -> None:
    """One flag per setting (``--name``), blocks as argument groups; ``defaults`` (an instance) is shown in help."""
    defaults = cls() if defaults is None else defaults
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = unwrap_optional(hints[f.name])
        if _is_block(kind):
            kind.add_arguments(parser.add_argument_group(f"{f.name} (YAML block {f.name}:)"))
        elif dataclasses.is_dataclass(kind):
            doc = (kind.__doc__ or "").strip().splitlines()[0] if kind.__doc__ else ""
            add_dataclass_args(parser.add_argument_group(f"{f.name} (YAML block {f.name}:)", doc),
                               kind, getattr(defaults, f.name))
        else:
            flag = flag_of(f)
            default = getattr(defaults, f.name)
            help_ = f.metadata.get("help", "")
            if default not in ("", None) and kind is not bool:
                help_ += f" (default: {default})"
            add_flag(parser, flag, f.name, kind, help_)


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
    folder = name.rpartition("/")[0]  # a benchmark's presets live in presets/bench/
    place = resources.files("diffunlearn.presets")
    place = place.joinpath(folder) if folder else place
    known = sorted((folder + "/" if folder else "") + x.name[:-5] for x in place.iterdir()
                   if x.name.endswith(".yaml")) if place.is_dir() else []
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


def build_config(cls, args: argparse.Namespace | None = None, section: str | None = None, raw: dict | None = None,
                 where: str = "the config", base=None):
    """Defaults (or ``base``, an instance of ``cls``) < ``--config`` file (or ``raw``) < command-line flags. Unknown
    keys in the file are an error."""
    args = args if args is not None else argparse.Namespace()
    if raw is None and getattr(args, "config", None):
        raw = load_yaml(args.config)
        where = args.config
        if section and isinstance(raw.get(section), dict):
            raw = raw[section]
    return _build(cls, raw or {}, args, cls() if base is None else base, where)


def _build(cls, raw: dict, args, base, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    aliases = {flag_of(f)[2:].replace("-", "_"): f.name for f in names.values()}
    given: dict = {}
    for k, v in raw.items():
        key = str(k).replace("-", "_")
        key = aliases.get(key, key)
        if key not in names:
            raise UserError(f"unknown option {k!r} in {where}{_suggest(key, cls)}")
        given[key] = v
    values: dict = {}
    for name, f in names.items():
        kind = unwrap_optional(hints[name])
        if _is_block(kind):
            values[name] = kind.resolve(given.get(name), args, getattr(base, name), where)
            continue
        if dataclasses.is_dataclass(kind):
            sub = given.get(name) or {}
            if not isinstance(sub, dict):
                raise UserError(f"{name} in {where} must be a mapping of option: value")
            values[name] = _build(kind, sub, args, getattr(base, name), where)
            continue
        v = getattr(args, name, None)
        v = given[name] if v is None and name in given else v
        if v is None:
            continue
        values[name] = coerce(v, kind, flag_of(f))
    return dataclasses.replace(base, **values)


def coerce(value, kind, flag: str):
    """``value`` as a ``kind`` (int, float, str or bool; other kinds pass through): YAML reads ``1e-3`` as a string."""
    if kind in (int, float, str, bool) and not isinstance(value, kind):
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise UserError(f"option {flag} must be {kind.__name__}, got {value!r}") from None
    return value


def _suggest(key: str, cls) -> str:
    """Where a mistyped key probably belongs: the nearest option, in this block or in a nested one."""
    hints = typing.get_type_hints(cls)
    places: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        places[f.name] = f.name
        kind = unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(kind) and not _is_block(kind):
            for g in dataclasses.fields(kind):
                places.setdefault(g.name, f"{f.name}: {{{g.name}: ...}}")
    if key in places and places[key] != key:
        return f": it belongs in a block, as {places[key]}"
    close = difflib.get_close_matches(key, list(places), n=1)
    return (f": did you mean {places[close[0]]!r}?" if close
            else f": known are {', '.join(f.name for f in dataclasses.fields(cls))}")


def to_dict(cfg) -> dict:
    """A config as nested plain data (as YAML would hold it); blocks give their own ``to_dict``."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if hasattr(v, "to_dict"):
            v = v.to_dict()
        elif dataclasses.is_dataclass(v):
            v = to_dict(v)
        out[f.name] = v
    return out


def flatten(d: dict, prefix: str = "", sep: str = ".") -> dict:
    """``{"trainer": {"steps": 3}}`` -> ``{"trainer.steps": 3}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}{sep}", sep))
        else:
            out[prefix + k] = v
    return out


def config_command(parser: argparse.ArgumentParser, cls, run, section: str | None = None) -> None:
    """A command whose options are the fields of ``cls``, plus ``--config`` and ``--dry-run``; runs ``run(cfg)``."""
    add_dataclass_args(parser, cls)
    parser.add_argument("--config", help="a YAML preset (built-in name or file); command-line flags override it")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")

    def handler(args):
        cfg = build_config(cls, args, section)
        if hasattr(cfg, "validate"):
            cfg.validate()  # an unknown method or a setting it does not take fails before anything runs
        if args.dry_run:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        result = run(cfg)
        # a command may end with a documented non-zero status (unlearn --until removed: not removed, quality guard)
        if isinstance(result, dict):
            return int(result.get("exit_status") or 0)
        return int(getattr(result, "exit_code", 0))

    parser.set_defaults(func=handler)
