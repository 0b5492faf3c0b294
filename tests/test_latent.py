"""Latent unconditional models (diffusers ``LDMPipeline`` layout): a tiny random VQModel or AutoencoderKL and a tiny
UNet2DModel built here; load, unlearn in latent space, save (autoencoder copied unchanged), reload, sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import snapshot
from diffunlearn.cli import main
from diffunlearn.model import DiffusionModel, build_unet, load_model, save_model, state_hash
from diffunlearn.model.latent import LatentCodec
from diffunlearn.model.sampling import ddpm_sample

IMAGE, LATENT = 16, 8  # two encoder blocks: downsampling by 2


def _autoencoder(kind: str):
    from diffusers import AutoencoderKL, VQModel

    common = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  norm_num_groups=4, sample_size=IMAGE)
    torch.manual_seed(1)
    if kind == "vqvae":
        return VQModel(latent_channels=3, num_vq_embeddings=16, scaling_factor=0.5, **common), 3
    return AutoencoderKL(latent_channels=4, scaling_factor=0.5, **common), 4


def _latent_model(kind: str) -> DiffusionModel:
    from diffusers import DDPMScheduler

    ae, channels = _autoencoder(kind)
    torch.manual_seed(0)
    unet = build_unet("tiny", LATENT, channels)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          clip_sample=False)  # latents are not confined to [-1, 1]
    return DiffusionModel(unet, sched, codec=LatentCodec(ae, kind))


@pytest.fixture(params=["vqvae", "vae"])
def latent_dir(request, tmp_path):
    kind = request.param
    d = save_model(_latent_model(kind), tmp_path / "ldm")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.integers(0, 256, (10, IMAGE, IMAGE, 3), dtype=np.uint8))
    return kind, d


def test_load_unlearn_save_reload_sample(latent_dir, tmp_path, capsys):
    kind, d = latent_dir
    index = json.loads((d / "model_index.json").read_text())
    assert index["_class_name"] == "LDMPipeline" and kind in index and (d / kind / "config.json").is_file()
    model = load_model(d)
    assert model.codec is not None and model.codec.kind == kind
    channels = 3 if kind == "vqvae" else 4
    assert model.sample_shape == (channels, LATENT, LATENT) and model.image_shape == (3, IMAGE, IMAGE)

    out = tmp_path / "run"
    verify = ["--verify", "off"] if kind == "vqvae" else []  # the run's verification once (it costs ~10 s)
    rc = main(["unlearn", "--model", str(d), "--data", str(tmp_path / "x.npy"), "--forget", "0,1", "--method", "siss",
               "--steps", "2", "--batch-size", "4", "--out", str(out), *verify])
    assert rc == 0, capsys.readouterr().err
    if not verify:  # a latent model's run is verified like a pixel model's
        verification = json.loads((out / "verification.json").read_text())
        assert verification["status"] == "ok" and "latent" in verification["spaces"]["loss"]
        assert (out / "report.html").is_file()
    new = load_model(out / "model")
    assert new.codec is not None and new.codec.kind == kind
    assert snapshot(out / "model" / kind) == snapshot(d / kind)  # the autoencoder copied byte for byte
    assert state_hash(new.unet) != state_hash(model.unet)  # the UNet was trained (in latent space)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["sample_shape"] == [channels, LATENT, LATENT]

    x = ddpm_sample(new, 2, steps=3, seed=0)
    assert x.shape == (2, 3, IMAGE, IMAGE) and x.min() >= -1 and x.max() <= 1
    # the samples are the autoencoder's decoding of the sampled latents
    assert torch.allclose(x, new.codec.decode(_raw_latents(new, 2, 3)), atol=1e-5)
    assert main(["sample", "--model", str(out), "--out", str(tmp_path / "s"), "--n", "2", "--steps", "2"]) == 0
    assert np.load(tmp_path / "s" / "samples.npy").shape == (2, IMAGE, IMAGE, 3)


def _raw_latents(model: DiffusionModel, n: int, steps: int) -> torch.Tensor:
    """The latents ``ddpm_sample`` draws before decoding (same seeds), by the pixel-space path with no clamping."""
    import copy

    from diffunlearn.model.sampling import image_generators, initial_noise
    from diffunlearn.model.schedule import predict_noise

    sched = copy.deepcopy(model.scheduler)
    sched.set_timesteps(steps)
    gens = image_generators(0, range(n))
    x = initial_noise(model.sample_shape, gens)
    with torch.inference_mode():
        for t in sched.timesteps:
            x = sched.step(predict_noise(model.unet, x, t.expand(n)), t, x, generator=gens).prev_sample
    return x


def test_vq_directory_loads_in_diffusers_ldm_pipeline(tmp_path):
    from diffusers import LDMPipeline

    d = save_model(_latent_model("vqvae"), tmp_path / "ldm")
    pipe = LDMPipeline.from_pretrained(str(d), local_files_only=True)
    assert type(pipe.vqvae).__name__ == "VQModel"


def test_latents_are_encoded_once_and_cached(monkeypatch):
    codec = _latent_model("vae").codec
    calls = []
    real = codec._encode
    monkeypatch.setattr(codec, "_encode", lambda x: calls.append(len(x)) or real(x))
    images = torch.rand((5, 3, IMAGE, IMAGE)) * 2 - 1
    a = codec.encode(images)
    b = codec.encode(images.clone())
    assert calls == [5] and torch.equal(a, b) and a.shape == (5, 4, LATENT, LATENT)
    a.add_(1.0)  # callers get copies: the cache cannot be corrupted
    assert torch.equal(codec.encode(images), b)


def test_wrong_image_size_is_one_line_and_writes_nothing(latent_dir, tmp_path, capsys):
    _, d = latent_dir
    np.save(tmp_path / "small.npy", np.zeros((6, 8, 8, 3), np.uint8))
    out = tmp_path / "run"
    assert main(["unlearn", "--model", str(d), "--data", str(tmp_path / "small.npy"), "--forget", "0",
                 "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(3, 16, 16)" in err
    assert not out.exists()


def test_sequential_requests_on_a_latent_model_train_on_latents_like_a_single_request(latent_dir, tmp_path):
    """``--requests`` on a latent model: each request trains on the latents (encoded once, cached) and saves the
    autoencoder unchanged. A requests file with one request is the single request ``--forget`` runs: the same
    kept set, the same draws, so bitwise the same UNet; a second request chains its ledger line."""
    from diffunlearn.faults import same_unet

    kind, d = latent_dir
    (tmp_path / "one.txt").write_text("0\n")
    (tmp_path / "two.txt").write_text("0\n1\n")
    common = ["unlearn", "--model", str(d), "--data", str(tmp_path / "x.npy"), "--steps", "2", "--batch-size", "4",
              "--verify", "off"]
    assert main(common + ["--requests", str(tmp_path / "one.txt"), "--out", str(tmp_path / "seq")]) == 0
    assert main(common + ["--forget", "0", "--out", str(tmp_path / "single")]) == 0
    assert same_unet(tmp_path / "seq", tmp_path / "single")
    assert snapshot(tmp_path / "seq" / "model" / kind) == snapshot(d / kind)
    assert main(common + ["--requests", str(tmp_path / "two.txt"), "--out", str(tmp_path / "seq2")]) == 0
    lines = (tmp_path / "seq2" / "ledger.jsonl").read_text().splitlines()
    assert [json.loads(x)["request"] for x in lines] == [1, 2]


@pytest.mark.parametrize("kind", ["vqvae", "vae"])
def test_verify_takes_latent_measures_in_latent_space_and_compares_decoded_pixels(kind):
    """A latent model is verified like a pixel model: its denoising loss (and NLL) is measured on the images'
    latents, the space it was trained in, so the recorded losses equal ``denoising_losses`` of the encoded images;
    the similarity noises and denoises the latent and compares the decoded result with the image, so at t = 0 it is
    the similarity of the autoencoder's reconstruction; samples are decoded before they are compared with A. The
    result names each measure's space."""
    import dataclasses

    from diffunlearn.metrics.membership import denoising_losses
    from diffunlearn.metrics.similarity import PixelCosine
    from diffunlearn.verification import verify
    from diffunlearn.verification.measures import BUDGETS

    before = _latent_model(kind)
    after = _latent_model(kind)
    with torch.no_grad():
        for p in after.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    images = torch.rand((12, 3, IMAGE, IMAGE), generator=torch.Generator().manual_seed(0)) * 2 - 1
    budget = dataclasses.replace(BUDGETS["fast"], name="test", search_seeds=8, samples=380, sample_steps=2,
                                 similarity_steps=2, nll_items=1, nll_reference=2, nll_tol=0.1)
    r = verify(after, images, [0, 1], before=before, budget=budget, similarity_t=0, max_copy_rate=0.01).to_dict()
    assert r["status"] == "ok" and r["spaces"]["loss"].startswith(f"latent space of the model's {kind}")
    assert r["spaces"]["generation"].startswith("pixel space") and "latent" in r["definitions"]["nll"]
    ref = r["reference"]["indices"]
    want = denoising_losses(after, after.encode(images[[0, 1] + ref]), budget.loss_draws, seed=0)
    got = torch.tensor(r["measures"]["after"]["loss_a"] + r["measures"]["after"]["loss_ref"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    recon = after.decode(after.encode(images[:2]))
    torch.testing.assert_close(torch.tensor(r["measures"]["after"]["similarity_a"]),
                               PixelCosine()(images[:2], recon), rtol=1e-5, atol=1e-5)
    assert len(r["measures"]["after"]["nll_a"]) == 1


def test_verify_refuses_models_of_other_autoencoders(latent_dir, tmp_path, capsys):
    """Losses in two latent spaces (or one latent and one pixel space) are not comparable: verifying against a
    model with another autoencoder, or none, is one line and writes nothing."""
    kind, d = latent_dir
    from conftest import tiny_model

    pixel = save_model(tiny_model(size=IMAGE, channels=3), tmp_path / "pixel")
    model = _latent_model(kind)
    with torch.no_grad():
        next(model.codec.module.parameters()).add_(0.1)
    other_codec = save_model(model, tmp_path / "other-codec")
    for before in (pixel, other_codec):
        rc = main(["verify", "--model", str(d), "--before", str(before), "--data", str(tmp_path / "x.npy"),
                   "--forget", "0", "--out", str(tmp_path / "v")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "do not share one autoencoder" in err[0], err
        assert not (tmp_path / "v").exists()
