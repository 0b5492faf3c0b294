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
    # what is injected while it runs, given the case's folder
    during: Callable[[Path], contextlib.AbstractContextManager] = lambda _tmp: contextlib.nullcontext()


def _model(tmp: Path) -> Path:
    import torch

    from .model import DiffusionModel, build_scheduler, build_unet, save_model

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

    from .model import DiffusionModel, build_scheduler, build_unet, save_model

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
def _no_space_left(_tmp: Path | None = None):
    """The disk fills up while the model is being written."""
    from unittest import mock

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device", "diffusion_pytorch_model.safetensors")

    with mock.patch("diffunlearn.model._write_pipeline", side_effect=full):
        yield


def _nan_loss(tmp):
    return _base(tmp, "--lr", "1e30", "--method", "neggrad", "--steps", "6", "--checkpoint-every", "1")


def _bomb(tmp):
    """A small PNG whose header claims 20,000 x 20,000 pixels (beyond PIL's guard of about 179 million)."""
    import struct
    import zlib

    folder = tmp / "images"
    folder.mkdir()
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    data = bytearray((folder / "3.png").read_bytes())
    ihdr = struct.pack(">II", 20000, 20000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    (folder / "3.png").write_bytes(bytes(data))
    return _base(tmp, data=folder)


def _truncated_png(tmp):
    """A PNG cut short: its header reads (the listing accepts it), its pixels do not; --check-data finds it."""
    folder = _png_folder(tmp, 6)
    p = folder / "img_004.png"
    p.write_bytes(p.read_bytes()[:45])
    return _base(tmp, "--check-data", data=folder)


def _truncated_png_requests(tmp):
    """The same truncated PNG under deletion requests: they load and check their inputs as a single request does."""
    args = _truncated_png(tmp)
    (tmp / "requests.txt").write_text("0\n1\n")
    i = args.index("--forget")
    args[i:i + 2] = ["--requests", str(tmp / "requests.txt")]
    return args


def _nan_weights(tmp):
    from safetensors.torch import load_file, save_file

    w = _weights_file(tmp)
    state = load_file(str(w))
    name = sorted(k for k in state if state[k].is_floating_point())[3]
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(w))
    return _base(tmp)


@contextlib.contextmanager
def _little_space(_tmp: Path):
    """The disk holding --out has 10 MiB free."""
    from unittest import mock

    usage = __import__("shutil").disk_usage("/")._replace(free=10 * 2**20)
    with mock.patch("diffunlearn.runs.shutil.disk_usage", return_value=usage):
        yield


def _read_only_out(tmp):
    # /sys is mounted read-only for writes of new entries on Linux, even for root (permission bits do not stop root)
    return _base(tmp, "--out", "/sys/diffunlearn-run")


def _interrupted(tmp) -> list[str]:
    """A run stopped by NaN mid-run, the checkpoint of its last good step kept."""
    argv = _nan_loss(tmp)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        from .cli import main

        main(argv)
    return argv


def _checkpoint_of_another_format(tmp):
    import torch

    argv = _interrupted(tmp)
    state = torch.load(tmp / "out" / "checkpoint.pt", weights_only=True)
    state["format"] = 0
    torch.save(state, tmp / "out" / "checkpoint.pt")
    return [*argv, "--resume"]


def _data_changed_before_resume(tmp):
    argv = _interrupted(tmp)
    a = np.load(tmp / "data.npy")
    a[0] = 255 - a[0]  # an item of A is another image now
    np.save(tmp / "data.npy", a)
    return [*argv, "--resume"]


