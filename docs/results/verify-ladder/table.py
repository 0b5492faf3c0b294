"""The calibration table: each verified model's verdict beside its copy rate measured apart from the verification.

    python docs/results/verify-ladder/table.py LADDER > docs/results/verify-ladder/results.md

LADDER holds fast/ and full/ (run-mnist.sh), instance/ (run-instance.sh, then reverify.sh), own/
(run-own-data.sh, then reverify.sh) and old/ (the verdicts of the code before this calibration, on the same MNIST
models); every verification.json found is summarised into summary.json beside this script.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
POWER = HERE.parent / "bench-mnist-tshirt-power" / "cells"
#: the MNIST models' rates from the power table's cells (2,048 samples of 50-step DDPM, L2 10 to the T-shirt)
MNIST_TRUTH = {
    "base": ("pretrained-seed0", "the shipped base model"),
    "retrained": ("retrain-seed0", "the shipped retrained model"),
    "naive-300": ("naive-seed0", "naive deletion, 300 steps (seed 0)"),
    "siss-200": (None, "SISS lambda 0.5, 200 steps (seed 0; the demo's setting)"),
    "siss-300": ("siss-lambda0.5-seed0", "SISS lambda 0.5, 300 steps (seed 0; the paper's)"),
    "siss-900": (None, "SISS lambda 0.5, 900 steps (seed 0)"),
    "siss-nois-300": ("siss-nois-seed2", "SISS (No IS), 300 steps (seed 2)"),
    "retrack-50": ("retrack-seed0", "ReTrack, 50 steps of batch 128 (seed 0)"),
}
#: rates measured elsewhere for the two SISS models without a power-table cell
MNIST_OTHER = {
    "siss-200": "21 of the base model's 140 T-shirt seeds still T-shirts (decay curve, bench-mnist-tshirt-siss-decay)",
    "siss-900": "0/2048 = 0% (0-0.18%) (bench-mnist-tshirt-siss-decay)",
}


def pct(k, n):
    from diffunlearn.metrics.rates import binomial_ci

    lo, hi = binomial_ci(k, n)
    return f"{k}/{n} = {100 * k / n:.2g}% ({100 * lo:.2g}-{100 * hi:.2g}%)"


def read(path: Path) -> dict | None:
    try:
        v = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return v if v.get("status") == "ok" else None


def brief(v: dict) -> dict:
    """What the table and summary.json keep of a verification."""
    gen = next(d for d in v["verdicts"] if d["measure"] == "generation")
    t, f = gen.get("targeted"), gen["fresh"]
    return {"overall": v["overall"]["status"], "deletion": v["overall"]["deletion"],
            "measures": {d["measure"]: d["status"] for d in v["verdicts"]},
            "quality": {q["measure"]: q["status"] for q in v["quality"]},
            "targeted": None if t is None else [len(t["still_after"]), len(t["hits_before"]), t["seeds_searched"]],
            "fresh": [f["count"], f["n"]], "threshold": gen["threshold"]["per_item"],
            "twins": gen["threshold"].get("twins", []), "budget": v["budget"]["name"], "seconds": v.get("seconds")}


def cell(b: dict | None) -> str:
    if b is None:
        return "—"
    m = b["measures"]
    t = f"{b['targeted'][0]}/{b['targeted'][1]} targeted, " if b["targeted"] else ""
    twin = ", A has a near-duplicate" if b["twins"] else ""
    return (f"**{b['overall']}** (sim {m['similarity']}, loss {m['loss']}, NLL {m['nll']}, generation "
            f"{m['generation']}: {t}{b['fresh'][0]}/{b['fresh'][1]} fresh{twin}; {b['seconds']:.0f} s)")


def main(root: str) -> None:
    root = Path(root)
    summary = {}
    out = ["## MNIST T-Shirt (held-out reference: the data set's 500 held-out digits)", "",
           "| model | copy rate measured apart (2,048 samples) | fast | full | the previous verdicts (fast) |",
           "|---|---|---|---|---|"]
    for name, (c, words) in MNIST_TRUTH.items():
        if c:
            m = json.loads((POWER / c / "result.json").read_text())["metrics"]["tshirt_rate"]
            truth = pct(m["count"], m["n"])
        else:
            truth = MNIST_OTHER[name]
        row = {b: (lambda v: brief(v) if v else None)(read(root / b / name / "verification.json"))
               for b in ("fast", "full")}
        old = root / "old" / name / "verification.json"
        was = json.loads(old.read_text())["overall"]["status"] if old.is_file() else "—"
        summary[f"mnist/{name}"] = {"truth": truth, **row, "previous": was}
        out.append(f"| {words} | {truth} | {cell(row['fast'])} | {cell(row['full'])} | {was} |")
    truths = {}
    for line in (root / "instance" / "truth.jsonl").read_text().splitlines() if (root / "instance").is_dir() else []:
        r = json.loads(line)
        truths[(Path(r["model"]).name, r["forget"])] = pct(r["count"], r["n"])
    targets = sorted({k[1] for k in truths}, key=int)
    out += ["", "## instance-base, one target at a time (held-out reference: 128 digits never trained on)", "",
            "| target | base model's rate | SISS: rate / fast verdict | naive: rate / fast verdict | "
            "retrained: rate / fast verdict |", "|---|---|---|---|---|"]
    for t in targets:
        cells = []
        for m in ("siss", "naive", "retrain"):
            run = f"{m}-{t}-verify"
            v = read(root / "instance" / run / "verification.json")
            b = brief(v) if v else None
            summary[f"instance/{t}/{m}"] = {"truth": truths.get((f"{m}-{t}", t)), "fast": b}
            cells.append(f"{truths.get((f'{m}-{t}', t), '—')} / {cell(b)}")
        out.append(f"| {t} | {truths.get(('instance-base', t), '—')} | " + " | ".join(cells) + " |")
    own = root / "own"
    if own.is_dir():
        tr = {Path(json.loads(x)["model"]).name: json.loads(x) for x in (own / "truth.jsonl").read_text().splitlines()}
        out += ["", "## A data set made here, no held-out images (reference: the kept training images)", "",
                "| model | copy rate (2,048 samples) | fast verdict |", "|---|---|---|"]
        for m in ("base", "naive", "siss", "retrain"):
            run = f"{m}-verify"
            v = read(own / run / "verification.json")
            b = brief(v) if v else None
            truth = pct(tr[m]["count"], tr[m]["n"]) if m in tr else "—"
            summary[f"own/{m}"] = {"truth": truth, "fast": b}
            out.append(f"| {m} | {truth} | {cell(b)} |")
    (HERE / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
