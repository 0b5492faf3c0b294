"""Compute to a verified deletion: the closed loop against fixed step counts and against retraining.

    python docs/results/until-default/cost.py RUNS_DIR [INSTANCE_RUNS_DIR] > cost.md

Measures, in this one process's session and at one thread, the seconds per step of SISS (unlearn's defaults) and of
training (the shipped models' own recipes), two rounds interleaved so that both see the same machine; then reads the
until-removed runs in RUNS_DIR (MNIST T-Shirt, run.sh) and INSTANCE_RUNS_DIR (instance-base, defaults-instance's
run.py) and prints what each way to a deletion costs, in seconds at one thread and as a ratio to the loop. The
timings are kept in RUNS_DIR/cost-timings.json: a second call makes the table again from them.
"""

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROUNDS, STEPS = 2, {"mnist": 60, "instance": 200}
MODELS = {"mnist": ("mnist-tshirt-base", "mnist-tshirt", "default", 3500, ["--lr", "1e-3"]),
          "instance": ("instance-base", "instance-digits", "7", 2500, ["--lr", "2e-3", "--warmup", "100",
                                                                       "--arch", "toy-small"])}


def run(cmd):
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def step_seconds(tmp: Path, name: str, kind: str, k: int) -> float:
    model, data, forget, _, train_flags = MODELS[name]
    out = tmp / f"{name}-{kind}-{k}"
    n = STEPS[name]
    if kind == "siss":
        run(["diffunlearn", "unlearn", "--model", model, "--data", data, "--forget", forget, "--steps", str(n),
             "--verify", "off", "--checkpoint-every", "0", "--threads", "1", "--out", str(out)])
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return statistics.median(r["seconds"] for r in log[1:])  # the first step warms up
    run(["diffunlearn", "train", "--data", data, "--forget", forget, "--steps", str(n), "--batch-size", "64",
         *train_flags, "--seed", "0", "--threads", "1", "--log-every", str(n), "--out", str(out)])
    return json.loads((out / "summary.json").read_text())["train_seconds"] / n


def loop_runs(folder: Path) -> list[dict]:
    rows = []
    for summary in sorted(folder.glob("*/summary.json")):
        s = json.loads(summary.read_text())
        if "until" not in s:
            continue
        u = s["until"]
        log = [json.loads(line) for line in (summary.parent / "log.jsonl").read_text().splitlines()]
        confirm = sum(c["seconds"] for c in u["checks"] if "verification" in c)
        rows.append({"run": summary.parent.name, "outcome": u["outcome"], "steps": u["stopped_at"],
                     "train_s": sum(r.get("seconds", 0) for r in log),
                     "checks_s": sum(c["seconds"] for c in u["checks"]) - confirm, "confirm_s": confirm,
                     "search_s": u.get("search_seconds")})
    return rows


def main():
    runs = [Path(a) for a in sys.argv[1:]]
    names = ["mnist", "instance"][:len(runs)]
    saved = runs[0] / "cost-timings.json"  # the timings of an earlier call, so the table can be made again
    if saved.is_file():
        times = {tuple(k.split(":")): v for k, v in json.loads(saved.read_text()).items()}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            times = {(n, kind): [] for n in names for kind in ("siss", "train")}
            for k in range(ROUNDS):
                for n in names:
                    for kind in ("siss", "train"):
                        times[n, kind].append(step_seconds(Path(tmp), n, kind, k))
        saved.write_text(json.dumps({f"{n}:{kind}": v for (n, kind), v in times.items()}, indent=1))
    print("| model | run | outcome | steps | training s | checks s (% of training) | confirming verification s | "
          "gate search s | loop total s | fixed 300 s | fixed 600 s | retrain s | retrain / loop |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, folder in zip(names, runs):
        siss = statistics.median(times[n, "siss"])
        train = statistics.median(times[n, "train"])
        for r in loop_runs(folder):
            search = r["search_s"] or 0.0
            loop = r["train_s"] + r["checks_s"] + r["confirm_s"] + search
            # the others at the loop run's own step time, each with one fast verification (its search: the
            # budget's 512 of the loop's 2,048 seeds); retraining at the training/SISS step ratio measured here
            per = r["train_s"] / max(1, r["steps"] or 1)
            verify = r["confirm_s"] + search * 512 / 2048
            fixed = {s: s * per + verify for s in (300, 600)}
            retrain = MODELS[n][3] * train * per / siss + verify
            print(f"| {n} | {r['run']} | {r['outcome']} | {r['steps']} | {r['train_s']:.0f} | {r['checks_s']:.0f} "
                  f"({100 * r['checks_s'] / r['train_s']:.1f}%) | {r['confirm_s']:.0f} | {search:.0f} | {loop:.0f} | "
                  f"{fixed[300]:.0f} | {fixed[600]:.0f} | {retrain:.0f} | {retrain / loop:.1f} |")
    print()
    for n in names:
        print(f"- {n}: SISS step {statistics.median(times[n, 'siss']):.3f} s, training step "
              f"{statistics.median(times[n, 'train']):.3f} s (medians of {ROUNDS} interleaved rounds, one thread); "
              f"retraining = {MODELS[n][3]} training steps (the shipped recipe)")


if __name__ == "__main__":
    main()
