"""``diffunlearn bench scale``: real-size models through the real commands on this machine.

It builds, from the published configs (:mod:`.scale_models`), a DDPM of ``google/ddpm-celebahq-256``'s shape (114 M
parameters) and a Stable Diffusion v1.4-shaped directory (860 M UNet, VAE, 123 M CLIP text encoder) with seeded
random weights, writes a synthetic CelebA-HQ-sized image folder, and runs each row as the real ``diffunlearn``
command in a fresh process (:mod:`.scale_probe`): SISS ``unlearn`` at the paper's CelebA settings, a two-request
``unlearn --requests`` run with its ledger, ``sample``, and on Stable Diffusion ``prompt build``, ``prompt unlearn``
(fp32 AdamW, 8-bit AdamW, 8-bit AdamW with a fixed SISS multiplier) and ``detect``.

Per row: time from launch to the end of the first unit (optimiser step or UNet forward), seconds per unit after it,
the process's peak resident memory (``wait4``'s ``ru_maxrss``), the FLOPs of one unit (FlopCounterMode on the second
unit of the real command) and what that unit would take on one A100 or H100 at a stated utilisation of their bf16
dense peak: arithmetic on the measured FLOPs, a projection, not a measurement. Before each row the memory it needs is
estimated; a row runs only when ``MemAvailable`` leaves ``--headroom-gb`` after it (waiting up to ``--wait-minutes``),
else it is reported as not run, with both numbers. Linux only (``/proc/meminfo``, ``wait4``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..errors import UserError

GB = 2**30
#: bf16 dense peak of one accelerator, FLOP/s (vendor data sheets)
PEAKS = {"A100": 312e12, "H100": 989e12}
#: the rows, in the order they run (the heaviest-evaluated one last)
ROWS = ("ddpm unlearn", "ddpm sample", "sd prompt build", "sd detect", "sd prompt unlearn",
        "sd prompt unlearn 8-bit superfactor", "sd prompt unlearn 8-bit", "ddpm unlearn --requests")
#: activation allowance of the estimates (gradient checkpointing, batch 1), bytes: a guess the measured peak checks
ACTIVATIONS = {"ddpm": 2 * GB, "sd": 2 * GB}


@dataclass
class ScaleConfig:
    out: str = field(default="runs/bench-scale", metadata={"help": "output directory (scale.md, scale.json, runs/)"})
    cache: str = field(default="", metadata={"help": "where the built models and images are kept and reused "
                                                     "(default: <out>/cache)"})
    n: int = field(default=30000, metadata={"help": "synthetic 256x256 training images (CelebA-HQ has 30000; the "
                                                    "unlearn rows hold them in memory as float32: 0.75 MiB each)"})
    rows: str = field(default="all", metadata={"help": "comma-separated rows to run, or all: " + ", ".join(ROWS)})
    steps: int = field(default=3, metadata={"help": "unlearn: optimiser steps (the first is warm-up)"})
    grad_accum: int = field(default=4, metadata={"help": "unlearn: micro-batches of 1 image per step"})
    request_steps: int = field(default=2, metadata={"help": "unlearn --requests: steps per request (batch 1)"})
    request_grad_accum: int = field(default=1, metadata={"help": "unlearn --requests: micro-batches per step"})
    sample_steps: int = field(default=5, metadata={"help": "denoising steps of sample, prompt build and detect"})
    sd_steps: int = field(default=2, metadata={"help": "prompt unlearn: optimiser steps (batch 1)"})
    utilisation: float = field(default=0.4, metadata={"help": "share of the accelerators' bf16 peak in the projection"})
    headroom_gb: float = field(default=3.0, metadata={"help": "memory left free beside each row's estimate"})
    wait_minutes: float = field(default=10.0, metadata={"help": "wait this long for memory before not running a row"})
    seed: int = field(default=0, metadata={"help": "seed of the random weights and the images"})
    threads: int = field(default=1, metadata={"help": "CPU threads of every command"})
    quick: bool = field(default=False, metadata={"help": "tiny models of the same families, a few images, every row "
                                                         "in this process: a smoke test in well under a minute"})

    def validate(self) -> None:
        if self.n < 4 or self.steps < 2 or self.request_steps < 2 or self.sd_steps < 2:
            raise UserError("--n must be at least 4 and --steps, --request-steps, --sd-steps at least 2 (the FLOPs "
                            "are counted on the second step)")
        if self.grad_accum < 1 or self.request_grad_accum < 1 or self.sample_steps < 2 or self.threads < 1:
            raise UserError("--grad-accum and --threads must be at least 1, --sample-steps at least 2")
        if not 0 < self.utilisation <= 1 or self.headroom_gb < 0 or self.wait_minutes < 0:
            raise UserError("--utilisation must lie in (0, 1], --headroom-gb and --wait-minutes must be >= 0")
        unknown = [w for w in self.wanted() if w not in ROWS]
        if unknown:
            raise UserError(f"unknown row(s) {', '.join(unknown)} in --rows: choose from {', '.join(ROWS)}")

    def wanted(self) -> list[str]:
        return list(ROWS) if self.rows == "all" else [s.strip() for s in self.rows.split(",") if s.strip()]


@dataclass
class Row:
    name: str
    family: str  # ddpm or sd
    command: list[str]
    unit: str  # step or forward
    run_dir: Path | None  # holds log.jsonl (step rows)
    estimate: int  # bytes
    note: str = ""
    needs: str = ""  # a row whose output this one reads


def _gb(b) -> str:
    return "—" if b is None else f"{b / GB:.1f}"


def mem_available() -> int:
    """``MemAvailable`` of /proc/meminfo, bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def machine() -> dict:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        pass
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    import torch

    return {"cpu": model, "cores": os.cpu_count(), "memory_gb": round(total / GB, 1), "torch": torch.__version__}


