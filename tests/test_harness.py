"""The benchmark harness: rows read from YAML presets, cells cached on disk (and refused when their row changed), the
benchmark-directory check, aggregation over cells, the reproducing command line, and the package's layering."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from diffunlearn.bench.harness import (
    Cell,
    CellResult,
    Pool,
    Row,
    check_bench_dir,
    command_line,
    load_rows,
    run_cells,
    select,
    stat,
)
from diffunlearn.errors import UserError
from diffunlearn.methods import MethodSpec
from diffunlearn.trainer import TrainerConfig

PRESETS = {"bench/toy": (), "bench/mnist-tshirt": ("pretrained", "retrain"),
           "bench/instance": ("pretrained", "retrain"), "bench/prompt": ()}


def _preset(tmp_path, text: str) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_shipped_preset_loads_and_every_method_row_builds(name):
    rows = load_rows(name, PRESETS[name], ("quick",))[0]
    assert rows and all(r.method or r.reference for r in rows.values())
    for row in rows.values():
        if row.method:
            spec = MethodSpec(row.method.name, {k: 1.0 if v == "auto" else v for k, v in row.method.params.items()})
            assert spec.build().name == row.method.name
        row.trainer_config(TrainerConfig()).validate()


def test_the_mnist_preset_keeps_the_rows_existing_benchmark_directories_were_computed_with():
    """Cells of ``bench mnist-tshirt`` written before the rows were a preset are found by label and carry
    (method, hyperparameters, steps, batch size); the preset must give every label the same four."""
    before = {
        "naive": ("naive", {}, 300, 64),
        "siss-lambda0": ("siss", {"lam": 0.0, "scaling_norm": 5.0}, 300, 64),
        "siss-lambda0.5": ("siss", {"lam": 0.5, "scaling_norm": 5.0}, 300, 64),
        "siss-lambda0.5-refresh10": ("siss", {"lam": 0.5, "scaling_norm": 5.0, "norm_refresh": 10}, 300, 64),
        "siss-nois": ("siss-nois", {"scaling_norm": 5.0}, 300, 64),
        "erasediff": ("erasediff", {}, 100, 64),
        "siss-lambda1": ("siss", {"lam": 1.0, "scaling_norm": 5.0}, 100, 64),
        "neggrad": ("neggrad", {}, 100, 64),
        "retrack": ("retrack", {"lambda_r": 0.005, "knn": 10}, 50, 128),
    }
    rows = load_rows("bench/mnist-tshirt", ("pretrained", "retrain"))[0]
    assert list(rows) == ["pretrained", "retrain", *before]
    for label, (name, params, steps, batch) in before.items():
        t = rows[label].trainer_config(TrainerConfig())
        assert (rows[label].method.name, rows[label].method.params, t.steps, t.batch_size) == \
            (name, params, steps, batch), label
        assert (t.lr, t.beta1, t.beta2, t.weight_decay, t.clip_norm) == (5e-5, 0.95, 0.999, 1e-6, 1.0)


def test_rows_read_like_the_unlearn_command_with_auto_and_trainer_blocks(tmp_path):
    """``lambda`` is ``lam`` as on the command line, ``1e-3`` (a string to YAML) is a float, ``auto`` stays for the
    benchmark to measure; the preset's trainer block lies under a row's own, both over the benchmark's settings."""
    name = _preset(tmp_path, "trainer: {lr: 1.0e-4, batch_size: 8}\nrows:\n"
                             "  - {label: a, method: {name: siss, lambda: 0.25, scaling_norm: auto}}\n"
                             "  - {label: b, method: {name: erasediff-light, eta: 1e-3}, trainer: {batch_size: 2},"
                             " default: false, cost: 5}\n"
                             "  - {label: ref, reference: pretrained}\n")
    rows = load_rows(name, ("pretrained",))[0]
    assert rows["a"].method == MethodSpec("siss", {"lam": 0.25, "scaling_norm": "auto"}) and rows["a"].auto
    assert rows["b"].method.params == {"eta": 1e-3} and not rows["b"].auto
    base = TrainerConfig(steps=7, lr=1.0, seed=3)
    a, b = rows["a"].trainer_config(base), rows["b"].trainer_config(base)
    assert (a.steps, a.lr, a.batch_size, a.seed) == (7, 1e-4, 8, 3) and b.batch_size == 2
    assert [r.label for r in select(rows, "")] == ["a", "ref"]
    assert [r.label for r in select(rows, " b, a,b ")] == ["b", "a"]
    assert rows["ref"].settings() == {"label": "ref", "reference": "pretrained", "trainer": {"lr": 1e-4,
                                                                                            "batch_size": 8}}


