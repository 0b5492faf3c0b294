"""Run directories: the resolved configuration, a JSONL log, the model and ``summary.json`` in one place."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

from ..console import logger
from ..errors import UserError

say = logger(__name__).info


def atomic_dir(out: str | Path, write) -> Path:
    """Fill a temporary folder beside ``out`` with ``write(folder)``, fsync every file, then rename it to ``out``.

    ``out`` appears only when complete. An existing ``out`` is moved aside, not deleted, until the new folder is in
    place, so some complete version is on disk at every moment; on any failure the old one is put back."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a model directory gets the modes diffusers gives
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.previous-", dir=out.parent))
            os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old / out.name, out)
                old.rmdir()
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_outside_model(out: str | Path, model_dir: str | Path, flag: str = "--out") -> None:
    """``out`` must neither be nor contain nor lie inside the input model's directory: the input is never modified."""
    o, m = Path(out).resolve(), Path(model_dir).resolve()
    if o == m or m in o.parents or o in m.parents:
        raise UserError(f"{flag} must not contain or be inside the model directory {m}: the input is never modified")


def prepare_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Check (without writing anything) that ``out`` may receive a run's results."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        unfinished = (out / "config.yaml").is_file() and not (out / "summary.json").is_file()
        # a single request's checkpoint, a deletion request's, or the finished requests of a --requests run
        kept = ((out / "checkpoint.pt").is_file() or any(out.glob("checkpoint-request-*.pt"))
                or (out / "ledger.jsonl").is_file())
        if not overwrite and unfinished and kept:
            raise UserError(f"output directory {out} holds an interrupted run with a checkpoint or finished deletion "
                            "requests: pass --resume to continue it, or choose another --out (--overwrite would "
                            "discard it)")
        if not overwrite and unfinished:
            raise UserError(f"output directory {out} holds a run that stopped before its first checkpoint: pass "
                            "--resume to start it again from step 1, --overwrite to replace it, or another --out")
        if not overwrite:
            raise UserError(f"output directory {out} exists and is not empty: choose another --out or pass --overwrite")
        if not (out / "config.yaml").is_file():
            raise UserError("--overwrite replaces only a previous run directory (one holding config.yaml); "
                            f"{out} is not one")
    check_writable(out)
    return out


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent."""
    probe = path.absolute()
    while not probe.exists():
        probe = probe.parent
    return probe


def check_writable(out: str | Path) -> None:
    """Write (and remove) an empty folder where ``out`` would be created: permission bits do not say it all (a
    read-only file system, a root user, a quota)."""
    probe = _existing(Path(out))
    if not probe.is_dir():
        raise UserError(f"cannot create {out}: {probe} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".diffunlearn-probe-", dir=probe))
    except OSError as e:
        raise UserError(f"cannot write to {probe} ({e.strerror}): choose another --out") from None


def _mib(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{max(n, 1) / 2**10:.0f} KiB"


#: room kept free beside a run's estimated needs: logs, the verification's samples and report
SPACE_MARGIN = 64 * 2**20


def check_space(out: str | Path, needs: dict[str, int]) -> None:
    """Refuse to start when the disk holding ``out`` has less free space than ``needs`` (bytes by what they are
    for) plus :data:`SPACE_MARGIN`: a run that fills the disk hours in would lose its work."""
    probe = _existing(Path(out))
    free = shutil.disk_usage(probe).free
    total = sum(needs.values()) + SPACE_MARGIN
    if free < total:
        parts = ", ".join(f"{what} {_mib(n)}" for what, n in needs.items() if n)
        raise UserError(f"not enough free space in {probe}: the run needs about {_mib(total)} ({parts}, margin "
                        f"{_mib(SPACE_MARGIN)}) and {_mib(free)} is free; free space or choose another --out")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _revive(v):
    if isinstance(v, str) and v in _NONFINITE:
        return _NONFINITE[v]
    if isinstance(v, dict):
        return {k: _revive(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_revive(x) for x in v]
    return v


def read_json(path: Path):
    """Reads what ``write_json`` wrote: the non-finite floats it stored as "nan", "inf", "-inf" come back as floats."""
    return _revive(json.loads(Path(path).read_text()))


def write_json(path: Path, obj, indent: int = 2) -> None:
    """Writes ``obj`` to ``path`` atomically: readers see the old file or the whole new one, never a torn one.

    The temporary name carries the process id, so two runs sharing a directory (two benchmark rows started
    side by side) never replace each other's half-written file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=indent) + "\n")
    tmp.replace(path)


def step_printer(log, steps: int, every: int = 1):
    """A trainer ``log`` callback: passes every step's record to ``log`` and prints a progress line (loss terms,
    gradient norm, seconds) every ``every`` steps and at the last of ``steps``."""
    from ..tracking import Progress

    progress = Progress(steps, every)

    def on_step(rec: dict) -> None:
        log(rec)
        line = progress.line(rec["step"], rec, [k for k in rec if k.startswith("loss_")] + ["grad_norm", "seconds"])
        if line:
            say(line)

    return on_step


def _record(line: str) -> dict | None:
    """A log line's record with its integer ``step`` (and ``request``, if any), or None for a line torn by a kill."""
    try:
        rec = json.loads(line)
        rec["step"] = int(rec["step"])
        if "request" in rec:
            rec["request"] = int(rec["request"])
        return rec
    except (ValueError, KeyError, TypeError):
        return None


class RunDir:
    """Creates the run directory and writes its files; the model goes to ``<out>/model``."""

    def __init__(self, out: str | Path, config: dict, overwrite: bool = False, resume_from: int | None = None,
                 keep: Callable[[dict], bool] | None = None):
        """``resume_from``: continue an existing run whose state is that of step ``resume_from`` (the log keeps only
        the steps up to it); ``keep``: continue one whose log keeps the records ``keep`` accepts (deletion requests:
        those of the finished requests); otherwise create the directory (replacing it only with ``overwrite``)."""
        self.path = Path(out)
        if keep is None and resume_from is not None:
            keep = lambda rec: rec["step"] <= resume_from  # noqa: E731
        if keep is None:
            prepare_out_dir(out, overwrite)
            if overwrite and self.path.is_dir():
                import shutil

                shutil.rmtree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "config.yaml").write_text(yaml.safe_dump(_clean(config), sort_keys=False))
        else:
            log = self.path / "log.jsonl"
            lines = log.read_text().splitlines() if log.exists() else []
            kept = [line for line in lines if (rec := _record(line)) is not None and keep(rec)]
            log.write_text("".join(line + "\n" for line in kept))
        self._log = open(self.path / "log.jsonl", "a", buffering=1)
        self.started = time.time()

    def remove(self) -> None:
        """Delete the run directory this object created (a run that failed before training anything)."""
        self._log.close()
        shutil.rmtree(self.path, ignore_errors=True)

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def log(self, record: dict) -> None:
        self._log.write(json.dumps(_clean(record)) + "\n")

    def finish(self, summary: dict) -> None:
        summary = {**summary, "wall_seconds": round(time.time() - self.started, 2)}
        write_json(self.path / "summary.json", summary)
        self._log.close()