def training_bytes(params: int, grad_buffers: int, optimizer: str, frozen: int, activations: int) -> int:
    """Peak estimate of a fine-tuning command: the input UNet and its trained copy, ``grad_buffers`` gradient-sized
    buffers (SISS norm-fixing keeps ``G_a`` beside ``p.grad``; with accumulation, ``G_x``, ``G_a`` and their
    combination), the optimiser state, frozen parts (fp32) and an activation allowance."""
    from ..optim import OPTIMIZERS

    return 4 * params * (2 + grad_buffers) + OPTIMIZERS[optimizer] * params + 4 * frozen + activations


def build_rows(cfg: ScaleConfig, paths: dict, counts: dict) -> list[Row]:
    """Every row's real command line and memory estimate."""
    # the rows time steps and forwards; a deletion's verification is costed on its own (verify --help, the
    # verify-ladder's cost.py), so the unlearning rows do not verify
    out, t, nv = Path(cfg.out), ["--threads", str(cfg.threads)], ["--verify", "off"]
    p_ddpm, p_sd = counts["ddpm-unet"]["parameters"], counts["sd-unet"]["parameters"]
    frozen = counts["sd-vae"]["parameters"] + counts["sd-text-encoder"]["parameters"]
    data_bytes = 4 * 3 * paths["image_size"] ** 2 * cfg.n  # the in-memory loader holds X as float32
    siss_celeba = ["--method", "siss", "--lambda", "0.5", "--scaling-norm", "500", "--lr", "5e-6", "--batch-size", "1",
                   "--gradient-checkpointing"]
    ddpm, sd = paths["ddpm"], paths["sd"]
    runs = out / "runs"
    rows = [
        Row("ddpm unlearn", "ddpm", ["unlearn", "--model", ddpm, "--data", paths["data"], "--forget", "0", *siss_celeba,
                                     "--grad-accum", str(cfg.grad_accum), "--steps", str(cfg.steps),
                                     "--checkpoint-every", "0", *t, *nv, "--out", str(runs / "ddpm-unlearn")],
            "step", runs / "ddpm-unlearn",
            training_bytes(p_ddpm, 3 if cfg.grad_accum > 1 else 2, "adamw", 0, ACTIVATIONS["ddpm"]) + data_bytes,
            f"SISS lambda 0.5, scaling norm 500, lr 5e-6, batch 1 x {cfg.grad_accum}, gradient checkpointing"),
        Row("ddpm sample", "ddpm", ["sample", "--model", ddpm, "--n", "2", "--steps", str(cfg.sample_steps),
                                    "--batch-size", "2", *t, "--out", str(runs / "ddpm-sample")],
            "forward", None, 4 * p_ddpm + GB, f"2 images, {cfg.sample_steps} DDPM steps, one batch"),
        Row("sd prompt build", "sd", ["prompt", "build", "--model", sd, "--prompt", paths["prompt"], "--n", "2",
                                      "--sample-steps", str(cfg.sample_steps), "--batch-size", "2", "--device", "cpu",
                                      *t, "--out", paths["sd_data"]],
            "forward", None, 4 * (p_sd + frozen) + ACTIVATIONS["sd"],
            f"2 images, {cfg.sample_steps} DDIM steps, guidance 7.5 (a UNet batch of 4)"),
    ]
    unlearn = ["prompt", "unlearn", "--model", sd, "--data", paths["sd_data"], "--steps", str(cfg.sd_steps),
               "--batch-size", "1", "--grad-accum", "1", "--eval-every", "0", "--eval-samples", "1", "--sample-steps",
               "2", "--sample-batch-size", "1", "--device", "cpu", "--method", "siss", *t, *nv]
    for name, extra, buffers, opt, note in (
            ("sd prompt unlearn", [], 2, "adamw", "SISS (scaling norm 750), fp32 AdamW, gradient checkpointing"),
            ("sd prompt unlearn 8-bit superfactor", ["--optimizer", "adamw8bit", "--superfactor", "0.05"], 1,
             "adamw8bit", "8-bit AdamW states (bitsandbytes), fixed SISS multiplier (one gradient buffer)"),
            ("sd prompt unlearn 8-bit", ["--optimizer", "adamw8bit"], 2, "adamw8bit",
             "SISS (scaling norm 750) with 8-bit AdamW states (bitsandbytes)")):
        slug = name.replace(" ", "-")
        rows.append(Row(name, "sd", [*unlearn, *extra, "--out", str(runs / slug)], "step", runs / slug,
                        training_bytes(p_sd, buffers, opt, frozen, ACTIVATIONS["sd"]),
                        f"{note}; batch 1, {cfg.sd_steps} steps", needs="sd prompt build"))
    rows.insert(3, Row("sd detect", "sd", ["detect", "--model", sd, "--prompts", paths["prompts"], "--seeds", "1",
                                        "--sample-steps", str(cfg.sample_steps), "--batch-size", "1", "--device",
                                        "cpu", *t, "--out", str(runs / "sd-detect.json")],
                    "forward", None, 4 * (p_sd + frozen) + ACTIVATIONS["sd"],
                    "2 prompts, 1 starting noise (3 UNet forwards: unconditional + one per prompt)"))
    rows.append(Row("ddpm unlearn --requests", "ddpm",
                    ["unlearn", "--model", ddpm, "--data", paths["data"], "--requests", paths["requests"],
                     "--held-out", paths["held_out"], "--similarity-t", "1", *siss_celeba, "--steps",
                     str(cfg.request_steps), "--grad-accum", str(cfg.request_grad_accum), *t, *nv,
                     "--out", str(runs / "ddpm-requests")],
                    "step", runs / "ddpm-requests",
                    training_bytes(p_ddpm, 2, "adamw", p_ddpm, ACTIVATIONS["ddpm"]) + data_bytes,
                    f"2 requests of 1 image, {cfg.request_steps} steps of batch 1 x {cfg.request_grad_accum} each, "
                    "ledger (before/after metrics: 8 loss draws per image); 1 held-out image, similarity t = 1"))
    return rows