@pytest.mark.parametrize("text, message", [
    ("rows:\n  - {label: a, method: {name: nope}}\n", "unknown method 'nope'"),
    ("rows:\n  - {label: a, method: {name: naive, lam: 0.5}}\n", "--lambda does not apply to method naive"),
    ("rows:\n  - {label: a, method: {name: siss, lam: abc}}\n", "--lambda must be float"),
    ("rows:\n  - {label: a, method: {name: naive}, reference: pretrained}\n", "either a method block or a reference"),
    ("rows:\n  - {label: a, reference: other}\n", "unknown reference 'other'"),
    ("rows:\n  - {label: a, method: naive}\n  - {label: a, method: neggrad}\n", "two rows labelled 'a'"),
    ("rows:\n  - {label: a, method: naive, trainer: {stpes: 3}}\n", "did you mean 'steps'"),
    ("rows:\n  - {label: a, method: naive, seeds: 3}\n", "unknown key 'seeds' in row 'a'"),
    ("rows:\n  - {label: a, method: {name: siss, lam: auto}}\n", "only scaling_norm may be auto"),
    ("rows:\n  - {label: a, method: naive, cost: high}\n", "cost a number"),
    ("rows: []\n", "needs rows"),
    ("rows:\n  - {label: a, method: naive}\nworkers: 2\n", "unknown key 'workers' in preset"),
])
def test_a_bad_preset_is_one_line_naming_what_to_fix(tmp_path, text, message):
    with pytest.raises(UserError, match=message) as e:
        load_rows(_preset(tmp_path, text), ("pretrained",))
    assert "\n" not in str(e.value)


def test_unknown_rows_and_presets_are_named():
    rows = load_rows("bench/prompt")[0]
    with pytest.raises(UserError, match="unknown benchmark row 'nope': rows are siss-lambda0.5, "):
        select(rows, "naive,nope")
    with pytest.raises(UserError, match="--rows names no row"):
        select(rows, " , ")
    with pytest.raises(UserError,
                       match="known presets are bench/class, bench/instance, bench/mnist-tshirt, bench/prompt"):
        load_rows("bench/nope")


def _double(cell: Cell) -> CellResult:
    return cell.result(metrics={"value": 2 * cell.key})


def test_cells_are_cached_resumed_and_refused_when_their_row_changed(tmp_path, capsys):
    """A re-run loads finished cells and runs only the missing ones (longest first), results come back in the order
    of the cells; a cell written before rows were presets (no ``row``) is taken as it is; a cell whose row is now
    defined otherwise is an error, not a silent reuse."""
    slow, fast = Row("slow", MethodSpec("naive"), cost=9), Row("fast", MethodSpec("neggrad"), cost=1)
    cells = [Cell.of(tmp_path, fast, 0), Cell.of(tmp_path, slow, 0), Cell.of(tmp_path, fast, 1)]
    order: list = []
    results, ran, _ = run_cells(cells[:2], _double, progress=lambda r: order.append(r.label))
    assert ran == 2 and order == ["slow", "fast"] and [r.label for r in results] == ["fast", "slow"]
    assert (tmp_path / "cells" / "slow-seed0" / "result.json").is_file()
    stamp = (tmp_path / "cells" / "fast-seed0" / "result.json").stat().st_mtime_ns
    results, ran, _ = run_cells(cells, _double)
    assert ran == 1 and [r.metrics["value"] for r in results] == [0, 0, 2] and results[0].row == fast.settings()
    # result.json is the typed result's to_dict, read back whole
    saved = json.loads((tmp_path / "cells" / "fast-seed1" / "result.json").read_text())
    assert saved["seed"] == 1 and CellResult.from_dict(saved) == results[2] and results[2].to_dict() == saved
    assert (tmp_path / "cells" / "fast-seed0" / "result.json").stat().st_mtime_ns == stamp
    assert "1 cell(s) to run, 2 cached" in capsys.readouterr().out

    legacy = tmp_path / "cells" / "fast-seed1" / "result.json"
    legacy.write_text(json.dumps({"label": "fast", "seed": 1, "value": 99}))
    old = Cell.of(tmp_path, fast, 1).load()
    assert (old.label, old.key, old.row, old.details) == ("fast", 1, None, {"value": 99})
    changed = Row("slow", MethodSpec("naive"), trainer={"steps": 3}, cost=9)
    with pytest.raises(UserError, match="slow-seed0 was computed for row"):
        run_cells([Cell.of(tmp_path, changed, 0)], _double)
    target = Cell.of(tmp_path, Row("fast", MethodSpec("neggrad")), 7, "target{:04d}")
    assert target.dir.name == "fast-target0007" and target.result().to_dict()["target"] == 7


def test_worker_processes_return_every_result_in_order():
    with Pool(2) as pool:
        assert pool.map(pow, [(2, k) for k in range(5)]) == [1, 2, 4, 8, 16]
    with Pool(1) as pool:
        assert sorted(pool.imap([(pow, (3, 2)), (abs, (-4,))])) == [(0, 9), (1, 4)]


