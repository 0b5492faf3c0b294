"""``diffunlearn bench mnist-tshirt --look ROW:SEED,...``: look again at the samples a finished cell counted as the
T-shirt, without drawing its other samples.

A cell keeps the numbers of the samples it counted (sample ``i`` is seeded by ``i``) but not its model. Looking
rebuilds the cell's model (the reference model itself, or the same unlearning run with the cell's seed: training is
seeded, and the look checks the rebuilt run's per-step losses against the ones the cell recorded) and draws only
those samples, into the cell's ``counted.png`` / ``counted.npy``, with ``look.json``. A cell computed before cells
recorded their numbers is looked at through the base model's T-shirt seeds (the ``pretrained`` cell's numbers): the
record says how many of the cell's count were found there, so an incomplete look is never mistaken for a full one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from ..runs import read_json, write_json
from .harness import Cell

#: per-step records of a training log that depend on the arithmetic, not on the clock
_TIMING = ("seconds",)


def parse_look(spec: str, rows: dict) -> list[tuple]:
    """``ROW:SEED,...`` as (row, seed) pairs; a reference row may omit ``:SEED`` (it has one cell, seed 0)."""
    out = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        label, _, seed = item.partition(":")
        if label not in rows:
            raise UserError(f"--look {item}: unknown row {label!r}; rows are {', '.join(rows)}")
        try:
            seed_n = int(seed) if seed else 0
        except ValueError:
            raise UserError(f"--look {item}: the seed after ':' must be an integer, e.g. siss-lambda0.5:0") from None
        out.append((rows[label], seed_n))
    if not out:
        raise UserError("--look names no cell: give ROW:SEED, e.g. --look siss-lambda0.5:0")
    return out


def log_agreement(recorded: list[dict], rebuilt: list[dict]) -> dict:
    """How closely a rebuilt training run repeats the recorded one: whether every step's numbers (timings aside) are
    the same, and else the largest relative difference of any logged number and the first step that differs (a run
    recorded by an older version of the code can differ in the last float32 bits)."""
    strip = [[{k: v for k, v in r.items() if k not in _TIMING} for r in log] for log in (recorded, rebuilt)]
    out = {"identical": strip[0] == strip[1], "steps": [len(recorded), len(rebuilt)]}
    if not out["identical"] and len(recorded) == len(rebuilt):
        diffs = [(abs(a[k] - b[k]) / max(abs(a[k]), abs(b[k]), 1e-30), a["step"])
                 for a, b in zip(*strip) for k in a if k in b and a[k] != b[k]]
        out["max_relative_difference"] = max((d for d, _ in diffs), default=0.0)
        out["first_step_that_differs"] = min((s for _, s in diffs), default=None)
        out["same_keys"] = all(a.keys() == b.keys() for a, b in zip(*strip))
    return out


def look_cells(cfg, rows: dict, protocol, rebuild) -> list[dict]:
    """Look at each cell of ``cfg.look`` (see the module); ``rebuild(cell, log)`` returns the cell's model, appending
    its training run's per-step records to ``log``."""
    from ..data import to_uint8
    from ..metrics.rates import target_rate
    from ..sampling import ddpm_sample, save_grid

    root = Path(cfg.out)
    todo = []
    for row, seed in parse_look(cfg.look, rows):  # every cell is checked before any is rebuilt
        cell = Cell.of(root, row, seed)
        res = cell.load()
        if res is None:
            raise UserError(f"--look {row.label}:{seed}: {cell.dir} holds no finished cell; run the benchmark first")
        numbers, source = res["metrics"]["tshirt_rate"].get("indices"), "the cell's own counted samples"
        if numbers is None:
            base_cell = Cell.of(root, rows["pretrained"], 0).load() if "pretrained" in rows else None
            numbers = None if base_cell is None else base_cell["metrics"]["tshirt_rate"].get("indices")
            if numbers is None:
                raise UserError(f"--look {row.label}:{seed}: the cell did not record which samples it counted, and "
                                "no pretrained cell that did is here to look through; compute the pretrained row")
            source = "the base model's T-shirt samples (the cell did not record its own)"
        todo.append((cell, res, numbers, source))
    out = []
    for cell, res, numbers, source in todo:
        log: list = []
        model = rebuild(cell, log)
        samples = ddpm_sample(model, 0, cfg.sample_steps, seed=0, indices=numbers, sampler=cfg.sampler)
        rate = target_rate(samples, protocol.target)
        hit = [j for j in range(len(numbers)) if float(rate.distances[j]) <= rate.threshold]
        count, recorded = res["metrics"]["tshirt_rate"]["count"], res["metrics"]["tshirt_rate"].get("distances")
        record = {
            "cell": cell.dir.name, "looked_through": source, "samples_drawn": len(numbers),
            "counted": [int(numbers[j]) for j in hit], "distances": [round(float(rate.distances[j]), 4) for j in hit],
            "cell_count": count, "found": len(hit), "all_found": len(hit) == count,
            "recorded_distances": recorded,
            "distances_reproduced": None if recorded is None else
            np.allclose([float(rate.distances[j]) for j in hit], recorded, atol=1e-3) and len(hit) == len(recorded),
            "training_log": log_agreement(res.get("log", []), log) if log else None,
            "sampler": cfg.sampler, "sample_steps": cfg.sample_steps,
        }
        write_json(cell.dir / "look.json", record, indent=1)
        if hit:  # the T-shirt is a public Fashion-MNIST image: showing its copies is the point of looking
            np.save(cell.dir / "counted.npy", to_uint8(samples[hit]))
            save_grid(samples[hit], cell.dir / "counted.png", ncol=8,
                      labels=[f"#{numbers[j]} d={float(rate.distances[j]):.2f}" for j in hit],
                      title=f"{cell.row.label} seed {cell.key}: samples counted as the T-shirt (index, L2 distance)")
        print(f"[look {cell.dir.name}] {len(hit)} of the cell's {count} T-shirt samples found among {len(numbers)} "
              f"drawn ({source}); training log: {record['training_log']}", flush=True)
        out.append(record)
    return out


