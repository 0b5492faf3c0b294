"""The table of docs/results/until-default/README.md from the runs of run.sh.

    python docs/results/until-default/table.py runs/until-default > results.md
"""

import json
import sys
from pathlib import Path

root = Path(sys.argv[1])
truth = {Path(r["model"]).parent.name: r for r in map(json.loads, (root / "truth.jsonl").read_text().splitlines())}
print("| seed | scaling_norm (auto) | outcome | stopped at step | gate seeds still / drawing A before | verdict | "
      "quality (similarity, loss) | fresh (verify) | T-shirts in 2,048 DDPM samples (95% CI) | training s | "
      "checks s | confirming s | search s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for run in sorted(p for p in root.iterdir() if (p / "summary.json").is_file()):
    s = json.loads((run / "summary.json").read_text())
    v = json.loads((run / "verification.json").read_text())
    u = s["until"]
    last = u["checks"][-1]
    gen = next(x for x in v["verdicts"] if x["measure"] == "generation")
    train = sum(json.loads(line).get("seconds", 0) for line in (run / "log.jsonl").read_text().splitlines())
    confirm = sum(c["seconds"] for c in u["checks"] if "verification" in c)
    checks = sum(c["seconds"] for c in u["checks"]) - confirm
    t = truth.get(run.name)
    rate = (f"{t['count']}/{t['n']} ({100 * t['ci95'][0]:.2f}-{100 * t['ci95'][1]:.2f}%)" if t else "not measured")
    search = u.get("search_seconds")
    print(f"| {run.name.removeprefix('seed')} | {s['scaling_norm_calibration']['scaling_norm']:.3f} | {u['outcome']} | "
          f"{u['stopped_at']} | {last['targeted_still']}/{u['targeted_seeds']} | {v['overall']['status']} | "
          f"{', '.join(q['status'] for q in v['quality'] if q['measure'] != 'nll')} | "
          f"{gen['fresh']['count']}/{gen['fresh']['n']} | {rate} | {train:.0f} | {checks:.0f} | {confirm:.0f} | "
          f"{'—' if search is None else f'{search:.0f}'} |")