def _unreadable_checkpoint(tmp):
    argv = _interrupted(tmp)
    (tmp / "out" / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    return [*argv, "--resume"]


def _deleted_after_listing(tmp):
    """The data is listed, then its files vanish before the first step draws them (a sync job, a cleanup)."""
    return _base(tmp, data=_png_folder(tmp, 6))


@contextlib.contextmanager
def _files_vanish(tmp: Path):
    """Before step 1 every PNG of the run's folder moves away; they come back when the run has ended."""
    moved: list[tuple[Path, Path]] = []

    def act():
        for p in sorted((tmp / "pngs").glob("*.png")):
            moved.append((p, p.with_suffix(".away")))
            p.rename(moved[-1][1])
    with _at_step(1, act):
        try:
            yield
        finally:
            for p, away in moved:
                away.rename(p)


@contextlib.contextmanager
def _files_rewritten(tmp: Path):
    """Before step 1 every PNG of the run's folder is rewritten with other pixels (a sync job replacing the data);
    the originals come back when the run has ended."""
    from PIL import Image

    saved: dict[Path, tuple[bytes, os.stat_result]] = {}

    def act():
        for p in sorted((tmp / "pngs").glob("*.png")):
            saved[p] = (p.read_bytes(), p.stat())
            Image.fromarray(np.full((8, 8), 7, np.uint8)).save(p)
            os.utime(p, ns=(saved[p][1].st_atime_ns, saved[p][1].st_mtime_ns + 10**9))
    with _at_step(1, act):
        try:
            yield
        finally:
            for p, (data, st) in saved.items():
                p.write_bytes(data)
                os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


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
    Fault("loss turns NaN mid-run", "became NaN or Inf at step", _nan_loss,
          "start again with a lower --lr and --overwrite (--resume would repeat the same steps)"),
    Fault("decompression bomb (a small PNG claiming 20,000 x 20,000 pixels)", "decompression bomb", _bomb,
          "remove or resize the file"),
    Fault("--check-data with a truncated PNG", "images cannot be used", _truncated_png,
          "replace the file before the run starts"),
    Fault("--requests --check-data with a truncated PNG", "images cannot be used", _truncated_png_requests,
          "replace the file before the run starts"),
    Fault("NaN in the input model's weights", "hold NaN or Inf: tensor", _nan_weights, "re-export or re-copy the model"),
    Fault("not enough free space for the run", "not enough free space", _full_disk, "free space or choose another --out",
          _little_space),
    Fault("read-only output folder", "cannot write to", _read_only_out, "choose another --out"),
    Fault("--resume from a checkpoint of another format", "of another format", _checkpoint_of_another_format,
          "--overwrite, or resume with the version that wrote it"),
    Fault("--resume after the data changed", "the data differ from those the run", _data_changed_before_resume,
          "put the data back as it was, or start again with --overwrite"),
    Fault("--resume from an unreadable checkpoint", "cannot read checkpoint", _unreadable_checkpoint,
          "start again with --overwrite"),
    Fault("data files deleted between listing and first draw", "it was there when the data set was listed",
          _deleted_after_listing, "put the files back, or start again without them", _files_vanish),
    Fault("data files rewritten between listing and first draw", "changed on disk since the data set was listed",
          _deleted_after_listing, "put the originals back, or start again", _files_rewritten),
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
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), fault.during(tmp):
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