def counted_overview(root: Path, results: list[dict], path: Path) -> Path | None:
    """One picture of every sample the method cells counted as the T-shirt (a labelled grid per cell, one under the
    other), from the cells' ``counted.npy``; the numbers come from the cell's ``look.json`` when it was looked at,
    else from the cell's own record. None when no method cell kept any."""
    import torch

    from ..images import grid, save_png, stack

    parts = []
    for r in results:
        d = Path(root) / "cells" / f"{r['label']}-seed{r['seed']}"
        if r["method"] is None or not (d / "counted.npy").is_file():
            continue
        look = d / "look.json"
        src = read_json(look) if look.is_file() else r["metrics"]["tshirt_rate"]
        pixels = torch.from_numpy(np.load(d / "counted.npy")).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        numbers = src["counted"] if "counted" in src else src["indices"]
        labels = [f"#{i} d={x:.2f}" for i, x in zip(numbers, src["distances"])]
        if len(labels) != len(pixels):
            raise UserError(f"{d}: counted.npy holds {len(pixels)} samples but their record names {len(labels)}; "
                            "look at the cell again (--look)")
        parts.append(grid(pixels, 10, labels, title=f"{r['label']} seed {r['seed']}: {len(pixels)} counted "
                                                    f"(of {r['metrics']['tshirt_rate']['count']})"))
    if not parts:
        return None
    return save_png(stack(parts), path)


def with_looked_numbers(root: Path, results: list[dict]) -> list[dict]:
    """``results`` where a cell that did not record which samples it counted, but whose look found all of them
    (``look.json``: as many as the cell counted), carries the look's numbers and distances (marked
    ``numbers_from``), so it can be paired with other rows on the same sample seeds; every other cell as it is."""
    out = []
    for r in results:
        look = Path(root) / "cells" / f"{r['label']}-seed{r['seed']}" / "look.json"
        rate = r["metrics"]["tshirt_rate"]
        if "indices" not in rate and look.is_file():
            seen = read_json(look)
            if seen["all_found"] and seen["found"] == rate["count"]:
                rate = {**rate, "indices": seen["counted"], "distances": seen["distances"],
                        "numbers_from": "look.json: the rebuilt model, drawn at the base model's T-shirt seeds"}
                r = {**r, "metrics": {**r["metrics"], "tshirt_rate": rate}}
        out.append(r)
    return out
