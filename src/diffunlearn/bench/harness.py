"""The harness every benchmark runs on: rows from a YAML preset, cells cached on disk, worker processes, aggregation
over cells, and the results files.

- A **preset** (``presets/bench/<name>.yaml``, or any YAML file) lists the benchmark's rows: each a ``label`` and
  either a ``method`` block (``{name: siss, lam: 0.5, scaling_norm: auto}``, read like ``diffunlearn unlearn``'s
  method block; ``auto`` is the paper's scaling_norm rule, measured per cell) or a ``reference`` (a model the
  benchmark provides: ``pretrained``, ``retrain``); optionally the row's own ``trainer`` settings (over the preset's
  top-level ``trainer`` block, over the benchmark's), ``default: false`` (run only when named) and ``cost`` (relative
  run time: the longest cells start first).
- A **cell** is a row x a seed (or a target image). It lives in ``cells/<label>-<key>/`` and counts as done once its
  ``result.json`` is written (atomically), so a re-run with the same settings loads it and runs only what is missing.
  The result records the row it was computed for; a cell of a row defined otherwise since is refused, not reused.
- A **benchmark directory** holds ``config.json``, the settings it was started with; a re-run must use the same ones,
  except the settings that only select work (rows, seeds, ...).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import UserError
from ..methods import MethodSpec
from ..runs import read_json, write_json
from ..trainer import TrainerConfig

ROW_KEYS = ("label", "method", "reference", "trainer", "default", "cost")


# ---------------------------------------------------------------- rows and presets


@dataclass
class Row:
    """One row of a benchmark: a method (with its hyperparameters) or a reference model, and its trainer settings."""

    label: str
    method: MethodSpec | None = None
    reference: str | None = None
    trainer: dict = field(default_factory=dict)
    default: bool = True
    cost: float = 2.0

    @property
    def auto(self) -> bool:
        """Whether the method has settings to measure per cell (``scaling_norm: auto``)."""
        return self.method is not None and any(v == "auto" for v in self.method.params.values())

    def trainer_config(self, base: TrainerConfig) -> TrainerConfig:
        """``base`` (the benchmark's trainer settings) with this row's trainer block over it."""
        from ..config import build_config

        return build_config(TrainerConfig, raw=self.trainer, base=base, where=f"row {self.label}")

    def settings(self) -> dict:
        """What the row computes (not how it is scheduled): stored with each cell, compared when a cell is reused."""
        out: dict = {"label": self.label}
        if self.method is not None:
            out["method"] = {"name": self.method.name, **self.method.params}
        else:
            out["reference"] = self.reference
        if self.trainer:
            out["trainer"] = dict(self.trainer)
        return out


def load_rows(name: str, references: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """The rows of preset ``name`` by label, and its other top-level settings (only the keys in ``extra``)."""
    from ..config import load_yaml

    raw = load_yaml(name)
    unknown = [k for k in raw if k not in ("rows", "trainer", *extra)]
    if unknown:
        raise UserError(f"unknown key {unknown[0]!r} in preset {name}: known are rows, trainer"
                        + "".join(f", {k}" for k in extra))
    shared = raw.get("trainer") or {}
    if not isinstance(shared, dict) or not isinstance(raw.get("rows"), list) or not raw["rows"]:
        raise UserError(f"preset {name} needs rows: a list of {{label: ..., method: {{name: ...}}}} and an optional "
                        "trainer: mapping")
    rows: dict[str, Row] = {}
    for entry in raw["rows"]:
        row = _row(entry, shared, references, name)
        if row.label in rows:
            raise UserError(f"preset {name} has two rows labelled {row.label!r}")
        rows[row.label] = row
    return rows, {k: raw[k] for k in extra if k in raw}


def _row(entry, shared: dict, references: tuple[str, ...], preset: str) -> Row:
    if not isinstance(entry, dict) or "label" not in entry:
        raise UserError(f"every row of preset {preset} needs a label, got {entry!r}")
    where = f"row {entry['label']!r} of preset {preset}"
    bad = [k for k in entry if k not in ROW_KEYS]
    if bad:
        raise UserError(f"unknown key {bad[0]!r} in {where}: known are {', '.join(ROW_KEYS)}")
    if ("method" in entry) == ("reference" in entry):
        raise UserError(f"{where} needs either a method block or a reference ({', '.join(references) or 'none'})")
    if "reference" in entry and entry["reference"] not in references:
        raise UserError(f"{where}: unknown reference {entry['reference']!r}: known are {', '.join(references)}")
    spec = None
    if "method" in entry:
        block = entry["method"]
        block = {"name": block} if isinstance(block, str) else block
        if not isinstance(block, dict):
            raise UserError(f"the method of {where} must be a name or a mapping with name:")
        auto = {k for k, v in block.items() if v == "auto"}
        if auto - {"scaling_norm", "scaling-norm"}:
            raise UserError(f"{where}: only scaling_norm may be auto (the paper's rule), not {', '.join(sorted(auto))}")
        checked = MethodSpec.resolve({k: (1.0 if k in auto else v) for k, v in block.items()}, None, MethodSpec(),
                                     where)  # an unknown method or setting fails here
        norm = {k.replace("-", "_") for k in auto}
        spec = MethodSpec(checked.name, {k: ("auto" if k in norm else v) for k, v in checked.params.items()})
    own = entry.get("trainer") or {}
    if not isinstance(own, dict) or not isinstance(entry.get("cost", 2.0), (int, float)):
        raise UserError(f"{where}: trainer must be a mapping of option: value and cost a number")
    row = Row(str(entry["label"]), spec, entry.get("reference"), {**shared, **own}, bool(entry.get("default", True)),
              float(entry.get("cost", 2.0)))
    row.trainer_config(TrainerConfig()).validate()  # unknown trainer keys or bad values fail at load time
    return row


def select(rows: dict[str, Row], spec: str) -> list[Row]:
    """The rows named in the comma-separated ``spec`` (each once, in its order); ``""``: the default rows."""
    if not spec.strip():
        return [r for r in rows.values() if r.default]
    labels = list(dict.fromkeys(x.strip() for x in spec.split(",") if x.strip()))
    unknown = [x for x in labels if x not in rows]
    if unknown:
        raise UserError(f"unknown benchmark row {unknown[0]!r}: rows are {', '.join(rows)}")
    if not labels:
        raise UserError("--rows names no row")
    return [rows[x] for x in labels]


# ---------------------------------------------------------------- the benchmark directory and its cells


def check_bench_dir(root, cfg, free: tuple[str, ...]) -> None:
    """A benchmark directory is resumable only with the settings it was started with (``free`` settings may differ
    between runs); any other non-empty directory is refused. ``cfg`` is the benchmark's config dataclass."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} exists and is not a directory")
    stored = root / "config.json"
    if stored.exists():
        try:
            prev = json.loads(stored.read_text())
        except ValueError:
            raise UserError(f"{stored} is not valid JSON: choose another --out") from None
        defaults = asdict(type(cfg)())  # a directory started before a setting existed used its default
        diff = [k for k, v in asdict(cfg).items() if k not in free and prev.get(k, defaults[k]) != v]
        if diff:
            raise UserError(f"{root} holds a benchmark with other settings ({', '.join(diff)}): choose another --out")
    elif root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists, is not empty and holds no benchmark: choose another --out")


def open_bench_dir(root, cfg) -> Path:
    """Create the benchmark directory and record its settings (after every input was checked)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "config.json", asdict(cfg))
    return root


def cell_dir(root, label: str, key: int, name: str = "seed{}") -> Path:
    """The folder of the cell of row ``label`` and ``key`` (a seed, or a target image) in a benchmark directory."""
    return Path(root) / "cells" / f"{label}-{name.format(key)}"


@dataclass
class CellResult:
    """A finished cell: the row it ran (``label``; ``row``: the row's settings, set when saved), its ``key`` (a seed,
    or a target image: ``key_name``), the method as it ran, the benchmark's measurements of the model it gave
    (``metrics``) and the benchmark's own record of the run (``details``: seconds, curves, logs, the measured
    strength, ...). ``to_dict`` is the one serialiser of ``result.json``; ``from_dict`` reads it back."""

    label: str
    key: int
    metrics: dict = field(default_factory=dict)
    method: str | None = None
    hyperparameters: dict = field(default_factory=dict)
    steps: int | None = None
    details: dict = field(default_factory=dict)
    row: dict | None = None
    key_name: str = "seed"

    OWN = ("label", "metrics", "method", "hyperparameters", "steps", "row")

    def to_dict(self) -> dict:
        return {"label": self.label, self.key_name: self.key, "method": self.method,
                "hyperparameters": self.hyperparameters, "steps": self.steps, "metrics": self.metrics,
                **self.details, **({"row": self.row} if self.row is not None else {})}

    @classmethod
    def from_dict(cls, d: dict, key_name: str = "seed") -> "CellResult":
        return cls(d["label"], d.get(key_name, 0), d.get("metrics", {}), d.get("method"), d.get("hyperparameters", {}),
                   d.get("steps"), {k: v for k, v in d.items() if k not in cls.OWN and k != key_name}, d.get("row"),
                   key_name)


@dataclass
class Cell:
    """One row x one key (a seed, or a target image: ``key_name``) in ``root/cells/<label>-<name>/``."""

    row: Row
    key: int
    dir: Path
    key_name: str = "seed"

    @classmethod
    def of(cls, root, row: Row, key: int, name: str = "seed{}") -> "Cell":
        return cls(row, key, cell_dir(root, row.label, key, name), name.partition("{")[0] or "seed")

    def result(self, **fields) -> CellResult:
        """This cell's result: its row's label, its key and ``fields`` (see :class:`CellResult`)."""
        return CellResult(self.row.label, self.key, key_name=self.key_name, **fields)

    def load(self) -> CellResult | None:
        """The cell's stored result, or None when it has not finished; a result of another row definition is an
        error (cells written before rows were presets carry no row and are taken as they are)."""
        path = self.dir / "result.json"
        if not path.is_file():
            return None
        res = CellResult.from_dict(read_json(path), self.key_name)
        if res.row is not None and res.row != self.row.settings():
            raise UserError(f"{self.dir} was computed for row {res.row}, not {self.row.settings()}: choose "
                            "another --out, or restore the row's definition")
        return res

    def save(self, result: CellResult) -> CellResult:
        result = dataclasses.replace(result, row=self.row.settings())
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "result.json", result.to_dict(), indent=1)  # the cell exists only when complete
        return result


def run_cells(cells: list[Cell], job: Callable[[Cell], CellResult], workers: int = 1,
              progress: Callable[[CellResult], None] | None = None, also: list[tuple] = ()
              ) -> tuple[list[CellResult], int, list]:
    """Load the finished cells, run the others with ``job(cell)`` (longest first; with ``workers > 1`` in spawned
    processes, so ``job`` must be picklable) and save each as it finishes. ``also``: further ``(fn, args)`` calls to
    run beside them. Returns the results in the order of ``cells``, the number of cells run, and the results of
    ``also``."""
    results: list = [c.load() for c in cells]
    todo = sorted((i for i, r in enumerate(results) if r is None), key=lambda i: -cells[i].row.cost)
    print(f"{len(todo)} cell(s) to run, {len(cells) - len(todo)} cached; {workers} worker(s)", flush=True)
    calls = [(job, (cells[i],)) for i in todo] + list(also)
    extra: list = [None] * len(also)
    with Pool(min(workers, max(1, len(calls)))) as pool:
        for n, res in pool.imap(calls):
            if n < len(todo):
                results[todo[n]] = cells[todo[n]].save(res)
                if progress:
                    progress(results[todo[n]])
            else:
                extra[n - len(todo)] = res
    return results, len(todo), extra


class Pool:
    """Runs calls in ``workers`` spawned processes (one torch thread each), or inline when ``workers == 1``."""

    def __init__(self, workers: int):
        self.workers = max(1, int(workers))
        self.ex = None
        if self.workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.ex = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))

    def imap(self, calls: list[tuple]) -> Iterator[tuple[int, object]]:
        """``(index, result)`` of each ``(fn, args)`` call as it finishes."""
        if self.ex is None:  # inline: jobs set torch to one thread; give the caller its setting back
            threads = torch.get_num_threads()
            try:
                for i, (fn, args) in enumerate(calls):
                    yield i, fn(*args)
            finally:
                torch.set_num_threads(threads)
            return
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        futures = {self.ex.submit(fn, *args): i for i, (fn, args) in enumerate(calls)}
        try:
            for f in as_completed(futures):
                yield futures[f], f.result()
        except BrokenProcessPool:
            raise UserError("a benchmark worker process died (out of memory, or a script without an "
                            "`if __name__ == '__main__':` guard re-ran itself in the spawned worker); "
                            "retry with --workers 1") from None

    def map(self, fn, arglists: list[tuple]) -> list:
        out: list = [None] * len(arglists)
        for i, res in self.imap([(fn, args) for args in arglists]):
            out[i] = res
        return out

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_CACHE: dict = {}


def per_process(name: str, key, build: Callable[[], object]):
    """What ``build()`` returns, built once per process for ``key`` (a new key rebuilds it): the data, probes and
    models each worker loads once for all its cells."""
    if name not in _CACHE or _CACHE[name][0] != key:
        _CACHE[name] = (key, build())
    return _CACHE[name][1]


def weights_stamp(folder) -> list:
    """The weight files under ``folder`` with their modification times: a model saved again changes it."""
    folder = Path(folder)
    return [(str(p), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*.safetensors"))] if folder.is_dir() else []


# ---------------------------------------------------------------- aggregation and results


def stat(values) -> dict:
    """Mean and standard deviation (ddof 1; 0 for one value) over cells."""
    v = np.asarray(list(values), dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def aggregate(results: list[CellResult], labels: list[str], summarise: Callable[[list[CellResult]], dict]) -> dict:
    """One summary per row label, in ``labels`` order, over that row's cells (rows without cells are left out)."""
    out = {}
    for label in labels:
        cells = [r for r in results if r.label == label]
        if cells:
            out[label] = summarise(cells)
    return out


