"""``diffunlearn bench speed``: seconds per optimiser step and peak memory of every method, relative to a plain
fine-tuning step (naive deletion: one forward and one backward of the DDPM loss) at the same batch size.

Timing is measured side by side in one process: rounds interleave the methods, each round runs a few steps from the
same model, the first step of each run is dropped as warm-up, and the median and interquartile range over all kept
steps are reported with their mean and the slowest step (a few slow steps hide behind a median). Peak memory is each
method's own process (CPU: peak resident set size above the process's size while the steps run, sampled every 2 ms;
GPU: ``torch.cuda.max_memory_allocated``), since a process's peak cannot be reset on CPU.

Throughput: the FLOPs of one step (the second step of a run, the first timed one) are counted by
``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions and attention, forward and backward),
divided by the median seconds per step, and set against the machine's attainable rate measured in the same run: the
fastest of a few ``n x n`` float32 matrix products (``2 n^3`` FLOPs) at the benchmark's thread count, before and after
the timed rounds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..config import run_field
from ..errors import UserError

# label -> (method, hyperparameters)
VARIANTS: dict[str, tuple[str, dict]] = {
    "plain (naive)": ("naive", {}),
    "siss": ("siss", {"lam": 0.5, "scaling_norm": 5.0}),
    "siss superfactor (1 backward, exact)": ("siss", {"lam": 0.5, "superfactor": 0.05}),
    "siss norm-refresh 10 (approx.)": ("siss", {"lam": 0.5, "scaling_norm": 5.0, "norm_refresh": 10}),
    "siss-nois": ("siss-nois", {"scaling_norm": 5.0}),
    "neggrad": ("neggrad", {}),
    "erasediff": ("erasediff", {}),
    "erasediff-light": ("erasediff-light", {}),
    "retrack": ("retrack", {}),
}


@dataclass
class SpeedConfig:
    out: str = field(default="runs/bench-speed", metadata={"help": "output directory (speed.md, speed.json)"})
    model: str = field(default="mnist-tshirt-base", metadata={"help": "model (shipped name or directory), or arch:NAME "
                                                                      "for random weights"})
    batch_size: int = field(default=64, metadata={"help": "rows per step"})
    steps: int = field(default=4, metadata={"help": "steps per run (the first is warm-up)"})
    rounds: int = field(default=3, metadata={"help": "interleaved rounds over all methods"})
    memory: bool = field(default=True, metadata={"help": "also measure peak memory (one process per method)"})
    threads: int = run_field("threads")
    matmul_size: int = field(default=2048, metadata={"help": "n of the n x n float32 matrix product that measures "
                                                             "the machine's attainable GFLOP/s"})


def _load(spec: str):
    import torch

    from ..model import DiffusionModel, build_scheduler, build_unet, load_model, resolve_model_dir

    if spec.startswith("arch:"):
        torch.manual_seed(0)
        return DiffusionModel(build_unet(spec[5:], 28, 1), build_scheduler(), source=spec)
    return load_model(resolve_model_dir(spec))


def _sets(model):
    from ..data import load_data, resolve_forget, split_kept

    data = load_data("mnist-tshirt")
    model.check_data(data.shape, "mnist-tshirt")
    return split_kept(data, resolve_forget("default", data))


def _time_steps(model, kept, forget, label: str, cfg: SpeedConfig, callback=None) -> tuple[list[float], list[dict]]:
    """Seconds of each step after the first (warm-up), and every step's log record."""
    from ..methods import make_method
    from ..trainer import TrainerConfig, unlearn

    name, params = VARIANTS[label]
    log: list[dict] = []
    unlearn(model, kept, forget, make_method(name, **params), TrainerConfig(steps=cfg.steps, batch_size=cfg.batch_size),
            log=log.append, callback=callback)
    return [r["seconds"] for r in log[1:]], log


def _count_cpu_attention() -> None:
    """FlopCounterMode counts the CUDA attention kernels; the CPU flash-attention kernel has the same FLOPs."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    for op, formula in ((aten._scaled_dot_product_flash_attention_for_cpu, fc.sdpa_flop),
                        (aten._scaled_dot_product_flash_attention_for_cpu_backward, fc.sdpa_backward_flop)):
        if op not in fc.flop_registry:
            fc.register_flop_formula(op, get_raw=True)(formula)


def step_flops(model, kept, forget, label: str, cfg: SpeedConfig) -> int:
    """FLOPs of one step of ``label`` (the second of a run: the first timed one), counted by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    _count_cpu_attention()
    counter = FlopCounterMode(display=False)
    totals: list[int] = []
    with counter:
        _time_steps(model, kept, forget, label, replace(cfg, steps=2),
                    callback=lambda step, unet: totals.append(counter.get_total_flops()))
    return totals[1] - totals[0]


def matmul_gflops(n: int, reps: int = 5) -> float:
    """Attainable GFLOP/s at the current thread count: the fastest of ``reps`` float32 ``n x n`` matrix products
    (``2 n^3`` FLOPs each), after one warm-up product."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn((n, n), generator=gen), torch.randn((n, n), generator=gen)
    out = torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def exact_split_bound(fraction: float) -> float:
    """Least cost, relative to a plain step (one forward + one backward, a backward costing two forwards), of an exact
    norm-fixed SISS step that takes ``G_a``'s extra backward only through the rows where ``w_a > 0`` (a fraction
    ``fraction`` of the batch): ``(1 + 2 + 2 fraction) / 3``."""
    return 1.0 + 2.0 * fraction / 3.0


def peak_memory(label: str, model_spec: str, batch_size: int, steps: int) -> float:
    """Peak memory (MB) of ``steps`` steps of one method above the process's size once model and data are loaded."""
    import torch

    model = _load(model_spec)
    kept, forget = _sets(model)
    cfg = SpeedConfig(batch_size=batch_size, steps=steps)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        _time_steps(model, kept, forget, label, cfg)
        return torch.cuda.max_memory_allocated() / 2**20
    import threading

    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def watch():  # the resident set size sampled every 2 ms: its maximum while the steps run
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    _time_steps(model, kept, forget, label, cfg)
    done.set()
    t.join()
    return max(peak[0] - base, 0) / 2**20