def same_unet(a: Path, b: Path) -> bool:
    """Whether the run directories ``a`` and ``b`` saved bitwise the same UNet weights."""
    import torch
    from safetensors.torch import load_file

    name = "model/unet/diffusion_pytorch_model.safetensors"
    want, got = load_file(str(a / name)), load_file(str(b / name))
    return want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def _kill_then_resume(args: list[str], ref: Path, run: Path, kill_after: int, rng: random.Random, jitter: float,
                      model_forbidden: bool = False, exits: tuple[int, ...] = (0,)) -> str | None:
    """Run ``args`` uninterrupted into ``ref`` (once), then into ``run``, SIGKILL it once its log has
    ``kill_after`` lines (plus up to ``jitter`` seconds drawn from ``rng``), and ``--resume`` it; None when the resume
    succeeded. ``model_forbidden``: a model directory must not exist at the kill (a single run writes it only at the
    end). ``exits``: the exit statuses of a finished run (``--until removed``'s outcomes are statuses)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "diffunlearn.cli"]
    if not ref.exists():
        first = subprocess.run(cli + args + ["--out", str(ref)], capture_output=True, text=True, env=env, timeout=300)
        if first.returncode not in exits:
            return f"the uninterrupted run failed: {first.stderr.strip()[-300:]}"
    proc = subprocess.Popen(cli + args + ["--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        log = run / "log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= kill_after:
            time.sleep(rng.random() * jitter)
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        return "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if model_forbidden and (run / "model").exists():
        return "a model directory existed before the run completed"
    done = subprocess.run(cli + args + ["--out", str(run), "--resume"], capture_output=True, text=True, env=env,
                          timeout=300)
    return None if done.returncode in exits else f"--resume failed: {done.stderr.strip()[-300:]}"


def kill_and_resume_trial(tmp: Path, seed: int, steps: int = 8) -> str | None:
    """SIGKILL a run after a random logged step, ``--resume`` it, and compare with an uninterrupted run bit for bit."""
    args = _base(tmp, "--steps", str(steps), "--checkpoint-every", "1", "--seed", "1", "--threads", "1")
    args = [a for a in args if a not in ("--out", str(tmp / "out"))]
    rng = random.Random(seed)
    kill_after = rng.randint(1, steps - 2)
    run = tmp / f"killed-{seed}"
    problem = _kill_then_resume(args, tmp / "ref", run, kill_after, rng, 0.05, model_forbidden=True)
    if problem is None and not same_unet(tmp / "ref", run):
        problem = f"killed after step {kill_after}: resumed weights differ from the uninterrupted run"
    return problem


def until_kill_and_resume_trial(tmp: Path, seed: int, steps: int = 4) -> str | None:
    """SIGKILL an ``--until removed`` run at a random point (most of its time goes to the checks, so mostly inside
    one), ``--resume`` it, and compare with an uninterrupted run: the same final weights bit for bit and the same
    checks, decisions and outcome."""
    import json

    args = _base(tmp, "--checkpoint-every", "1", "--seed", "1", "--threads", "1", "--method", "naive")
    args = [a for a in args if a not in ("--out", str(tmp / "out"))]
    i = args.index("--steps")
    args[i:i + 2] = ["--max-steps", str(steps)]
    i = args.index("--verify")
    args[i:i + 2] = ["--verify", "fast", "--until", "removed", "--check-every", "2", "--check-seeds", "1"]
    rng = random.Random(seed)
    kill_after = rng.randint(1, steps - 1)
    ref, run = tmp / "ref-until", tmp / f"until-killed-{seed}"
    problem = _kill_then_resume(args, ref, run, kill_after, rng, 1.0, model_forbidden=True, exits=(0, 3, 4))
    if problem is not None:
        return problem
    if not same_unet(ref, run):
        return f"killed after step {kill_after}: resumed weights differ from the uninterrupted run"

    def loop(folder):
        u = json.loads((folder / "summary.json").read_text())["until"]
        return u["outcome"], [{k: v for k, v in c.items() if k != "seconds"} for c in u["checks"]]
    if loop(ref) != loop(run):
        return f"killed after step {kill_after}: the loop's checks or outcome differ from the uninterrupted run's"
    return None


def requests_kill_and_resume_trial(tmp: Path, seed: int, steps: int = 3) -> str | None:
    """SIGKILL a run of three deletion requests at a random point (inside a request, or between saving a request's
    model and appending its ledger line), ``--resume`` it, and compare with an uninterrupted run: the same final
    weights bit for bit and the same chain of removed images and model hashes."""
    import json

    (tmp / "requests.txt").write_text("0\n1,2\n3\n")
    args = ["unlearn", "--model", str(_model(tmp)), "--data", str(_data(tmp)), "--requests", str(tmp / "requests.txt"),
            "--steps", str(steps), "--batch-size", "2", "--verify", "off", "--seed", "1", "--threads", "1",
            "--checkpoint-every", "1", "--similarity-t", "5"]
    rng = random.Random(seed)
    kill_after = rng.randint(1, 3 * steps - 1)  # log lines: one per step of every request
    ref, run = tmp / "ref-requests", tmp / f"requests-killed-{seed}"
    problem = _kill_then_resume(args, ref, run, kill_after, rng, 0.3)
    if problem is not None:
        return problem
    if not same_unet(ref, run):
        return f"killed after {kill_after} logged steps: resumed weights differ from the uninterrupted run"

    def chain(folder):
        return [(e["removed"], e["model_before"], e["model_after"]) for e in
                map(json.loads, (folder / "ledger.jsonl").read_text().splitlines())]
    if chain(ref) != chain(run):
        return f"killed after {kill_after} logged steps: the ledger differs from the uninterrupted run's"
    return None


def _png_folder(tmp: Path, n: int = 20) -> Path:
    from PIL import Image

    folder = tmp / "pngs"
    if not folder.is_dir():
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"img_{i:03d}.png")
    return folder


@contextlib.contextmanager
def _at_step(k: int, act: Callable[[], None]):
    """Run ``act`` just before the trainer's step ``k`` begins."""
    from unittest import mock

    from . import trainer

    real = trainer._step

    def step(n, *args, **kw):
        if n == k:
            act()
        return real(n, *args, **kw)

    with mock.patch.object(trainer, "_step", step):
        yield