def pm(s: dict | None, spec: str = "{:.2f}", mean_alone: bool = False) -> str:
    """``mean ± std`` (``mean_alone``: the mean only), or a dash when there is nothing."""
    if not s:
        return "—"
    return spec.format(s["mean"]) if mean_alone else (spec + " ± " + spec).format(s["mean"], s["std"])


def command_line(benchmark: str, cfg: dict, cls) -> str:
    """The ``diffunlearn bench`` command that reproduces ``cfg``: ``--out`` and the settings that are not defaults."""
    defaults = asdict(cls())
    flags = {f.name: f.metadata.get("flag", "--" + f.name.replace("_", "-")) for f in dataclasses.fields(cls)}
    parts = [f"diffunlearn bench {benchmark}", "--out", shlex.quote(str(cfg["out"]))]
    for k, v in cfg.items():
        if k != "out" and k in defaults and v != defaults[k]:
            parts += [flags[k], shlex.quote(str(v))]
    return " ".join(parts)


def write_results(root, summary: dict, markdown: str) -> None:
    """``results.md`` and ``results.json`` (the table is also printed)."""
    root = Path(root)
    (root / "results.md").write_text(markdown)
    write_json(root / "results.json", summary)
    print(markdown)


__all__ = ["Cell", "CellResult", "Pool", "Row", "aggregate", "check_bench_dir", "command_line", "load_rows",
           "open_bench_dir", "per_process", "pm", "run_cells", "select", "stat", "weights_stamp", "write_results"]