def run_speed_bench(cfg: SpeedConfig) -> dict:
    import torch

    from ..runs import prepare_out_dir, write_json

    if cfg.steps < 2 or cfg.rounds < 1 or cfg.batch_size < 1 or cfg.matmul_size < 1:
        raise UserError("--steps must be >= 2 (the first is warm-up), --rounds, --batch-size and --matmul-size >= 1")
    prepare_out_dir(cfg.out, overwrite=True) if Path(cfg.out, "config.yaml").exists() else prepare_out_dir(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = _load(cfg.model)
    kept, forget = _sets(model)
    peak = [matmul_gflops(cfg.matmul_size)]
    flops = {label: step_flops(model, kept, forget, label, cfg) for label in VARIANTS}
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    positive: list[float] = []  # SISS: fraction of rows with w_a > 0, per step
    for r in range(cfg.rounds):
        for label in VARIANTS:
            seconds, log = _time_steps(model, kept, forget, label, cfg)
            times[label] += seconds
            if label == "siss":
                positive += [rec["rows_w_a_positive"] for rec in log]
        print(f"round {r + 1}/{cfg.rounds} done", flush=True)
    peak.append(matmul_gflops(cfg.matmul_size))
    attainable = max(peak)
    mem: dict[str, float] = {}
    if cfg.memory:
        for label in VARIANTS:
            code = ("import sys; from diffunlearn.bench.speed import peak_memory; "
                    f"print(peak_memory({label!r}, {cfg.model!r}, {cfg.batch_size}, 2))")
            cmd = [sys.executable, "-c", code]
            if cfg.threads:
                cmd = [sys.executable, "-c", f"import torch; torch.set_num_threads({cfg.threads}); " + code]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                raise UserError(f"memory measurement of {label} failed: {done.stderr.strip().splitlines()[-1]}")
            mem[label] = float(done.stdout.strip().splitlines()[-1])
    plain = float(np.median(times["plain (naive)"]))
    rows = {}
    for label, ts in times.items():
        q1, med, q3 = (float(q) for q in np.percentile(ts, [25, 50, 75]))
        q1, q3 = min(q1, med), max(q3, med)  # interpolation rounds: keep the quartiles ordered around the median
        gflops = flops[label] / float(med) / 1e9
        rows[label] = {"seconds_per_step": float(med), "iqr": [float(q1), float(q3)], "relative": float(med) / plain,
                       "mean": min(float(np.mean(ts)), float(np.max(ts))), "slowest": float(np.max(ts)), "n": len(ts),
                       "gflop_per_step": flops[label] / 1e9, "gflops": gflops,
                       "share_of_attainable": gflops / attainable, "peak_mb": mem.get(label),
                       "memory_relative": (mem[label] / mem["plain (naive)"]
                                           if mem and mem["plain (naive)"] > 0 else None)}
    params = sum(p.numel() for p in model.unet.parameters())
    lines = [f"Model {cfg.model} ({params / 1e6:.2f} M parameters), batch {cfg.batch_size}, {torch.get_num_threads()} "
             f"thread(s); {cfg.rounds} interleaved rounds x {cfg.steps - 1} timed steps per method. Attainable: "
             f"{attainable:.1f} GFLOP/s (fastest {cfg.matmul_size}x{cfg.matmul_size} float32 matrix product; "
             f"{peak[0]:.1f} before the rounds, {peak[1]:.1f} after).\n",
             "| method | s/step (median) | IQR | mean | slowest | time vs plain | GFLOP/step | GFLOP/s | of attainable "
             "| peak MB above loaded | memory vs plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        m = (f"{r['peak_mb']:.0f} | " + (f"{r['memory_relative']:.2f}x" if r["memory_relative"] else "—")
             if r["peak_mb"] is not None else "— | —")
        lines.append(f"| {label} | {r['seconds_per_step']:.3f} | {r['iqr'][0]:.3f}–{r['iqr'][1]:.3f} | "
                     f"{r['mean']:.3f} | {r['slowest']:.3f} | {r['relative']:.2f}x | {r['gflop_per_step']:.2f} | "
                     f"{r['gflops']:.1f} | {100 * r['share_of_attainable']:.1f}% | {m} |")
    frac = float(np.mean(positive))
    lines.append(f"\nSISS (lambda 0.5) rows with w_a > 0: {100 * frac:.1f}% of {len(positive) * cfg.batch_size} "
                 f"drawn. An exact norm-fixed step whose extra backward (for G_a) skips the other rows costs at least "
                 f"{exact_split_bound(frac):.2f}x a plain step (a backward costing two forwards).")
    table = "\n".join(lines) + "\n"
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(json.dumps(asdict(cfg)))
    (out / "speed.md").write_text(table)
    write_json(out / "speed.json", {"config": asdict(cfg), "rows": rows, "parameters": params,
                                    "attainable_gflops": attainable, "matmul_gflops_before_after": peak,
                                    "siss_rows_w_a_positive": frac, "exact_split_bound": exact_split_bound(frac)})
    print(table)
    return rows
