"""Scale-out: ``accelerate launch`` with 2 CPU processes (gloo) gives the single-process result."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run):
    return load_file(str(run / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def _png_folder(root, n: int = 30):
    """``n`` random 8x8 grey PNGs in two class folders: a data set that streams from disk."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / f"c{i % 2}" / f"img_{i:02d}.png")
    return root


@pytest.mark.parametrize("method,data,requests", [("siss", "npz", False), ("naive", "folder", True)])
def test_two_processes_equal_one_at_the_same_global_batch(tmp_path, model_dir, data_file, method, data, requests):
    """Each step's rows are drawn once from the seeded generator and split over processes; each process averages
    its rows' per-term gradients and the processes average those (equal shares), which is the mean over the global
    batch. So 2 processes x batch 2 equal 1 process x batch 4 up to float summation order. ``accelerate launch
    --multi_gpu`` on a machine without CUDA starts gloo CPU processes (diffunlearn asks Accelerate for the CPU).
    Both data sets stream from disk (a stored .npz is memory-mapped, PNGs are decoded per step): each process
    fetches only its own rows' images, through its own data-loader workers. Deletion requests take the single
    request's path for each request, several processes included: the same holds after two requests, with one
    ledger line per request written by the main process alone."""
    data_file = _png_folder(tmp_path / "pngs") if data == "folder" else data_file
    (tmp_path / "requests.txt").write_text("0\n1,2\n")
    forget = (["--requests", tmp_path / "requests.txt", "--steps", "2", "--similarity-t", "5"] if requests else
              ["--forget", "0,1", "--steps", "3"])
    common = ["unlearn", "--model", model_dir, "--data", data_file, *forget, "--method", method,
              "--seed", "2", "--threads", "1", "--verify", "off"]
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "diffunlearn.cli", *map(str, common), "--batch-size", "4", "--out", one],
                   check=True, capture_output=True, timeout=300)
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "-m", "diffunlearn.cli"]
    done = subprocess.run(launch + [*map(str, common), "--batch-size", "2", "--out", str(two)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    if requests:
        assert [json.loads(x)["request"] for x in (two / "ledger.jsonl").read_text().splitlines()] == [1, 2]
    a, b = _weights(one), _weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=5e-6, msg=k)
    la = [json.loads(x) for x in (one / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (two / "log.jsonl").read_text().splitlines()]
    for ra, rb in zip(la, lb):
        assert ra["loss_x"] == pytest.approx(rb["loss_x"], rel=1e-5)