def _damage_pixels(folder: Path) -> Callable[[], None]:
    """Every PNG's pixel data overwritten with zeros, its header, size and modification time kept: the files still
    list as they did, and the first one a step draws fails to decode there (a truncated or bit-rotted file)."""
    def act():
        for p in sorted(folder.glob("*.png")):
            st, data = p.stat(), p.read_bytes()
            p.write_bytes(data[:40] + bytes(len(data) - 40))
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    return act


@contextlib.contextmanager
def _raise_in_method(k: int):
    """An exception from inside the method's loss at step ``k`` (a bug, a device error)."""
    from unittest import mock

    from .methods import make_method

    cls = type(make_method("siss"))  # the method the runs use
    real, now = cls.terms, [0]

    def terms(self, *args, **kw):
        if now[0] == k:
            raise RuntimeError("injected failure inside the method's loss")
        return real(self, *args, **kw)

    with _at_step(k, lambda: now.__setitem__(0, k)), mock.patch.object(cls, "terms", terms):
        yield


@contextlib.contextmanager
def _full_at_checkpoint(k: int):
    """The disk fills up while the checkpoint of step ``k`` is written."""
    from unittest import mock

    from .trainer import Checkpointer

    real = Checkpointer._write

    def write(self, state):
        if state.get("step") == k:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path) + ".tmp")
        return real(self, state)

    with mock.patch.object(Checkpointer, "_write", write):
        yield


@contextlib.contextmanager
def _full_at_model(_k: int):
    with _no_space_left():
        yield


#: failures that strike after training began: (what happens, the substring of the one line, what fixes it). Each is
#: injected at a random step; the fix applied, ``--resume`` must give bitwise the uninterrupted run's weights.
MID_RUN = {
    "an image fails to decode mid-run": "cannot decode image",
    "an exception inside the method mid-run": "RuntimeError: injected failure",
    "disk full while writing a checkpoint": "disk full at step",
    "disk full while writing the model": "disk full while writing the model",
}


def _cli(argv: list[str]) -> tuple[int, str]:
    from .cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


