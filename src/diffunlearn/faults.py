"""Fault injection: every bad input the CLI must meet with one line, a non-zero exit and nothing changed on disk,
plus kill-and-resume trials. ``diffunlearn faults`` runs them all and ends with ``N passed, N failed``."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass
class Fault:
    name: str
    expect: str            # a substring of the one-line message
    setup: Callable[[Path], list[str]]   # builds the situation under a fresh folder, returns the argv
    fix: str               # what the message tells the user to do
    during: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # injected while it runs


def _model(tmp: Path) -> Path:
    import torch

    from .models import DiffusionModel, build_scheduler, build_unet, save_model

    if not (tmp / "model" / "model_index.json").exists():
        torch.manual_seed(0)
        save_model(DiffusionModel(build_unet("tiny", 8, 1), build_scheduler()), tmp / "model")
    return tmp / "model"


def _data(tmp: Path, n: int = 20, size: int = 8, channels: int | None = None, name: str = "data.npy") -> Path:
    rng = np.random.default_rng(0)
    shape = (n, size, size) if channels is None else (n, size, size, channels)
    np.save(tmp / name, rng.integers(0, 256, shape, dtype=np.uint8))
    return tmp / name


def _base(tmp: Path, *extra: str, data: Path | None = None, forget: str = "0,1") -> list[str]:
    return ["unlearn", "--model", str(_model(tmp)), "--data", str(data or _data(tmp)), "--forget", forget,
            "--steps", "2", "--batch-size", "2", "--out", str(tmp / "out"), "--verify", "off", *extra]


def _class_model(tmp: Path) -> Path:
    """A tiny class-conditional model (classes a, b, c and the null class) and labelled data beside it."""
    import torch

    from .models import DiffusionModel, build_scheduler, build_unet, save_model

    if not (tmp / "cmodel" / "model_index.json").exists():
        torch.manual_seed(0)
        save_model(DiffusionModel(build_unet("tiny", 8, 1, num_classes=3), build_scheduler(), classes=["a", "b", "c"]),
                   tmp / "cmodel")
        rng = np.random.default_rng(0)
        np.savez(tmp / "labelled.npz", images=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8),
                 labels=np.arange(12) % 3, classes=np.array(["a", "b", "c"]))
    return tmp / "cmodel"


def _class_base(tmp: Path, *extra: str, data: Path | None = None, forget: str = "class=b") -> list[str]:
    model = _class_model(tmp)
    return ["unlearn", "--model", str(model), "--data", str(data or tmp / "labelled.npz"), "--forget", forget,
            "--steps", "2", "--batch-size", "2", "--out", str(tmp / "out"), "--verify", "off", *extra]


def _weights_file(tmp: Path) -> Path:
    return _model(tmp) / "unet" / "diffusion_pytorch_model.safetensors"


def _missing_weights(tmp):
    _weights_file(tmp).unlink()
    return _base(tmp)


def _corrupt_weights(tmp):
    w = _weights_file(tmp)
    w.write_bytes(b"\x00" * 64 + os.urandom(256))
    return _base(tmp)


def _truncated_weights(tmp):
    w = _weights_file(tmp)
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return _base(tmp)


def _pickle_weights(tmp):
    w = _weights_file(tmp)
    w.rename(w.with_suffix(".bin"))
    return _base(tmp)


def _unreadable_image(tmp):
    folder = tmp / "images"
    folder.mkdir()
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "2.png").write_bytes(b"not a png at all")
    return _base(tmp, data=folder)


def _mixed_folder(tmp, odd_size: int, odd_mode: str):
    """Four 8x8 grey PNGs in a folder of class folders, the third of another size or colour mode."""
    from PIL import Image

    for i in range(4):
        folder = tmp / "images" / ("a" if i < 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        size, mode = (odd_size, odd_mode) if i == 2 else (8, "L")
        Image.new(mode, (size, size), 40 * i if mode == "L" else (40 * i,) * 3).save(folder / f"{i}.png")
    return _base(tmp, data=tmp / "images")


def _nan_data(tmp):
    a = np.random.default_rng(0).random((20, 8, 8)).astype(np.float32)
    a[3, 2, 2] = np.nan
    np.save(tmp / "nan.npy", a)
    return _base(tmp, data=tmp / "nan.npy")


def _busy_out(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("keep me")
    return _base(tmp)


def _full_disk(tmp):
    return _base(tmp)


@contextlib.contextmanager
def _no_space_left():
    """The disk fills up while the model is being written."""
    from unittest import mock

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device", "diffusion_pytorch_model.safetensors")

    with mock.patch("diffunlearn.models._write_pipeline", side_effect=full):
        yield


def _nan_loss(tmp):
    return _base(tmp, "--lr", "1e30", "--method", "neggrad", "--steps", "6", "--checkpoint-every", "1")


FAULTS: list[Fault] = [
    Fault("model directory without weights", "no weights", _missing_weights, "point --model at a directory with safetensors weights"),
    Fault("corrupt weights", "corrupt or truncated", _corrupt_weights, "re-export the weights"),
    Fault("truncated safetensors file", "corrupt or truncated", _truncated_weights, "re-copy the file"),
    Fault("pickle weights only", "--allow-pickle", _pickle_weights, "convert to safetensors, or --allow-pickle for a trusted file"),
    Fault("wrong number of channels", "but the model takes", lambda t: _base(t, data=_data(t, channels=3, name="rgb.npy")), "give images the model's shape"),
    Fault("wrong image size", "but the model takes", lambda t: _base(t, data=_data(t, size=16, name="big.npy")), "resize the images"),
    Fault("A not a subset of X", "outside the data set", lambda t: _base(t, forget="0,99"), "name items of X"),
    Fault("A empty", "forget set is empty", lambda t: _base(t, forget=""), "name at least one item"),
    Fault("A equal to X", "whole data set", lambda t: _base(t, forget="0-19"), "keep at least one item"),
    Fault("duplicates in A", "more than once", lambda t: _base(t, forget="3,3"), "name each item once"),
    Fault("lambda above 1", "lambda must lie in [0.0, 1.0]", lambda t: _base(t, "--lambda", "1.5"), "choose lambda in [0, 1]"),
    Fault("lambda below 0", "lambda must lie in [0.0, 1.0]", lambda t: _base(t, "--lambda=-0.5"), "choose lambda in [0, 1]"),
    Fault("negative steps", "--steps must be >= 0", lambda t: _base(t, "--steps=-3"), "give a step count >= 0"),
    Fault("timestep range outside the schedule", "timestep range", lambda t: _base(t, "--t-max", "5000"), "keep --t-min/--t-max within 0..T-1"),
    Fault("a number that is not a number", "invalid int value", lambda t: _base(t, "--batch-size", "abc"), "give an integer"),
    Fault("negative learning rate", "--lr must be a positive number", lambda t: _base(t, "--lr=-1e-4"), "give a positive --lr"),
    Fault("NaN in the data", "NaN or Inf", _nan_data, "clean the data"),
    Fault("unreadable image", "cannot read image", _unreadable_image, "remove or fix the file"),
    Fault("images of mixed sizes", "differ in size", lambda t: _mixed_folder(t, 16, "L"), "resize them to one size"),
    Fault("images of mixed colour modes", "differ in colour mode", lambda t: _mixed_folder(t, 8, "RGB"),
          "convert them to one mode"),
    Fault("output directory exists and is not empty", "not empty", _busy_out, "choose another --out or pass --overwrite"),
    Fault("unknown preset", "unknown preset", lambda t: _base(t, "--config", "no-such-preset"), "use a known preset or a YAML file"),
    Fault("unknown method", "unknown method", lambda t: _base(t, "--method", "forget-everything"), "choose a listed method"),
    Fault("a flag the method does not take", "does not apply to method naive", lambda t: _base(t, "--method", "naive", "--lambda", "0.5"), "drop the flag"),
    Fault("unknown data", "unknown data", lambda t: _base(t, data=t / "nowhere"), "give a folder, .npy/.npz or a built-in name"),
    Fault("class-conditional model, unlabelled data", "no class labels", lambda t: _class_base(t, data=_data(t), forget="0,1"),
          "give labelled data: class subfolders or an .npz 'labels' array"),
    Fault("forget a class that is not in the data", "is not a class of the data", lambda t: _class_base(t, forget="class=z"),
          "name a class of the data"),
    Fault("forget by class on unlabelled data", "needs labelled data", lambda t: _base(t, forget="class=1"),
          "use labelled data or name the items"),
    Fault("guidance below 0", "--guidance must be >= 0",
          lambda t: ["sample", "--model", str(_class_model(t)), "--out", str(t / "out"), "--guidance=-1"],
          "give a guidance scale >= 0"),
    Fault("train --class-conditional on unlabelled data", "needs labelled data",
          lambda t: ["train", "--data", str(_data(t)), "--class-conditional", "--arch", "tiny", "--out", str(t / "out")],
          "use labelled data"),
    Fault("full disk while saving", "disk full", _full_disk, "free space; --resume continues from the last checkpoint",
          _no_space_left),
    Fault("loss turns NaN mid-run", "became NaN or Inf at step", _nan_loss, "lower --lr; the last checkpoint is kept for --resume"),
]


def _snapshot(root: Path, skip: Path | None = None) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and (skip is None or skip not in p.parents)}


def check_fault(fault: Fault, tmp: Path) -> str | None:
    """Run one case in-process; ``None`` when it behaved, else what went wrong."""
    from .cli import main

    argv = fault.setup(tmp)
    out = tmp / "out"
    mid_run = fault.name in ("full disk while saving", "loss turns NaN mid-run")
    before = _snapshot(tmp, skip=out if mid_run else None)
    before_out = _snapshot(out) if out.is_dir() else None
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), fault.during():
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    msg = err.getvalue()
    if rc == 0:
        return "exited 0"
    lines = [line for line in msg.splitlines() if line.strip()]
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"not one 'error:' line: {msg[-300:]!r}"
    if fault.expect not in lines[0]:
        return f"message lacks {fault.expect!r}: {lines[0]}"
    if _snapshot(tmp, skip=out if mid_run else None) != before:
        return "files outside the run directory changed"
    if mid_run:
        if (out / "model").exists():
            return "a model directory was left behind by a failed run"
        if fault.name == "loss turns NaN mid-run" and not (out / "checkpoint.pt").exists():
            return "the last good checkpoint was not kept"
    elif before_out is not None and _snapshot(out) != before_out:
        return "the existing output directory changed"
    elif before_out is None and out.exists():
        return "an output directory was created"
    return None


def kill_and_resume_trial(tmp: Path, seed: int, steps: int = 8) -> str | None:
    """SIGKILL a run after a random logged step, ``--resume`` it, and compare with an uninterrupted run bit for bit."""
    import torch
    from safetensors.torch import load_file

    rng = random.Random(seed)
    args = _base(tmp, "--steps", str(steps), "--checkpoint-every", "1", "--seed", "1", "--threads", "1")
    args = [a for a in args if a not in ("--out", str(tmp / "out"))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "diffunlearn.cli"]
    ref = tmp / "ref"
    if not ref.exists():
        subprocess.run(cli + args + ["--out", str(ref)], check=True, capture_output=True, env=env, timeout=300)
    run = tmp / f"killed-{seed}"
    kill_after = rng.randint(1, steps - 2)
    proc = subprocess.Popen(cli + args + ["--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        log = run / "log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= kill_after:
            time.sleep(rng.random() * 0.05)
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        return "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (run / "model").exists():
        return "a model directory existed before the run completed"
    done = subprocess.run(cli + args + ["--out", str(run), "--resume"], capture_output=True, text=True, env=env,
                          timeout=300)
    if done.returncode != 0:
        return f"--resume failed: {done.stderr.strip()[-300:]}"
    name = "model/unet/diffusion_pytorch_model.safetensors"
    want, got = load_file(str(ref / name)), load_file(str(run / name))
    if not all(torch.equal(want[k], got[k]) for k in want):
        return f"killed after step {kill_after}: resumed weights differ from the uninterrupted run"
    return None


def run_faults(trials: int = 3, markdown: bool = False) -> int:
    if markdown:
        print("| bad input | message contains | what to do |\n|---|---|---|")
        for f in FAULTS:
            print(f"| {f.name} | `{f.expect}` | {f.fix} |")
        return 0
    passed = failed = 0
    for f in FAULTS:
        with tempfile.TemporaryDirectory() as d:
            problem = check_fault(f, Path(d))
        passed, failed = passed + (problem is None), failed + (problem is not None)
        print(f"{'ok  ' if problem is None else 'FAIL'} {f.name}" + (f": {problem}" if problem else ""), flush=True)
    with tempfile.TemporaryDirectory() as d:
        for seed in range(trials):
            problem = kill_and_resume_trial(Path(d), seed)
            passed, failed = passed + (problem is None), failed + (problem is not None)
            print(f"{'ok  ' if problem is None else 'FAIL'} SIGKILL and --resume, trial {seed + 1}"
                  + (f": {problem}" if problem else ""), flush=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0