@dataclass
class _Cfg:
    out: str = "runs/x"
    steps: int = 3
    prompt: str = ""
    rows: str = ""
    tags: list = field(default_factory=list)


def test_bench_dir_resumes_only_with_its_settings(tmp_path):
    root = tmp_path / "b"
    check_bench_dir(root, _Cfg(), ("rows",))  # nothing there yet
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"out": str(root), "steps": 3}))  # started before 'prompt' existed
    check_bench_dir(root, _Cfg(out=str(root), rows="a,b"), ("rows", "out"))
    with pytest.raises(UserError, match=r"other settings \(steps\)"):
        check_bench_dir(root, _Cfg(out=str(root), steps=4), ("rows", "out"))
    with pytest.raises(UserError, match=r"other settings \(prompt\)"):
        check_bench_dir(root, _Cfg(out=str(root), prompt="x"), ("rows", "out"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="holds no benchmark"):
        check_bench_dir(other, _Cfg(), ())
    with pytest.raises(UserError, match="is not a directory"):
        check_bench_dir(other / "mine.txt", _Cfg(), ())


def test_stat_and_command_line():
    s = stat([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3) and s["n"] == 3
    assert s["std"] == pytest.approx(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) ** 0.5 / 2 ** 0.5)
    assert stat([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
    line = command_line("x", {"out": "runs/a b", "steps": 3, "prompt": "a cat", "rows": "p,q"}, _Cfg)
    assert line == "diffunlearn bench x --out 'runs/a b' --prompt 'a cat' --rows p,q"


def test_library_modules_never_import_the_command_line():
    """The CLI (cli.py, commands/) is the top floor: it imports the library, no library module imports it. (faults.py,
    the fault-injection suite behind ``diffunlearn faults``, and bench/scale_probe.py, the child process that runs one
    real command of ``bench scale``, drive the command line on purpose.)"""
    root = Path(__file__).resolve().parents[1] / "src" / "diffunlearn"
    bad = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] == "commands" or rel.name in ("cli.py", "faults.py", "scale_probe.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{'.' * node.level}{node.module or ''}.{a.name}" for a in node.names]
            else:
                continue
            bad += [f"{rel}: {n}" for n in names if {"cli", "commands"} & set(n.split("."))]
    assert not bad, bad


def _import_graph() -> dict[str, set[str]]:
    """Every module of the package -> the package modules it imports, at module top or inside a function (an
    import inside a function still ties the two modules together)."""
    root = Path(__file__).resolve().parents[1] / "src"
    modules = {}
    for path in (root / "diffunlearn").rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_pkg else parts)
        modules[name] = (path, name if is_pkg else name.rsplit(".", 1)[0])
    graph = {name: set() for name in modules}
    for name, (path, pkg) in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for t in targets:
                while t and t not in modules:  # a name imported from a module: the module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_between_files_or_between_folders():
    """No module imports, directly or through others, a module that imports it, counting imports inside functions;
    and the same between folders (each sub-package, or top-level module, as one node). A package's face
    (``__init__``) re-exporting its own modules is not a circle of the folder. The CLI drivers (faults.py,
    bench/scale_probe.py) run the command line in a child process and are left out."""
    graph = {k: v for k, v in _import_graph().items() if not k.endswith(("faults", "scale_probe"))}
    assert _cycles({k: {t for t in v if not (k.count(".") and t.startswith(k + "."))} for k, v in graph.items()}) == []

    def folder(m):
        parts = m.split(".")
        return ".".join(parts[:2])

    folders: dict[str, set[str]] = {}
    for k, v in graph.items():
        folders.setdefault(folder(k), set()).update(folder(t) for t in v if folder(t) != folder(k))
    assert _cycles(folders) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the search itself


#: modules that run a command and print what it shows (the command layer, the benchmark drivers, the fault suite,
#: --dry-run)
PRINTS = ("commands/", "bench/", "cli.py", "faults.py", "config.py")


def test_library_modules_report_through_the_logger_not_print(capsys):
    """Every other module reports through the ``diffunlearn`` logger (``console.logger``), whose handler writes to
    the stdout of the moment, and which a program embedding the library can silence."""
    import logging

    from diffunlearn.console import logger

    root = Path(__file__).resolve().parents[1] / "src" / "diffunlearn"
    printing = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(PRINTS):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                printing.append(f"{rel}:{node.lineno}")
    assert printing == []
    logger("diffunlearn.some.module").info("a line")
    assert capsys.readouterr().out == "a line\n"
    top = logging.getLogger("diffunlearn")
    level = top.level
    top.setLevel(logging.WARNING)
    try:
        logger("diffunlearn.some.module").info("not shown")
        assert capsys.readouterr().out == ""
    finally:
        top.setLevel(level)