def fail_and_resume_trial(tmp: Path, kind: str, seed: int, steps: int = 6) -> str | None:
    """Inject ``kind`` at a random step of a run over a folder of PNGs, check the one line and the checkpoint it keeps,
    undo the cause, ``--resume`` with the same command, and compare with an uninterrupted run bit for bit."""
    k = random.Random(seed).randint(2, steps - 1)
    folder = _png_folder(tmp)
    # no periodic checkpoints, except where a checkpoint's own write is the fault: what --resume continues from is
    # then the checkpoint written at the failure (or the trained weights kept when the model could not be written)
    every = "1" if kind == "disk full while writing a checkpoint" else "0"
    args = _base(tmp, "--steps", str(steps), "--checkpoint-every", every, "--seed", "1", data=folder)
    args = [a for a in args if a not in ("--out", str(tmp / "out"))]
    ref = tmp / "ref-pngs"
    if not (ref / "model").exists():
        rc, msg = _cli(args + ["--out", str(ref)])
        if rc != 0:
            return f"the uninterrupted run failed: {msg.strip()[-300:]}"
    run = tmp / f"run-{list(MID_RUN).index(kind)}-{seed}"
    originals = {p: (p.read_bytes(), p.stat()) for p in folder.glob("*.png")}
    inject = {"an image fails to decode mid-run": lambda: _at_step(k, _damage_pixels(folder)),
              "an exception inside the method mid-run": lambda: _raise_in_method(k),
              "disk full while writing a checkpoint": lambda: _full_at_checkpoint(k),
              "disk full while writing the model": lambda: _full_at_model(k)}[kind]
    with inject():
        rc, msg = _cli(args + ["--out", str(run)])
    for p, (data, st) in originals.items():  # the fix: the files as they were
        p.write_bytes(data)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    lines = [line for line in msg.splitlines() if line.strip()]
    if rc == 0:
        return f"step {k}: exited 0"
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"step {k}: not one 'error:' line: {msg[-300:]!r}"
    if MID_RUN[kind] not in lines[0] or "--resume" not in lines[0]:
        return f"step {k}: the line lacks {MID_RUN[kind]!r} or --resume: {lines[0]}"
    if (run / "model").exists():
        return f"step {k}: a model directory was left behind by a failed run"
    if not (run / "checkpoint.pt").exists():
        return f"step {k}: no checkpoint was kept"
    rc, msg = _cli(args + ["--out", str(run), "--resume"])
    if rc != 0:
        return f"step {k}: --resume failed: {msg.strip()[-300:]}"
    if not same_unet(ref, run):
        return f"step {k}: resumed weights differ from the uninterrupted run"
    return None


def run_faults(trials: int = 3, markdown: bool = False) -> int:
    if markdown:
        print("| bad input | message contains | what to do |\n|---|---|---|")
        for f in FAULTS:
            print(f"| {f.name} | `{f.expect}` | {f.fix} |")
        print("\n| failure at a random step | message contains |\n|---|---|")
        for kind, expect in MID_RUN.items():
            print(f"| {kind} | `{expect}` |")
        return 0
    problems: list[str | None] = []

    def tally(name: str, problem: str | None) -> None:
        problems.append(problem)
        print(f"{'ok  ' if problem is None else 'FAIL'} {name}" + (f": {problem}" if problem else ""), flush=True)

    for f in FAULTS:
        with tempfile.TemporaryDirectory() as d:
            tally(f.name, check_fault(f, Path(d)))
    with tempfile.TemporaryDirectory() as d:
        trials_of = [("SIGKILL and --resume", kill_and_resume_trial),
                     ("SIGKILL and --resume of deletion requests", requests_kill_and_resume_trial),
                     ("SIGKILL and --resume of --until removed", until_kill_and_resume_trial)]
        trials_of += [(f"{kind}, then --resume", lambda tmp, seed, kind=kind: fail_and_resume_trial(tmp, kind, seed))
                      for kind in MID_RUN]
        for name, trial in trials_of:
            for seed in range(trials):
                tally(f"{name}, trial {seed + 1}", trial(Path(d), seed))
    failed = sum(p is not None for p in problems)
    print(f"{len(problems) - failed} passed, {failed} failed")
    return 1 if failed else 0

