"""``diffunlearn bench memory``: the peak memory of an unlearning run on image folders of growing size.

For each size N (default 1,000 and 4,000) the benchmark writes N synthetic RGB PNGs (deterministic: seeded smooth
colours plus pixel noise, about 115 KB each at 256 x 256) into a temporary folder it creates (a smaller folder holds
hard links to the first files of the largest), saves a small random-weight UNet for that image size
(:func:`bench_unet`: four levels, no attention, 0.37 M parameters), and runs ``diffunlearn unlearn`` on the folder
for a few SISS steps in a fresh subprocess. A wrapper process starts that run and reports
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``: the peak resident set size of the largest process of the run's
tree (the run itself or one of its data-loader workers). Data that stream from disk keep that peak flat in N;
decoding the whole folder into memory would grow it by N x 3 x H x W x 4 bytes (0.75 MiB per 256 x 256 image). The
temporary folder is removed at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import run_field
from ..errors import UserError

#: the goal: peak memory at the largest size within this many MB of the peak at the smallest
GOAL_MB = 150

#: runs argv[1:] as a child and prints its exit status, stderr tail and the peak RSS of its process tree (KiB on Linux)
_WRAPPER = ("import json, resource, subprocess, sys, time\n"
            "t = time.time()\n"
            "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
            "print(json.dumps({'rc': r.returncode, 'stderr': r.stderr[-2000:], 'seconds': time.time() - t,\n"
            "                  'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")


@dataclass
class MemoryBenchConfig:
    out: str = field(default="runs/bench-memory", metadata={"help": "output directory (results.md, results.json)"})
    sizes: str = field(default="1000,4000", metadata={"help": "comma-separated numbers of images"})
    image_size: int = field(default=256, metadata={"help": "image height and width (RGB)"})
    steps: int = field(default=3, metadata={"help": "SISS steps per run"})
    batch_size: int = field(default=4, metadata={"help": "rows per step"})
    data_workers: int = field(default=2, metadata={"help": "data-loader worker processes of each run"})
    threads: int = field(default=1, metadata={"help": "CPU threads for torch in each run"})
    seed: int = field(default=0, metadata={"help": "seed of the images and the UNet"})
    overwrite: bool = run_field("overwrite")

    def size_list(self) -> list[int]:
        try:
            sizes = sorted({int(s) for s in self.sizes.split(",") if s.strip()})
        except ValueError:
            raise UserError(f"--sizes must be comma-separated integers, got {self.sizes!r}") from None
        if not sizes or sizes[0] < 2:
            raise UserError("--sizes needs at least one size, each at least 2 images")
        return sizes

    def validate(self) -> None:
        self.size_list()
        if self.image_size < 16 or self.image_size % 8:
            raise UserError(f"--image-size must be a multiple of 8 and at least 16, got {self.image_size}")
        if self.steps < 1 or self.batch_size < 1 or self.data_workers < 0 or self.threads < 0:
            raise UserError("--steps and --batch-size must be >= 1, --data-workers and --threads >= 0")


def bench_unet(size: int):
    """A small UNet for ``size`` x ``size`` RGB: four levels of (16, 32, 32, 32) channels, no attention (attention at
    a 256 x 256 image's upper levels would dominate time and memory and say nothing about the data)."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4,
                       norm_num_groups=8, add_attention=False)


def synthetic_image(seed: int, i: int, size: int) -> np.ndarray:
    """Image ``i`` (uint8 RGB): 16 x 16 seeded colours scaled bilinearly to ``size`` x ``size``, plus seeded pixel
    noise of +-6 levels, so a 256 x 256 PNG takes about 115 KB, like a photograph's."""
    from PIL import Image

    rng = np.random.default_rng([seed, i])
    small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR), dtype=np.int16)
    return np.clip(base + rng.integers(-6, 7, (size, size, 3), dtype=np.int16), 0, 255).astype(np.uint8)


def write_folders(root: Path, sizes: list[int], size: int, seed: int) -> dict[int, Path]:
    """``images-N`` for every N: the largest written, the others hard links to its first N files."""
    from PIL import Image

    largest = root / f"images-{sizes[-1]}"
    largest.mkdir(parents=True)
    for i in range(sizes[-1]):
        Image.fromarray(synthetic_image(seed, i, size)).save(largest / f"img_{i:05d}.png")
    folders = {sizes[-1]: largest}
    for n in sizes[:-1]:
        folders[n] = root / f"images-{n}"
        folders[n].mkdir()
        for i in range(n):
            src, dst = largest / f"img_{i:05d}.png", folders[n] / f"img_{i:05d}.png"
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    return folders


