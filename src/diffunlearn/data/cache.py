"""The on-disk cache: latents of latent models and decompressed ``.npz`` members, so that large data never has to sit
in memory. ``--cache-dir``, else ``$DIFFUNLEARN_CACHE``, else ``$XDG_CACHE_HOME/diffunlearn``
(``~/.cache/diffunlearn``).
Entries are ``.npy`` files named by a digest of what they were computed from; each is written beside its final name
and renamed into place, under a lock, so concurrent processes (``accelerate launch``) compute it once and a killed
run never leaves a torn entry. The cache is never inside a data folder: input data are never written to."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from ..errors import UserError

#: room kept free beyond an entry's size (file-system metadata, other writers)
MARGIN = 64 * 2 ** 20


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("DIFFUNLEARN_CACHE"):
        return Path(os.environ["DIFFUNLEARN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "diffunlearn"


def check_outside(cache: Path, data_root: Path | None) -> None:
    """Refuse a cache folder inside the data folder (input data are never written to)."""
    if data_root is None:
        return
    c, d = Path(os.path.realpath(cache)), Path(os.path.realpath(data_root))
    if c == d or d in c.parents:
        raise UserError(f"the cache folder {cache} is inside the data folder {data_root}: input data are never "
                        "written to; pass --cache-dir (or set DIFFUNLEARN_CACHE) to a folder outside it")


def ensure_free_space(folder: Path, nbytes: int, what: str) -> None:
    """Stop with a UserError when ``nbytes`` (plus a margin) do not fit in ``folder``'s file system."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < nbytes + MARGIN:
        raise UserError(f"{what} needs {(nbytes + MARGIN) / 2 ** 20:.0f} MB in {folder} (the file and "
                        f"{MARGIN // 2 ** 20} MB to spare) but only {free / 2 ** 20:.0f} MB are free: free space, or "
                        "pass --cache-dir (or set DIFFUNLEARN_CACHE) to a folder on a larger disk")


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock on ``path`` (a ``.lock`` file beside it) while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform: writes stay atomic, work may be repeated
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def publish(tmp: Path, final: Path) -> None:
    """fsync ``tmp`` and rename it to ``final`` (atomic: readers see the old entry or the complete new one)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def entry(kind: str, key: str, explicit: str | os.PathLike | None = None) -> Path:
    """The path of cache entry ``key`` of ``kind`` (``latents``, ``npz``, ``verify-search``)."""
    return cache_dir(explicit) / kind / f"{key}.npy"