def _wait_for_memory(need: int, cfg: ScaleConfig, log) -> tuple[bool, int]:
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    if need + cfg.headroom_gb * GB > total:  # more than the machine has: no use waiting
        return False, mem_available()
    deadline = time.time() + 60 * cfg.wait_minutes
    while True:
        avail = mem_available()
        if avail - need >= cfg.headroom_gb * GB:
            return True, avail
        if time.time() >= deadline:
            return False, avail
        log(f"  waiting for memory: {_gb(avail)} GiB available, {_gb(need)} GiB estimated + {cfg.headroom_gb:g} GiB "
            "headroom needed")
        time.sleep(min(30.0, max(1.0, deadline - time.time())))


def run_row(row: Row, cfg: ScaleConfig, logs: Path) -> dict:
    """Run one row's command (a fresh process unless ``--quick``) and turn its probe record into figures."""
    from .scale_probe import probe

    logs.mkdir(parents=True, exist_ok=True)
    result = logs / f"{row.name.replace(' ', '-')}.probe.json"
    launch = time.time()
    peak = None
    if cfg.quick:
        rec = probe(row.command, row.unit)
    else:
        import diffunlearn

        env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads),
                   PYTHONPATH=os.pathsep.join([str(Path(diffunlearn.__file__).parents[1]),
                                               os.environ.get("PYTHONPATH", "")]))
        with open(logs / f"{row.name.replace(' ', '-')}.log", "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "diffunlearn.bench.scale_probe", str(result), row.unit,
                                     "--", *row.command], stdout=f, stderr=subprocess.STDOUT, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        peak = usage.ru_maxrss * 1024
        rec = json.loads(result.read_text()) if result.is_file() else {"returncode": proc.returncode, "unit_ends": []}
        rec["returncode"] = proc.returncode
    return figures(row, rec, launch, peak, cfg.utilisation)