def measure(argv: list[str]) -> dict:
    """Run ``argv`` under the wrapper in a fresh process; its exit status, seconds and peak RSS (MB)."""
    import diffunlearn

    env = dict(os.environ)
    src = str(Path(diffunlearn.__file__).resolve().parent.parent)  # the children run this very source tree
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], capture_output=True, text=True, env=env)
    if done.returncode != 0 or not done.stdout.strip():
        raise UserError(f"the measuring process failed: {done.stderr.strip()[-500:]}")
    res = json.loads(done.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise UserError(f"the unlearning run failed (exit {res['rc']}): {res['stderr'].strip()[-500:]}")
    kb = res["maxrss_kb"] / (1024 if sys.platform == "darwin" else 1)  # macOS reports bytes
    return {"peak_rss_mb": round(kb / 1024, 1), "seconds": round(res["seconds"], 2)}


def run_memory_bench(cfg: MemoryBenchConfig) -> dict:
    import torch

    from ..model import DiffusionModel, build_scheduler, save_model
    from ..runs import prepare_out_dir, write_json

    cfg.validate()
    sizes = cfg.size_list()
    out = prepare_out_dir(cfg.out, cfg.overwrite)
    tmp = Path(tempfile.mkdtemp(prefix="diffunlearn-bench-memory-"))
    rows = []
    try:
        torch.manual_seed(cfg.seed)
        model_dir = save_model(DiffusionModel(bench_unet(cfg.image_size), build_scheduler()), tmp / "model")
        print(f"writing {sizes[-1]} PNGs of {cfg.image_size}x{cfg.image_size} into {tmp} ...", flush=True)
        folders = write_folders(tmp, sizes, cfg.image_size, cfg.seed)
        for n in sizes:
            run = tmp / f"run-{n}"
            argv = [sys.executable, "-m", "diffunlearn.cli", "unlearn", "--model", str(model_dir),
                    "--data", str(folders[n]), "--forget", "0", "--method", "siss", "--steps", str(cfg.steps),
                    "--batch-size", str(cfg.batch_size), "--threads", str(cfg.threads),
                    "--data-workers", str(cfg.data_workers), "--out", str(run)]
            res = measure(argv)
            log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            rows.append({"images": n, **res, "step_seconds": [r["seconds"] for r in log],
                         "data_on_disk_mb": round(sum(p.stat().st_size for p in folders[n].iterdir()) / 2 ** 20, 1),
                         "decoded_in_memory_mb": round(n * 3 * cfg.image_size ** 2 * 4 / 2 ** 20, 1)})
            print(f"{n} images: peak RSS {res['peak_rss_mb']} MB, {res['seconds']} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    growth = rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]
    result = {"config": asdict(cfg), "rows": rows, "growth_mb": round(growth, 1), "goal_mb": GOAL_MB,
              "goal_met": bool(growth <= GOAL_MB), "command": _command(cfg)}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    table = markdown(result)
    (out / "results.md").write_text(table)
    print(table)
    return result


def _command(cfg: MemoryBenchConfig) -> str:
    defaults = MemoryBenchConfig()
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items()
             if v != getattr(defaults, k) and k not in ("out", "overwrite")]
    return " ".join(["diffunlearn bench memory", *flags])


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"Command: `{result['command']}` (each run: `diffunlearn unlearn` on the folder, SISS, {cfg['steps']} "
             f"steps of batch {cfg['batch_size']}, `--threads {cfg['threads']} --data-workers {cfg['data_workers']}`, "
             f"a random 4-level UNet without attention for {cfg['image_size']}x{cfg['image_size']} RGB)", "",
             "| images | peak RSS (MB) | run (s) | seconds per step | PNGs on disk (MB) | the images decoded as "
             "float32 (MB) |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        steps = ", ".join(f"{s:.2f}" for s in r["step_seconds"])
        lines.append(f"| {r['images']} | {r['peak_rss_mb']} | {r['seconds']} | {steps} | {r['data_on_disk_mb']} | "
                     f"{r['decoded_in_memory_mb']} |")
    lines += ["", f"Peak growth from {result['rows'][0]['images']} to {result['rows'][-1]['images']} images: "
              f"{result['growth_mb']} MB (goal: within {result['goal_mb']} MB: "
              f"{'met' if result['goal_met'] else 'not met'})."]
    return "\n".join(lines) + "\n"
