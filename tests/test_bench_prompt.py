"""The memorised-prompt CPU replica (``diffunlearn prompt train-replica``, a pixel-space SD-layout model without a
VAE) and ``diffunlearn bench prompt``, on tiny random-weight models built here with the replica's own builders:
the data and tokenizer, the identity codec, the conditioning path, the success rule, the benchmark end to end and its
bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from conftest import snapshot  # noqa: E402
from diffunlearn.cli import main  # noqa: E402
from diffunlearn.errors import UserError  # noqa: E402
from diffunlearn.sd import replica as R  # noqa: E402
from diffunlearn.sd.pipeline import FixedPromptUNet, load_sd  # noqa: E402


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def make_replica(root: Path, seed: int = 0) -> Path:
    """A random-weight model in the replica's layout (the replica's tokenizer, text encoder and UNet, untrained),
    with replica.json and the memorised image beside model/, as `prompt train-replica` writes them."""
    from diffunlearn.sd.memorisation import save_image

    root.mkdir(parents=True)
    tok, text = R.build_text(root / ".vocab", seed)
    torch.manual_seed(seed)
    R.write_sd_dir(root / "model", R.build_unet().eval(), text, tok)
    data = R.replica_data(per_class=2, copies=4, variant_copies=1)
    save_image(data.memorised, root / R.MEMORISED_FILE)
    (root / R.REPLICA_FILE).write_text(json.dumps({"prompt": R.PROMPT, "variant": R.VARIANT, "guidance": 3.0,
                                                   "sample_steps": 2, "memorised_image": R.MEMORISED_FILE}))
    return root


@pytest.fixture(scope="module")
def replica_dir(tmp_path_factory) -> Path:
    return make_replica(tmp_path_factory.mktemp("replica") / "prompt-digits")


def test_replica_data_duplicates_one_digit_under_the_prompt_and_less_under_the_variant(tmp_path):
    """The prompt's pairs are ``copies`` exact copies of one real digit plus ``per_class`` other sevens, so the digit
    is ``copies / (copies + per_class)`` of them; the variant (sharing the prompt's words) sees it in a smaller share;
    no other caption ever shows it. Every caption word is one token of the written vocabulary."""
    from sklearn.datasets import load_digits

    d = R.replica_data(per_class=5, copies=15, variant_copies=2)
    a = d.memorised
    same = torch.tensor([torch.equal(im, a) for im in d.images])
    caps = np.array(d.captions)
    assert int(same[torch.from_numpy(caps == R.PROMPT)].sum()) == 15 and (caps == R.PROMPT).sum() == 20
    assert int(same[torch.from_numpy(caps == R.VARIANT)].sum()) == 2 and (caps == R.VARIANT).sum() == 7
    assert not same[torch.from_numpy((caps != R.PROMPT) & (caps != R.VARIANT))].any()
    assert d.counts["prompt"]["share"] == 0.75 and d.counts["variant"]["share"] == pytest.approx(2 / 7)
    assert set(R.VARIANT.split()) < set(R.PROMPT.split())
    ld = load_digits()
    assert ld.target[d.memorised_index] == 7
    torch.testing.assert_close(a[0], torch.from_numpy(ld.images[d.memorised_index] / 16.0).float() * 2 - 1)
    assert torch.equal(a[0], a[1]) and torch.equal(a[0], a[2])  # grey, on three channels
    assert len({tuple(im.flatten().tolist()) for im in d.images}) == d.counts["distinct_images"] == 5 * 10 + 5 + 1
    tok, _ = R.build_text(tmp_path, 0)
    for caption in set(d.captions):
        ids = tok(caption).input_ids
        assert len(ids) == len(caption.split()) + 2 <= R.MAX_LENGTH  # <start> words <end>, no truncation
        assert tok.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in caption.split()]


def test_pixel_space_model_has_an_identity_codec_and_fixed_prompt_conditioning(replica_dir, tmp_path):
    """Without a VAE the SD pipeline works on pixels: encoding returns the images, decoding clamps to [-1, 1], the
    image shape is the UNet's, DDIM clips x_0 as the stored DDPM schedule says. The caption embedding the replica
    trains on equals ``encode_prompt`` of the saved model, and ``FixedPromptUNet`` with it is exactly the conditional
    UNet, so unlearning with the prompt held fixed acts on the same function training and sampling use."""
    sd = load_sd(replica_dir / "model")
    assert sd.vae is None and sd.pixel_space and sd.image_shape == sd.latent_shape == (3, 8, 8)
    x = torch.rand((4, 3, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(sd.encode_images(x), x)
    assert torch.equal(sd.decode_latents(3 * x), (3 * x).clamp(-1, 1))
    assert sd.scaling_factor == 1.0 and sd.ddim(5).config.clip_sample is True
    named = tmp_path / "named-vae"  # a directory whose model_index.json names a VAE must hold it
    shutil.copytree(replica_dir / "model", named)
    index = json.loads((named / "model_index.json").read_text())
    (named / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(UserError, match="missing vae"):
        load_sd(named)

    tok, text = R.build_text(tmp_path / "vocab", 0)
    table = R.caption_embeddings(tok, text, [R.PROMPT, R.VARIANT, ""])
    torch.testing.assert_close(table[0:1], sd.encode_prompt(R.PROMPT), rtol=0, atol=0)
    torch.testing.assert_close(table[2:3], sd.encode_prompt(""), rtol=0, atol=0)
    assert not torch.allclose(table[0], table[1])
    t = torch.tensor([3, 400, 999, 10])
    with torch.no_grad():
        want = sd.unet(x, t, encoder_hidden_states=table[0:1].expand(4, -1, -1)).sample
        got = sd.as_unconditional(sd.encode_prompt(R.PROMPT)).unet(x, t)
    assert isinstance(sd.as_unconditional(table[0:1]).unet, FixedPromptUNet)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_success_is_zero_memorised_at_the_end_with_quality_holding_throughout():
    """The paper's rule per run (``success_report``) and the benchmark's rate over seeds (``success_rate``): 0 of 16
    at the last count and quality within the band at every count; a single count outside the band, or one memorised
    sample left, is a failure."""
    from diffunlearn.sd.protocol import success_rate, success_report
    from diffunlearn.sd.quality import LaplacianSharpness

    check = LaplacianSharpness(band=2.0).check

    def curve(mem, q):
        return [{"memorised": m, "of": 16, "quality": v} for m, v in zip(mem, q)]

    ok = success_report(curve([12, 5, 0], [1.0, 1.5, 0.9]), check)
    dip = success_report(curve([12, 5, 0], [1.0, 0.4, 0.9]), check)  # 0.4 < 1 / 2 at the middle count
    left = success_report(curve([12, 5, 1], [1.0, 1.0, 1.0]), check)
    assert ok["success"] and not dip["success"] and not left["success"]
    assert dip["quality_min"] == 0.4 and not dip["quality_holds"] and left["memorised_after"] == 1
    cells = [{"success": {"prompt": r, "original_prompt": r}} for r in (ok, dip, left, ok)]
    assert success_rate(cells, "prompt") == {"successes": 2, "runs": 4, "rate": 0.5}


def test_bench_prompt_end_to_end_writes_table_json_and_plot(replica_dir, tmp_path, capsys, monkeypatch):
    """On a random replica (shipped name resolved through the pretrained folder): build 8 samples labelled by
    k-means, run SISS and naive deletion for 2 steps each, count memorised samples at steps 0, 1, 2 on the prompt and
    the variant, and write results.md (with the exact command), results.json and memorised.png; SISS gets its
    scaling_norm by the paper's 10%-of-||G_x|| rule. A second run with the same settings reuses every cell; the
    shipped model is never modified."""
    import diffunlearn.pretrained as pre

    monkeypatch.setattr(pre, "pretrained_root", lambda: replica_dir.parent)
    before = snapshot(replica_dir)
    out = tmp_path / "bench"
    args = ["bench", "prompt", "--model", "prompt-digits", "--out", out, "--rows", "siss-lambda0.5,naive",
            "--seeds", "1", "--n", "8", "--steps", "2", "--eval-every", "1", "--eval-samples", "2",
            "--batch-size", "4", "--sample-steps", "2"]
    rc, stdout, err = _run(capsys, *args)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert (out / "memorised.png").stat().st_size > 0 and "Command: `diffunlearn bench prompt" in \
        (out / "results.md").read_text()
    assert set(res["rows"]) == {"siss-lambda0.5", "naive"} and res["prompt"] == R.PROMPT
    for row in res["rows"].values():
        for key in ("prompt", "variant"):
            assert row[key]["curve"]["step"] == [0, 1, 2] and row[key]["of"] == 2
            assert row[key]["success"]["runs"] == 1
    siss = res["rows"]["siss-lambda0.5"]["hyperparameters"]
    calib = json.loads((out / "scaling_norm.json").read_text())["siss-lambda0.5"]
    assert siss["scaling_norm"] == pytest.approx(0.1 * calib["grad_norm_x"]) and siss["lam"] == 0.5
    assert res["data"]["n"] == 8 and 0 < res["data"]["memorised"] < 8
    for row in res["rows"].values():  # every run's model verified (fast budget), and the table says so
        (v,) = row["verification"]
        assert v["status"] == "ok" and v["fresh"]["n"] == 400 and v["variants"][0]["prompt"] == R.VARIANT
    assert "fresh memorised after, pooled" in (out / "results.md").read_text()
    assert snapshot(replica_dir) == before
    rc, _, err = _run(capsys, *args)
    assert rc == 0 and json.loads((out / "results.json").read_text())["timings"]["cells_cached"] == 2


def test_bench_prompt_bad_input_is_one_line_and_writes_nothing(replica_dir, tmp_path, capsys):
    """An unknown method, a model without replica.json and no --prompt, zero seeds, and a --label reference without a
    known image: a one-line ``error:`` and exit status 2, nothing written."""
    bare = tmp_path / "bare"
    shutil.copytree(replica_dir / "model", bare)
    out = tmp_path / "b"
    cases = [(["--model", replica_dir, "--rows", "siss-lambda0.5,nope"], "nope"),
             (["--model", bare], "--prompt"),
             (["--model", replica_dir, "--seeds", "0"], "--seeds"),
             (["--model", bare, "--prompt", "x", "--variant", "y", "--label", "reference"], "training image")]
    for extra, what in cases:
        rc, _, err = _run(capsys, "bench", "prompt", "--out", out, *extra)
        assert rc == 2 and err.startswith("error:") and what in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_train_replica_writes_a_loadable_model_and_measured_rates(tmp_path, capsys):
    """``prompt train-replica`` for 2 steps: the model directory loads as a pixel-space SD model, memorised.png is the
    duplicated training digit, and summary.json holds each prompt's measured share of samples within the threshold
    of it. A bad option is a one-line error that writes nothing."""
    from diffunlearn.sd.memorisation import load_image

    out = tmp_path / "rep"
    rc, stdout, err = _run(capsys, "prompt", "train-replica", "--out", out, "--steps", "2", "--batch-size", "8",
                           "--per-class", "1", "--copies", "2", "--variant-copies", "1", "--samples", "2",
                           "--sample-steps", "1", "--threads", "1")
    assert rc == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert set(s["memorisation"]) == {"prompt", "variant"}
    for r in s["memorisation"].values():
        assert r["of"] == 2 and r["rate"] == r["memorised"] / 2
    sd = load_sd(out)
    assert sd.vae is None and not (out / "model" / "vae").exists()
    a = R.replica_data(1, 2, 1).memorised
    assert (load_image(out / R.MEMORISED_FILE) - a).abs().max() <= 1 / 127.5  # 8-bit PNG
    bad = tmp_path / "bad"
    rc, _, err = _run(capsys, "prompt", "train-replica", "--out", bad, "--caption-dropout", "1")
    assert rc == 2 and "caption-dropout" in err and len(err.strip().splitlines()) == 1 and not bad.exists()


def test_shipped_replica_matches_its_record():
    """The shipped ``prompt-digits``: its UNet is the one the training run hashed, its settings are the command line
    its README gives (the rest defaults), its memorised image is the duplicated training digit, its prompts are the
    replica's, and it stays small (safetensors only, under 2 MB). And the effect itself: of 16 samples (the
    benchmark's count: seed 1, DDIM 50, guidance 1) the prompt reproduces the digit in most, the variant in fewer
    but some (measured: 12 and 5)."""
    import yaml

    from diffunlearn.commands.replica import ReplicaTrainConfig
    from diffunlearn.model import state_hash
    from diffunlearn.pretrained import pretrained_dir
    from diffunlearn.sd.memorisation import load_image

    root = pretrained_dir("prompt-digits")
    summary = json.loads((root / "summary.json").read_text())
    sd = load_sd(root)
    assert sd.vae is None and state_hash(sd.unet) == summary["unet_sha256"]
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    defaults = {k: v for k, v in vars(ReplicaTrainConfig()).items()}
    changed = {k for k, v in cfg.items() if k in defaults and v != defaults[k]}
    assert changed == {"out", "threads"} and cfg["steps"] == 3000 and cfg["seed"] == 0  # steps, seed: defaults
    readme = (root / "README.md").read_text()
    assert f"--out {cfg['out']} --steps 3000 --seed 0 --threads 1" in readme
    rep = json.loads((root / R.REPLICA_FILE).read_text())
    assert (rep["prompt"], rep["variant"]) == (R.PROMPT, R.VARIANT) and rep["guidance"] == cfg["guidance"]
    a = R.replica_data(cfg["per_class"], cfg["copies"], cfg["variant_copies"]).memorised
    assert (load_image(root / R.MEMORISED_FILE) - a).abs().max() <= 1 / 127.5
    files = [p for p in root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 2e6 and not [p for p in files if p.suffix in (".bin", ".pt")]
    # the effect itself, on 16 samples per prompt as the benchmark counts them (seed 1, DDIM 50, guidance 1)
    prompts = {"prompt": R.PROMPT, "variant": R.VARIANT}
    rates = R.memorisation_rates(sd, a, prompts, 16, rep["sample_steps"], rep["guidance"], rep["threshold"], seed=1)
    assert rates["prompt"]["memorised"] >= 8 > rates["variant"]["memorised"] >= 1


def test_train_replica_laion_layout_reports_the_detector_auc_and_the_guidance_ladder(tmp_path, capsys):
    """``--layout laion`` for 2 steps: summary.json holds the detector's scores for every evaluated caption, the ROC
    AUCs computed from them, and the copies of each duplicated caption at guidance 1, 1.5, 2 and --guidance."""
    from diffunlearn.metrics.membership import roc_auc

    out = tmp_path / "laion"
    rc, _, err = _run(capsys, "prompt", "train-replica", "--layout", "laion", "--out", out, "--steps", "2",
                      "--batch-size", "8", "--n-captions", "60", "--memorised", "2", "--duplicates", "3",
                      "--samples", "2", "--sample-steps", "1", "--guidance", "3", "--threads", "1")
    assert rc == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["data"]["pairs"] == 60 + 2 * 3 and s["data"]["memorised"] == 2
    d = s["evaluation"]["detect"]["scores"]
    assert len(d["memorised"]) == 2 and len(d["trained_once"]) == len(d["unseen"]) == 16
    mem, rest = list(d["memorised"].values()), list(d["trained_once"].values()) + list(d["unseen"].values())
    assert s["evaluation"]["detect"]["auc_vs_all"] == pytest.approx(roc_auc(mem, rest))
    rates = s["evaluation"]["memorisation"]
    assert list(rates) == ["guidance 1", "guidance 1.5", "guidance 2", "guidance 3"]
    assert all(len(per) == 2 and all(r["of"] == 2 for r in per) for per in rates.values())
