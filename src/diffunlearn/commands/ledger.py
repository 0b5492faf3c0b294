"""``diffunlearn ledger DIR``: verify a deletion ledger (its hash chain, and that it ends at the model beside it),
then print it as a table for a data-protection officer."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..model import load_model, state_hash
from ..runs.ledger import LEDGER_NAME, line_hash, read_ledger, verify_ledger


def _short(h: str) -> str:
    return h[:12]


def _pair(before: dict, after: dict, key: str, fmt: str = ".3f") -> str:
    a, b = before.get(key), after.get(key)
    return f"{a:{fmt}} -> {b:{fmt}}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "-"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def format_ledger(entries: list[dict]) -> str:
    """A table of the requests for a data-protection officer, then every removed image with its content hash."""
    first = entries[0]
    sim = first["metrics_after"].get("similarity", "?")
    quality = first["metrics_after"].get("quality_measure", "quality")
    rows = [["#", "time (UTC)", "removed", "names", "method", f"similarity ({sim})", quality, "MIA AUC", "seconds",
             "model before -> after"]]
    for e in entries:
        names = [r["name"] for r in e["removed"]]
        shown = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
        b, a = e["metrics_before"], e["metrics_after"]
        rows.append([str(e["request"]), e["time"], str(e["count"]), shown, e["method"],
                     _pair(b, a, "similarity_mean"), _pair(b, a, "quality", ".4g"), _pair(b, a, "membership_auc"),
                     f"{e['seconds']:.1f}", f"{_short(e['model_before'])} -> {_short(e['model_after'])}"])
    images = [["request", "name", "sha256 of the image (float32, model space)"]]
    images += [[str(e["request"]), r["name"], r["sha256"]] for e in entries for r in e["removed"]]
    total = sum(e["count"] for e in entries)
    notes = (f"similarity: noise-and-denoise similarity of the request's images (higher: the model still reproduces "
             f"them); {quality}: lower is better; MIA AUC: membership-inference AUC of the request's images against "
             "held-out images (0.5: indistinguishable from unseen data)")
    return "\n\n".join([_table(rows), notes, f"{total} images removed:", _table(images)])


def _locate(target: Path) -> tuple[Path, Path | None]:
    """(ledger file, model directory or None) for a model or run directory, or a ledger file in one."""
    if not target.exists():
        raise UserError(f"{target} does not exist")
    ledger, folder = (target, target.parent) if target.is_file() else (target / LEDGER_NAME, target)
    if not ledger.is_file():
        raise UserError(f"no {LEDGER_NAME} in {target}: pass a run or model directory written by `unlearn --requests`")
    for model in (folder, folder / "model"):
        if (model / "model_index.json").is_file() or (model / "unet").is_dir():
            return ledger, model
    return ledger, None


def run_ledger(target: str) -> int:
    """``diffunlearn ledger DIR``: verify the ledger (and that it ends at the model beside it), then print it."""
    path, model_dir = _locate(Path(target))
    ledger = read_ledger(path)
    model_hash = state_hash(load_model(model_dir).unet) if model_dir is not None else None
    verify_ledger(ledger, None if ledger.torn else model_hash)  # a torn run's model is one request ahead
    print(f"Deletion ledger {path}\n")
    print(format_ledger(ledger.entries))
    if ledger.torn:
        raise UserError(ledger.torn + "; the complete lines above verify")
    copy = model_dir / LEDGER_NAME if model_dir is not None and model_dir != path.parent else None
    if copy is not None and copy.is_file() and copy.read_bytes() != path.read_bytes():
        raise UserError(f"{path} and its copy {copy} differ: one of them was altered")
    last = ledger.entries[-1]
    checked = (f"the model in {model_dir} has the state hash the last request ends at ({_short(model_hash)})"
               if model_hash else "no model beside the ledger: its state hash was not checked")
    head = _short(line_hash(ledger.lines[-1]))
    print(f"\nverified: {len(ledger.entries)} requests, hash chain intact (last line {head}), each request "
          f"starts from the previous one's model ({_short(last['model_after'])}); {checked}")
    return 0