def unit_seconds(row: Row, rec: dict) -> tuple[list[float], bool]:
    """Seconds of each unit after the first; ``True`` when only the FLOP-counted unit was there to time."""
    if row.unit == "step":
        lines = (row.run_dir / "log.jsonl").read_text().splitlines() if (row.run_dir / "log.jsonl").is_file() else []
        secs = [float(json.loads(ln)["seconds"]) for ln in lines if ln.strip()][1:]
    else:
        ends = rec["unit_ends"]
        secs = [b - a for a, b in zip(ends, ends[1:])]
    counted = (rec.get("counted_unit") or 0) - 2  # index in secs of the counted unit (unit 2 -> 0)
    clean = [s for i, s in enumerate(secs) if i != counted]
    return (clean, False) if clean else (secs, bool(secs))


def figures(row: Row, rec: dict, launch: float, peak: int | None, utilisation: float) -> dict:
    import numpy as np

    ends = rec.get("unit_ends") or []
    secs, with_counter = unit_seconds(row, rec) if rec.get("returncode") == 0 else ([], False)
    flops = rec.get("flops_per_unit")
    out = {"status": "ok" if rec.get("returncode") == 0 else f"failed (exit {rec.get('returncode')})",
           "unit": row.unit, "units": len(ends), "seconds_total": round(rec.get("finished", time.time()) - launch, 1),
           # three significant digits: a tiny model's unit can take under 5 ms, which rounding to 0.01 s would zero
           "first_unit_seconds": float(f"{ends[0] - launch:.3g}") if ends else None,
           "seconds_per_unit": float(f"{float(np.median(secs)):.3g}") if secs else None, "timed_units": len(secs),
           "timing_includes_flop_counter": with_counter, "peak_rss_bytes": peak, "flops_per_unit": flops}
    if flops:
        out["projection_seconds"] = {k: flops / (peak_flops * utilisation) for k, peak_flops in PEAKS.items()}
        if secs:
            out["cpu_flops_per_second"] = flops / float(np.median(secs))
    return out


