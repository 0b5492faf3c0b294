"""Saving, reloading and sampling through diffusers; data SPECs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_sets, tiny_model
from diffunlearn.data import load_data, resolve_forget, to_model_space
from diffunlearn.errors import UserError
from diffunlearn.methods import make_method
from diffunlearn.model import load_model, save_model, state_hash
from diffunlearn.model.sampling import ddpm_sample
from diffunlearn.trainer import TrainerConfig, unlearn


def test_unlearned_model_reloads_with_diffusers_and_samples(tmp_path):
    """The saved directory is a ``DDPMPipeline``: diffusers loads it (safetensors) with the same weights, and both
    our sampler and the pipeline produce finite images of the model's shape."""
    from diffusers import DDPMPipeline

    kept, forget = random_sets()
    new = unlearn(tiny_model(), kept, forget, make_method("siss"), TrainerConfig(steps=2, batch_size=4))
    out = save_model(new, tmp_path / "m")
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = DDPMPipeline.from_pretrained(str(out), use_safetensors=True, local_files_only=True)
    assert state_hash(pipe.unet) == state_hash(new.unet)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    reloaded = load_model(out)
    x = ddpm_sample(reloaded, 3, steps=4, seed=1)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()


def test_samples_are_seeded_per_image_whatever_the_batch_size():
    """Image i uses generator (seed, i) for all of its noise, so a batch of 5 equals batches of 2 + 2 + 1, and the
    images from ``start = 3`` are images 3, 4 of the full run, and ``indices`` draws exactly the images of those
    numbers, in the order given."""
    model = tiny_model()
    a = ddpm_sample(model, 5, steps=4, seed=3, batch_size=5)
    b = ddpm_sample(model, 5, steps=4, seed=3, batch_size=2)
    c = ddpm_sample(model, 2, steps=4, seed=3, start=3)
    d = ddpm_sample(model, 0, steps=4, seed=3, indices=[4, 1, 2], batch_size=2)
    for bad in (dict(n=2), dict(start=1), dict(indices=[-1])):
        with pytest.raises(ValueError, match="indices"):
            ddpm_sample(model, **{"n": 0, "indices": [1], **bad})
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a[3:], c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d, a[[4, 1, 2]], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a[0], a[1])


def test_bf16_sampling_runs_the_network_in_bfloat16_and_returns_float32():
    """``bf16=True`` runs every convolution in bfloat16 (autocast) while the scheduler's update stays float32; the
    default runs none. One step of each gives the same images to bfloat16 precision, not bitwise."""
    model = tiny_model()
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
             for m in model.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    x32 = ddpm_sample(model, 3, steps=1, seed=0)
    assert seen and set(seen) == {torch.float32}
    seen.clear()
    x16 = ddpm_sample(model, 3, steps=1, seed=0, bf16=True)
    assert seen and set(seen) == {torch.bfloat16}
    for h in hooks:
        h.remove()
    assert x16.dtype == torch.float32 and x16.shape == x32.shape
    assert not torch.equal(x16, x32)
    torch.testing.assert_close(x16, x32, rtol=0, atol=1e-2)


def test_model_space_conversion_round_trips():
    """uint8 v maps to 2 v / 255 - 1, so 0 -> -1 and 255 -> 1; floats in [0, 1] map to 2 v - 1."""
    u8 = np.array([[[0, 255], [51, 204]]], dtype=np.uint8)
    torch.testing.assert_close(to_model_space(u8, "t")[0, 0], torch.tensor([[-1.0, 1.0], [-0.6, 0.6]]))
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        to_model_space(np.array([[[2.0]]]), "t")
    with pytest.raises(UserError, match="NaN"):
        to_model_space(np.array([[[np.nan]]]), "t")


def test_forget_specs(data_file, tmp_path):
    """Indices, ranges, names and list files select the same items; A must be a non-empty proper subset of X."""
    data = load_data(str(data_file))
    assert resolve_forget("3,1-2", data) == [1, 2, 3]
    assert resolve_forget("img-01,img-03", data) == [1, 3]
    lst = tmp_path / "a.txt"
    lst.write_text("img-05\n# comment\n7\n")
    assert resolve_forget(f"@{lst}", data) == [5, 7]
    assert resolve_forget(str(lst), data) == [5, 7]
    for bad, msg in (("", "empty"), ("99", "outside"), ("nope.png", "neither"), ("0-29", "whole data set"),
                     ("1,1", "more than once")):
        with pytest.raises(UserError, match=msg):
            resolve_forget(bad, data)


def test_builtin_toy_digits_has_its_forget_set():
    data = load_data("toy-digits")
    a = resolve_forget("default", data)
    assert len(a) == 16 and len(data) == 256
    assert torch.equal(data.images[a[0]], data.images[a[-1]])  # copies of one image


def test_corrupt_and_missing_weights_are_refused(tmp_path):
    """A truncated safetensors file, a directory without weights and pickle-only weights each give a UserError."""
    good = save_model(tiny_model(), tmp_path / "m")
    w = good / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_model(good)
    w.unlink()
    with pytest.raises(UserError, match="no weights"):
        load_model(good)
    (good / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UserError, match="--allow-pickle"):
        load_model(good)
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nothing")


def test_saving_over_a_model_replaces_it_and_a_failed_save_keeps_the_old_one(tmp_path, monkeypatch):
    """Saving writes a complete directory beside the target and renames it into place; the old directory is moved
    aside, not deleted, until then. So a save that fails at the last step leaves the previous model loadable, and a
    save that succeeds leaves exactly the new model and no partial or previous directories."""
    import os

    import diffunlearn.runs as runs

    out = tmp_path / "model"
    first, second = tiny_model(seed=1), tiny_model(seed=2)
    save_model(first, out)
    real_replace = os.replace

    def failing_replace(src, dst):
        if ".partial-" in str(src):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(runs.os, "replace", failing_replace)
    with pytest.raises(OSError):
        save_model(second, out, overwrite=True)
    monkeypatch.setattr(runs.os, "replace", real_replace)
    assert state_hash(load_model(out).unet) == state_hash(first.unet)
    with pytest.raises(UserError, match="pass overwrite=True"):
        save_model(second, out)  # the API refuses to replace a model unless told, as the CLI does
    save_model(second, out, overwrite=True)
    assert state_hash(load_model(out).unet) == state_hash(second.unet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_json_results_are_strict_json_and_keep_non_finite_values(tmp_path):
    """A one-probe NLL has an undefined (NaN) Monte Carlo error, a diverged loss is Inf. ``write_json`` must write
    strict JSON (which has no NaN or Infinity literals, so other tools can read it) and ``read_json`` must give back
    the same floats; the write is atomic: no temporary file is left beside the result."""
    import json
    import math

    from diffunlearn.runs import read_json, write_json

    obj = {"nll": {"bpd": 1.5, "stderr": math.nan}, "loss": [0.1, math.inf, -math.inf], "label": "naive"}
    path = tmp_path / "result.json"
    write_json(path, obj)

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    json.loads(path.read_text(), parse_constant=refuse)  # strict JSON: raises on NaN / Infinity literals
    back = read_json(path)
    assert back["nll"]["bpd"] == 1.5 and math.isnan(back["nll"]["stderr"])
    assert back["loss"] == [0.1, math.inf, -math.inf] and back["label"] == "naive"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
