"""Models shipped inside the package (each made by a documented ``diffunlearn`` command; see its README.md)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import UserError


def pretrained_root() -> Path:
    return Path(str(resources.files("diffunlearn") / "pretrained"))


def available() -> list[str]:
    root = pretrained_root()
    return (sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
            if root.is_dir() else [])


def pretrained_dir(name: str) -> Path:
    path = pretrained_root() / name
    if not path.is_dir():
        raise UserError(f"no shipped model named {name!r}: shipped are {', '.join(available()) or 'none'}")
    return path