def run_scale_bench(cfg: ScaleConfig) -> dict:
    from ..runs import write_json
    from .harness import check_bench_dir
    from .scale_report import write_report
    from .scale_setup import prepare

    cfg.validate()
    out = Path(cfg.out)
    check_bench_dir(out, cfg, free=("rows", "wait_minutes", "headroom_gb", "utilisation", "cache"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    t0 = time.time()
    if cfg.quick:  # a handful of images and the fewest steps that still time one unit past the counted one
        cfg = replace(cfg, n=min(cfg.n, 8), steps=3, grad_accum=2, request_steps=2, request_grad_accum=2,
                      sample_steps=3, sd_steps=2)
    paths, setup, counts = prepare(cfg, log)
    rows = build_rows(cfg, paths, counts)
    assert [r.name for r in rows] == list(ROWS)
    wanted = cfg.wanted()
    previous = out / "scale.json"  # rows of an earlier run with the same settings are kept unless run again
    before = json.loads(previous.read_text()) if previous.is_file() else {"rows": {}, "setup": {}}
    results: dict[str, dict] = before["rows"]
    for k, v in setup.items():  # what a reused model or folder cost when it was built
        if v.get("reused") and "seconds" in before["setup"].get(k, {}):
            setup[k] = {**before["setup"][k], "reused": True}
    summary = {"config": asdict(cfg), "machine": machine(), "parameters": counts, "setup": setup, "rows": results,
               "peaks_flops": PEAKS, "seconds": 0.0}

    def save() -> str:  # after every row, so that an interrupted run keeps what it measured
        summary["seconds"] = round(time.time() - t0, 1)
        summary["rows"] = {k: results[k] for k in ROWS if k in results}
        write_json(out / "scale.json", summary)
        return write_report(out / "scale.md", summary, lines)

    for row in rows:
        save()
        if row.name not in wanted:
            continue
        base = {"family": row.family, "command": "diffunlearn " + " ".join(row.command), "note": row.note,
                "estimate_bytes": row.estimate}
        if row.needs and not (Path(paths["sd_data"]) / "labels.csv").is_file():
            results[row.name] = {**base, "status": f"not run: needs the row {row.needs!r}"}
            continue
        if "adamw8bit" in row.command and not _has_bitsandbytes():
            results[row.name] = {**base, "status": "not run: bitsandbytes is not installed "
                                                   "(pip install 'diffunlearn[lowmem]')"}
            log(f"{row.name}: {results[row.name]['status']}")
            continue
        ok, avail = (True, mem_available()) if cfg.quick else _wait_for_memory(row.estimate, cfg, log)
        base["mem_available_bytes"] = avail
        if not ok:
            results[row.name] = {**base, "status": f"not run: needs ~{_gb(row.estimate)} GiB + {cfg.headroom_gb:g} GiB "
                                                   f"headroom, {_gb(avail)} GiB available"}
            log(f"{row.name}: {results[row.name]['status']}")
            continue
        log(f"{row.name}: diffunlearn {' '.join(row.command)}")
        target = Path(row.command[row.command.index("--out") + 1])  # a previous run of this row, under <out>/runs
        if target.is_dir():
            shutil.rmtree(target)
        target.unlink(missing_ok=True) if target.is_file() else None
        results[row.name] = {**base, "status": "running"}
        save()
        results[row.name] = {**base, **run_row(row, cfg, out / "logs")}
        if row.name == "sd prompt build" and results[row.name]["status"] == "ok":
            _label_first_forget(Path(paths["sd_data"]))
        r = results[row.name]
        log(f"  {r['status']}: first {row.unit} after {r['first_unit_seconds']} s, {r['seconds_per_unit']} s per "
            f"{row.unit}, peak {_gb(r['peak_rss_bytes'])} GiB, {(r['flops_per_unit'] or 0) / 1e12:.3f} TFLOP per unit")
    print(save())
    return summary


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _label_first_forget(folder: Path) -> None:
    """After ``prompt build`` of 2 random-weight samples: the first image is the one to forget, the second is kept
    (the build's k-means labels have nothing to find; the user-facing flow is to edit labels.csv)."""
    import csv

    from ..sd.memorisation import LABELS_FILE

    with open(folder / LABELS_FILE, newline="") as f:
        rows = list(csv.reader(f))
    for i, row in enumerate(rows[1:]):
        row[1] = "forget" if i == 0 else "keep"
    with open(folder / LABELS_FILE, "w", newline="") as f:
        csv.writer(f).writerows(rows)
