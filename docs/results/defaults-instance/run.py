"""One command for every target of instance-base: the closed loop with unlearn's defaults.

    python docs/results/defaults-instance/run.py OUT_DIR [TARGETS] [--tutorial]

runs, for each target (default: 0, 4, ..., 60), the default command `diffunlearn unlearn --model instance-base
--data instance-digits --forget T --until removed` (SISS, the NegGrad norm measured at the model, the trainer's
defaults); with --tutorial the tutorial's SISS settings instead (lr 1e-3, batch 32, a check every 20 of at most 200
steps). Then it writes OUT_DIR/results.md and results.json from each run's summary.json and verification.json.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

tutorial = "--tutorial" in sys.argv
argv = [a for a in sys.argv if a != "--tutorial"]
out = Path(argv[1])
targets = [int(t) for t in argv[2].split(",")] if len(argv) > 2 else list(range(0, 64, 4))
out.mkdir(parents=True, exist_ok=True)
rows = []
for t in targets:
    run = out / f"target-{t}"
    cmd = ["diffunlearn", "unlearn", "--model", "instance-base", "--data", "instance-digits", "--forget", str(t),
           "--until", "removed", "--threads", "1", "--out", str(run)]
    if tutorial:
        cmd += ["--lr", "1e-3", "--batch-size", "32", "--max-steps", "200", "--check-every", "20"]
    if not (run / "summary.json").is_file():
        t0 = time.time()
        rc = subprocess.run(cmd, capture_output=True, text=True).returncode
        wall = time.time() - t0
    else:
        rc, wall = None, None
    s = json.loads((run / "summary.json").read_text())
    v = json.loads((run / "verification.json").read_text())
    gen = next(x for x in v["verdicts"] if x["measure"] == "generation")
    checks = s["until"]["checks"]
    train_s = sum(json.loads(line).get("seconds", 0) for line in (run / "log.jsonl").read_text().splitlines())
    rows.append({"target": t, "exit": rc, "wall_s": round(wall, 1) if wall else None,
                 "outcome": s["until"]["outcome"], "saved_step": s["until"]["model_is_step"],
                 "train_s": round(train_s, 1), "checks_s": round(sum(c.get("seconds", 0) for c in checks), 1),
                 "scaling_norm": round(s["scaling_norm_calibration"]["scaling_norm"], 4),
                 "verdict": v["overall"]["status"],
                 "quality": [q["status"] for q in v["quality"] if q["measure"] != "nll"],
                 "fresh": f"{gen['fresh']['count']}/{gen['fresh']['n']}",
                 "targeted": f"{len(gen['targeted']['still_after'])}/{len(gen['targeted']['hits_before'])}"})
    print(rows[-1], flush=True)
(out / "results.json").write_text(json.dumps(rows, indent=1))
lines = ["| target | scaling_norm (auto) | outcome | saved step | verdict | quality (similarity, loss) | fresh | "
         "targeted still / hits | training s | checks s | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['target']} | {r['scaling_norm']} | {r['outcome']} | {r['saved_step']} | {r['verdict']} | "
                 f"{', '.join(r['quality'])} | {r['fresh']} | {r['targeted']} | {r['train_s']} | {r['checks_s']} | "
                 f"{r['wall_s']} |")
(out / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
