"""``diffunlearn bench mnist-tshirt --out DIR --look ROW:SEED,...``: look again at the samples a finished cell counted
as the T-shirt, without drawing its other samples.

A cell keeps the numbers of the samples it counted (sample ``i`` is seeded by ``i``) but not its model. Looking
rebuilds the cell's model (the reference model itself, or the same unlearning run with the cell's seed: training is
seeded, and the look compares the rebuilt run's per-step losses with the ones the cell recorded) and draws only
those samples, into the cell's ``look.png`` / ``look.npy``, with ``look.json`` (the cell's own files are left as they
are). A cell computed before cells recorded their numbers is looked at through the base model's T-shirt seeds (the
``pretrained`` cell's numbers): the record says how many of the cell's count were found there, so an incomplete look
is never mistaken for a full one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..runs import read_json, write_json
from .harness import Cell, CellResult, cell_dir

#: per-step records of a training log that depend on the clock, not on the arithmetic
_TIMING = ("seconds",)
#: a rebuilt run whose logged numbers differ from the recorded ones by at most this (relative) repeats it to float32
#: rounding: what a run recorded by an older version of the code can differ by
REPEATS_TO_ROUNDING = 1e-4


def parse_look(spec: str, rows: dict) -> list[tuple]:
    """``ROW:SEED,...`` as distinct (row, seed) pairs; a reference row has one cell (``pretrained`` or
    ``pretrained:0``), a method row needs its seed."""
    out: list[tuple] = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        label, colon, seed = item.partition(":")
        if label not in rows:
            raise UserError(f"--look {item}: unknown row {label!r}; rows are {', '.join(rows)}")
        row = rows[label]
        if row.reference is None and not colon:
            raise UserError(f"--look {item}: name the unlearning seed, e.g. --look {label}:0")
        try:
            seed_n = int(seed) if seed else 0
        except ValueError:
            raise UserError(f"--look {item}: the seed after ':' must be an integer, e.g. {label}:0") from None
        if row.reference is not None and seed_n != 0:
            raise UserError(f"--look {item}: {label} is a reference model with one cell; write {label}")
        if (row, seed_n) not in out:
            out.append((row, seed_n))
    if not out:
        raise UserError("--look names no cell: give ROW:SEED, e.g. --look siss-lambda0.5:0")
    return out


def _is_loss_or_gradient(key: str) -> bool:
    return key.startswith("loss") or key.startswith("grad_norm")


def log_agreement(recorded: list[dict], rebuilt: list[dict]) -> dict:
    """How closely a rebuilt training run repeats the recorded one: whether every step's numbers (timings aside) are
    the same, and else the first step that differs and, per logged name, the largest relative difference over the
    steps (a run recorded by an older version of the code can differ in the last float32 bits, or in a diagnostic
    whose definition changed)."""
    strip = [[{k: v for k, v in r.items() if k not in _TIMING} for r in log] for log in (recorded, rebuilt)]
    out: dict = {"identical": strip[0] == strip[1], "steps": [len(recorded), len(rebuilt)]}
    if not out["identical"] and len(recorded) == len(rebuilt):
        out["first_step_that_differs"] = next(a.get("step") for a, b in zip(*strip) if a != b)
        by_key: dict = {}
        for a, b in zip(*strip):
            for k in a.keys() & b.keys():
                d = abs(a[k] - b[k]) / max(abs(a[k]), abs(b[k]), 1e-30) if a[k] != b[k] else 0.0
                by_key[k] = max(by_key.get(k, 0.0), d)
        out["max_relative_difference"] = max(by_key.values(), default=0.0)
        out["max_relative_difference_by_name"] = dict(sorted(by_key.items()))
        out["same_keys"] = all(a.keys() == b.keys() for a, b in zip(*strip))
    return out


def repeats_run(look: dict) -> bool:
    """Whether a look's rebuilt model is the cell's model: a reference model, or a training run whose every logged
    loss and gradient norm, at every step, repeats the recorded one exactly or to float32 rounding
    (:data:`REPEATS_TO_ROUNDING`); other logged numbers are diagnostics whose definitions may change between versions.
    Looks written before the comparison was measured hold only ``training_log_reproduced`` (true: identical)."""
    if "training_log" not in look:
        return look.get("training_log_reproduced") is not False
    log = look["training_log"]
    if log is None or log["identical"]:
        return True
    by_name = log.get("max_relative_difference_by_name") or {}
    core = {k: v for k, v in by_name.items() if _is_loss_or_gradient(k)}
    return log["steps"][0] == log["steps"][1] and log.get("same_keys", False) and bool(core) and \
        max(core.values()) <= REPEATS_TO_ROUNDING


def save_counted(folder: Path, stem: str, samples, numbers: list[int], distances: list[float], title: str) -> None:
    """``stem.npy`` (uint8 pixels) and ``stem.png`` (a grid labelled with each sample's number and distance) of the
    samples counted as the T-shirt (a public Fashion-MNIST image: showing its copies is the point of looking)."""
    from ..data import to_uint8
    from ..model.sampling import save_grid

    np.save(Path(folder) / f"{stem}.npy", to_uint8(samples))
    save_grid(samples, Path(folder) / f"{stem}.png", ncol=8,
              labels=[f"#{i} d={d:.2f}" for i, d in zip(numbers, distances)], title=title)


def _numbers_to_look_at(cell: Cell, res: CellResult, rows: dict, root: Path, item: str) -> tuple[list[int], str]:
    numbers, source = res.metrics["tshirt_rate"].get("indices"), "the cell's own counted samples"
    if numbers is None:
        base_cell = Cell.of(root, rows["pretrained"], 0).load() if "pretrained" in rows else None
        numbers = None if base_cell is None else base_cell.metrics["tshirt_rate"].get("indices")
        if numbers is None:
            raise UserError(f"--look {item}: the cell did not record which samples it counted, and no pretrained "
                            "cell that did is here to look through; compute the pretrained row first")
        source = "the base model's T-shirt samples (the cell did not record its own)"
    if not numbers or not res.metrics["tshirt_rate"]["count"]:
        raise UserError(f"--look {item}: the cell counted no T-shirt, so there is nothing to look at")
    return [int(i) for i in numbers], source


def look_cells(cfg, rows: dict, protocol, rebuild) -> list[dict]:
    """Look at each cell of ``cfg.look`` (see the module); ``rebuild(cell, log)`` returns the cell's model, appending
    its training run's per-step records to ``log``."""
    from ..metrics.rates import target_rate
    from ..model.sampling import ddpm_sample

    root = Path(cfg.out)
    todo = []
    for row, seed in parse_look(cfg.look, rows):  # every cell is checked before any is rebuilt
        cell = Cell.of(root, row, seed)
        res = cell.load()
        item = f"{row.label}:{seed}"
        if res is None:
            raise UserError(f"--look {item}: {cell.dir} holds no finished cell; run the benchmark first")
        todo.append((cell, res, *_numbers_to_look_at(cell, res, rows, root, item)))
    out = []
    for cell, res, numbers, source in todo:
        log: list = []
        model = rebuild(cell, log)
        samples = ddpm_sample(model, 0, cfg.sample_steps, seed=0, indices=numbers, sampler=cfg.sampler)
        rate = target_rate(samples, protocol.target)
        own = res.metrics["tshirt_rate"]
        counted = [numbers[j] for j in rate.hits]
        distances = [round(float(rate.distances[j]), 4) for j in rate.hits]
        recorded = dict(zip(own["indices"], own["distances"])) if "distances" in own else None
        record = {
            "cell": cell.dir.name, "looked_through": source, "samples_drawn": len(numbers),
            "counted": counted, "distances": distances, "cell_count": own["count"], "found": len(counted),
            "all_found": len(counted) == own["count"],
            # the same samples at the same distances as the cell recorded (None: it recorded none)
            "distances_reproduced": None if recorded is None else sorted(counted) == sorted(recorded) and all(
                abs(d - recorded[i]) <= 1e-3 for i, d in zip(counted, distances)),
            "training_log": log_agreement(res.details.get("log", []), log) if cell.row.reference is None else None,
            "sampler": cfg.sampler, "sample_steps": cfg.sample_steps,
        }
        write_json(cell.dir / "look.json", record, indent=1)
        if counted:
            save_counted(cell.dir, "look", samples[rate.hits], counted, distances,
                         f"{cell.row.label} seed {cell.key}: samples counted as the T-shirt, looked at again "
                         "(number, L2 distance)")
        print(f"[look {cell.dir.name}] {len(counted)} of the cell's {own['count']} T-shirt samples found among "
              f"{len(numbers)} drawn ({source}); training log: {record['training_log']}", flush=True)
        out.append(record)
    return out


def counted_overview(root: Path, results: list[CellResult], path: Path) -> Path | None:
    """One picture of every sample the method cells counted as the T-shirt (a labelled grid per cell, one under the
    other): the cell's own ``counted.npy`` with its record, else its look's ``look.npy`` with ``look.json``. None
    when no method cell kept any."""
    import torch

    from ..runs.images import save_png, stack, tiles

    parts = []
    for r in results:
        d = cell_dir(root, r.label, r.key)
        own = r.metrics["tshirt_rate"]
        if r.method is None:
            continue
        if (d / "counted.npy").is_file() and "indices" in own and "numbers_from" not in own:
            pixels, numbers, distances, note = np.load(d / "counted.npy"), own["indices"], own["distances"], ""
        elif (d / "look.npy").is_file() and (d / "look.json").is_file():
            look = read_json(d / "look.json")
            pixels, numbers, distances = np.load(d / "look.npy"), look["counted"], look["distances"]
            note = ", drawn again by --look"
        else:
            continue
        if len(numbers) != len(pixels):
            raise UserError(f"{d}: {len(pixels)} saved samples but their record names {len(numbers)}; remove the "
                            "cell's look.* files and look again (--look)")
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        parts.append(tiles(x, [f"#{i} d={v:.2f}" for i, v in zip(numbers, distances)], 10, tile_side=64,
                           title=f"{r.label} seed {r.key}: {len(x)} counted (of {own['count']}){note}"))
    if not parts:
        return None
    return save_png(stack(parts), path)


def with_looked_numbers(root: Path, results: list[CellResult]) -> list[CellResult]:
    """``results`` where a cell that did not record which samples it counted carries its look's numbers and
    distances (marked ``numbers_from``) when the look found all of them on a model that is the cell's
    (:func:`repeats_run`), so it can be paired with other rows on the same sample seeds; every other cell as it is."""
    out = []
    for r in results:
        look = cell_dir(root, r.label, r.key) / "look.json"
        rate = r.metrics["tshirt_rate"]
        if "indices" not in rate and look.is_file():
            seen = read_json(look)
            if seen["all_found"] and seen["found"] == rate["count"] and repeats_run(seen):
                rate = {**rate, "indices": seen["counted"], "distances": seen["distances"],
                        "numbers_from": "look.json: the rebuilt model, drawn at the base model's T-shirt seeds"}
                r = dataclasses.replace(r, metrics={**r.metrics, "tshirt_rate": rate})
        out.append(r)
    return out
