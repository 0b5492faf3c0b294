"""The inputs of ``diffunlearn bench scale``: the two model directories and the image folders in the cache (built once
and reused), the requests and prompts files. Full-size models are built in a child process, so that the benchmark's
own process stays small while the rows run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _built(folder: Path, marker: dict) -> bool:
    f = folder / "bench-scale.json"
    return f.is_file() and json.loads(f.read_text()) == marker


def _build(what: str, folder: Path, seed: int, quick: bool, log) -> dict:
    """Write the ``what`` (``ddpm`` or ``sd``) directory unless the cache holds it; seconds and peak memory."""
    from . import scale_models

    marker = {"model": what, "seed": seed, "quick": quick, "configs": scale_models.published()}
    if _built(folder, marker):
        log(f"reusing {folder}")
        return {"dir": str(folder), "reused": True}
    log(f"building {folder} from the published config (seeded random weights)")
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    t0 = time.time()
    peak = None
    if quick:
        getattr(scale_models, f"write_{what}")(folder, seed, quick)
    else:
        import diffunlearn

        code = (f"from pathlib import Path; from diffunlearn.bench.scale_models import write_{what}; "
                f"write_{what}(Path({str(folder)!r}), {seed}, False)")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(diffunlearn.__file__).parents[1]),
                                                            os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.Popen([sys.executable, "-c", code], env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"building {folder} failed (exit {os.waitstatus_to_exitcode(status)})")
        peak = usage.ru_maxrss * 1024
    (folder / "bench-scale.json").write_text(json.dumps(marker) + "\n")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"dir": str(folder), "reused": False, "seconds": round(time.time() - t0, 1), "peak_rss_bytes": peak,
            "bytes_on_disk": size}


def prepare(cfg, log) -> tuple[dict, dict, dict]:
    """``(paths, setup, parameter counts)``: everything the rows' command lines name."""
    from .scale_models import DETECT_PROMPTS, PROMPT, parameter_counts, synthetic_folder

    out = Path(cfg.out)
    cache = Path(cfg.cache) if cfg.cache else out / "cache"
    counts = parameter_counts(cfg.quick)
    for name, c in counts.items():
        if c["published"] is not None and c["parameters"] != c["published"]:
            raise RuntimeError(f"{name}: the config builds {c['parameters']} parameters, published {c['published']}")
    tag = f"seed{cfg.seed}" + ("-quick" if cfg.quick else "")
    setup = {"ddpm": _build("ddpm", cache / f"ddpm-celebahq-256-{tag}", cfg.seed, cfg.quick, log),
             "sd": _build("sd", cache / f"stable-diffusion-v1-4-{tag}", cfg.seed, cfg.quick, log)}
    from .scale_models import QUICK

    size = QUICK["ddpm"]["sample_size"] if cfg.quick else 256
    t0 = time.time()
    data = synthetic_folder(cache / "data", cfg.n, size, cfg.seed)
    held = synthetic_folder(cache / "data", 1, size, cfg.seed + 1)  # never trained on: the ledger's reference
    setup["data"] = {"dir": str(data), "images": cfg.n, "size": size, "seconds": round(time.time() - t0, 1),
                     "bytes_on_disk": sum(p.stat().st_size for p in data.glob("*.png"))}
    log(f"images: {data} ({cfg.n} x {size}x{size}, {setup['data']['bytes_on_disk'] / 2**20:.1f} MiB)")
    (out / "requests.txt").write_text("# one deletion request per line\n1\n2\n")
    (out / "prompts.txt").write_text("\n".join(DETECT_PROMPTS) + "\n")
    paths = {"ddpm": setup["ddpm"]["dir"], "sd": setup["sd"]["dir"], "data": str(data), "held_out": str(held),
             "image_size": size, "requests": str(out / "requests.txt"), "prompts": str(out / "prompts.txt"),
             "prompt": PROMPT, "sd_data": str(out / "runs" / "sd-prompt-data")}
    return paths, setup, counts
