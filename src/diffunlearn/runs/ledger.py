"""The deletion ledger: an append-only, hash-chained record of every deletion request applied to a model.

``ledger.jsonl`` holds one JSON object per request: its index, the UTC time, what was removed (each image's name and
the SHA-256 of its float32 bytes in model space), the method and its settings, metrics before and after, the seconds
it took, and the :func:`~diffunlearn.model.state_hash` of the model before and after. Each line also holds
``prev_sha256``, the SHA-256 of the previous line's bytes (64 zeros for the first), so changing, removing or
reordering a line breaks the chain, and each request must start from the model the previous one produced.
Removing lines at the end keeps the chain intact; it is caught by checking the last line against the model itself
(the ledger travels inside the model directory, so a model and its ledger are checked together), and a run
directory's ledger must equal the copy inside its model. The hash of the last line (``summary.json``: ``ledger_head``,
and the ``ledger`` command's output) can be recorded elsewhere to anchor the whole chain.

Lines are appended with one write each, then flushed and fsynced. A kill can leave at most a partial last line (bytes
after the last newline); readers report it and ignore it, and nothing is ever appended after it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from . import _clean

LEDGER_NAME = "ledger.jsonl"
GENESIS = "0" * 64
FIELDS = {"request": int, "time": str, "removed": list, "count": int, "method": str, "settings": dict,
          "metrics_before": dict, "metrics_after": dict, "seconds": (int, float), "model_before": str,
          "model_after": str, "prev_sha256": str}


def line_hash(line: bytes) -> str:
    """SHA-256 of one ledger line's bytes, without its newline."""
    return hashlib.sha256(line).hexdigest()


@dataclass
class LedgerRead:
    """The whole lines of a ledger file (raw and parsed) and a description of a partial last line, if any."""

    path: Path
    lines: list[bytes] = field(default_factory=list)
    entries: list[dict] = field(default_factory=list)
    torn: str | None = None


def read_ledger(path: str | Path) -> LedgerRead:
    """Parse a ledger file. A partial last line (no newline) is reported in ``torn``, never parsed; a whole line
    that is not a JSON object is an error (lines are written whole, so it was altered)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read ledger {path}: {e.strerror or e}") from None
    *whole, tail = raw.split(b"\n")
    out = LedgerRead(path, whole)
    if tail:
        out.torn = (f"line {len(whole) + 1} of {path} is incomplete ({len(tail)} bytes without an end of line, "
                    "left by a run killed while writing it): it is not part of the ledger")
    for i, line in enumerate(whole, 1):
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise UserError(f"ledger {path} line {i} is not a JSON object: the ledger was altered")
        out.entries.append(obj)
    return out


def verify_ledger(ledger: LedgerRead, model_hash: str | None = None) -> None:
    """Check the chain (each line names the hash of the previous one), the request numbering, that each request
    starts from the previous request's model, and, given ``model_hash``, that the last request produced that model."""
    path = ledger.path
    if not ledger.entries:
        raise UserError(f"ledger {path} holds no complete entries")
    prev_line, prev = None, None
    for i, (line, e) in enumerate(zip(ledger.lines, ledger.entries), 1):
        wrong = [k for k, kind in FIELDS.items() if not isinstance(e.get(k), kind)]
        if not wrong and not all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                 and isinstance(r.get("sha256"), str) for r in e["removed"]):
            wrong = ["removed"]
        if wrong:
            raise UserError(f"ledger {path} line {i} lacks or mistypes {', '.join(wrong)}: the ledger was altered")
        expected = GENESIS if prev_line is None else line_hash(prev_line)
        if e["prev_sha256"] != expected:
            what = ("the first line must start the chain" if prev_line is None
                    else f"line {i - 1} was changed or removed")
            raise UserError(f"ledger {path} hash chain broken at line {i}: {what}")
        if e["request"] != i:
            raise UserError(f"ledger {path} line {i} is numbered request {e['request']}: "
                            "lines were removed or reordered")
        if e["count"] != len(e["removed"]):
            raise UserError(f"ledger {path} line {i} counts {e['count']} images but lists {len(e['removed'])}")
        if prev is not None and e["model_before"] != prev["model_after"]:
            raise UserError(f"ledger {path} request {i} did not start from the model request {i - 1} produced")
        prev_line, prev = line, e
    if model_hash is not None and model_hash != prev["model_after"]:
        raise UserError(f"the model's state hash {model_hash[:12]} is not the {prev['model_after'][:12]} the last "
                        f"entry of {path} (request {prev['request']}) ends at: the ledger does not describe this model "
                        "(truncated ledger, or a run killed between saving the model and logging the request)")


class Ledger:
    """Appends chained lines to a ledger file, which it creates or continues after checking it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lines: list[bytes] = []
        if self.path.exists():
            read = read_ledger(self.path)
            if read.torn:
                raise UserError(read.torn + "; nothing may be appended after it")
            if read.entries:
                verify_ledger(read)
            self.lines = read.lines

    def next_line(self, entry: dict) -> bytes:
        """The line recording ``entry`` as the next request: its index and the previous line's hash filled in."""
        prev = line_hash(self.lines[-1]) if self.lines else GENESIS
        record = {"request": len(self.lines) + 1, **entry, "prev_sha256": prev}
        return json.dumps(_clean(record)).encode()

    def contents(self, extra: bytes | None = None) -> str:
        """The ledger's text, optionally with one more line (for the copy saved with a model)."""
        return b"".join(line + b"\n" for line in self.lines + ([extra] if extra else [])).decode()

    def append(self, line: bytes) -> None:
        """Append one line with a single write, then flush and fsync (and fsync the folder on creation)."""
        created = not self.path.exists()
        with open(self.path, "ab") as f:
            f.write(line + b"\n")
            f.flush()
            os.fsync(f.fileno())
        if created:
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.lines.append(line)
