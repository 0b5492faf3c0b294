"""``diffunlearn bench scale``: the published configs build models of the published sizes (counted on the meta device,
no memory), the synthetic image folder is deterministic, a row's command runs in a child process that reports its
units, FLOPs and peak memory, and ``--quick`` runs every row end to end on tiny models of the same families."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from conftest import snapshot  # noqa: E402
from diffunlearn.bench import scale_models as M  # noqa: E402
from diffunlearn.bench.scale import ROWS, Row, ScaleConfig, run_row  # noqa: E402
from diffunlearn.cli import main  # noqa: E402
from diffunlearn.errors import UserError  # noqa: E402
from diffunlearn.trainer import TrainerConfig  # noqa: E402


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_published_configs_build_exactly_the_published_parameter_counts():
    counts = M.parameter_counts()
    assert set(counts) == {"ddpm-unet", "sd-unet", "sd-vae", "sd-text-encoder"}
    for name, c in counts.items():
        assert c["parameters"] == c["published"], name
    # the published figures themselves: 114 M DDPM, 860 M UNet, 84 M VAE, 123 M CLIP text encoder
    assert round(counts["ddpm-unet"]["parameters"] / 1e6) == 114
    assert round(counts["sd-unet"]["parameters"] / 1e6) == 860
    assert round(counts["sd-text-encoder"]["parameters"] / 1e6) == 123
    quick = M.parameter_counts(quick=True)
    assert all(c["parameters"] < 1e6 and c["published"] is None for c in quick.values())


def test_synthetic_folder_is_deterministic_reused_and_a_prefix_of_larger_ones(tmp_path):
    a = M.synthetic_folder(tmp_path / "a", 3, size=16, seed=0)
    b = M.synthetic_folder(tmp_path / "b", 3, size=16, seed=0)
    big = M.synthetic_folder(tmp_path / "b", 5, size=16, seed=0)
    assert snapshot(a) == snapshot(b)
    files = sorted(p.name for p in a.glob("*.png"))
    assert files == ["000000.png", "000001.png", "000002.png"]
    assert all((a / f).read_bytes() == (big / f).read_bytes() for f in files)
    before = {p: p.stat().st_mtime_ns for p in a.iterdir()}
    assert M.synthetic_folder(tmp_path / "a", 3, size=16, seed=0) == a  # written once, then reused as it is
    assert {p: p.stat().st_mtime_ns for p in a.iterdir()} == before
    imgs = [M.synthetic_image(i, 16, 0) for i in range(3)]
    assert imgs[0].shape == (16, 16, 3) and imgs[0].dtype.name == "uint8"
    assert not (imgs[0] == imgs[1]).all() and not (M.synthetic_image(0, 16, 1) == imgs[0]).all()


def test_a_row_runs_in_a_child_process_with_units_flops_and_peak_memory(model_dir, tmp_path):
    """``sample`` of 2 images in 3 steps on a tiny model, through the probe subprocess: 3 UNet forwards, the FLOPs
    of the second are those of one forward at batch 2, counted independently here, and the peak RSS is the child's."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffunlearn.model import load_model

    cfg = ScaleConfig(out=str(tmp_path / "bench"), threads=1)
    row = Row("ddpm sample", "ddpm", ["sample", "--model", str(model_dir), "--n", "2", "--steps", "3", "--batch-size",
                                      "2", "--threads", "1", "--out", str(tmp_path / "samples")], "forward", None, 0)
    r = run_row(row, cfg, tmp_path / "logs")
    assert r["status"] == "ok" and r["units"] == 3 and r["timed_units"] == 1
    model = load_model(model_dir)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.unet(torch.zeros(2, *model.sample_shape), torch.tensor([10, 10]))
    assert r["flops_per_unit"] == fc.get_total_flops() > 0
    assert r["peak_rss_bytes"] > 50 * 2**20  # a Python process with torch loaded
    assert r["first_unit_seconds"] > 0 and r["seconds_per_unit"] > 0
    assert r["projection_seconds"]["A100"] == pytest.approx(r["flops_per_unit"] / (312e12 * 0.4))
    assert (tmp_path / "samples" / "samples.npy").is_file()


def test_quick_mode_runs_every_row_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    rc, stdout, err = _run(capsys, "bench", "scale", "--quick", "--out", out)
    assert rc == 0, err
    summary = json.loads((out / "scale.json").read_text())
    rows = summary["rows"]
    assert list(rows) == list(ROWS)
    for name, r in rows.items():
        if "8-bit" in name and r["status"].startswith("not run: bitsandbytes"):
            continue
        assert r["status"] == "ok", (name, r["status"])
        assert r["flops_per_unit"] > 0 and r["seconds_per_unit"] > 0 and r["first_unit_seconds"] > 0, name
        assert r["command"].startswith("diffunlearn ")
    # a training step costs more than a sampling forward of the same model (forward + backward passes)
    # a SISS step of 2 rows (forward, two backward passes, checkpoint recomputation) costs at least 3 forwards of
    # 2 images, since a backward pass costs at least a forward
    assert rows["ddpm unlearn"]["flops_per_unit"] >= 3 * rows["ddpm sample"]["flops_per_unit"]
    assert (out / "runs" / "ddpm-requests" / "ledger.jsonl").read_text().count("\n") == 2
    assert (out / "runs" / "ddpm-unlearn" / "model" / "model_index.json").is_file()
    assert json.loads((out / "runs" / "sd-detect.json").read_text())["scores"]
    text = (out / "scale.md").read_text()
    assert "| ddpm unlearn | ok |" in text and "projection" in text and "Commands:" in text
    assert summary["parameters"]["sd-unet"]["published"] is None  # tiny models: nothing to compare with
    # a second run reuses the built models and images
    rc, stdout, err = _run(capsys, "bench", "scale", "--quick", "--out", out, "--rows", "ddpm sample")
    assert rc == 0 and stdout.count("reusing") == 2
    assert json.loads((out / "scale.json").read_text())["rows"]["ddpm sample"]["status"] == "ok"


@pytest.mark.parametrize("extra", [["--steps", "1"], ["--rows", "ddpm nothing"], ["--utilisation", "0"],
                                   ["--n", "2"]])
def test_bad_settings_are_one_line_errors_and_write_nothing(tmp_path, capsys, extra):
    out = tmp_path / "bench"
    rc, _, err = _run(capsys, "bench", "scale", "--quick", "--out", out, *extra)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not out.exists()


def test_the_optimizer_setting_is_checked_and_names_its_install():
    with pytest.raises(UserError, match="--optimizer must be one of adamw, adamw8bit"):
        TrainerConfig(optimizer="sgd").validate()
    from diffunlearn.optim import make_optimizer

    p = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(make_optimizer("adamw", p, 1e-3, (0.9, 0.999), 0.0), torch.optim.AdamW)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"pip install 'diffunlearn\[lowmem\]'"):
            make_optimizer("adamw8bit", p, 1e-3, (0.9, 0.999), 0.0)
