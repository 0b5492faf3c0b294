"""Stable Diffusion memorised prompts: a tiny random-weight SD v1-style directory is built here (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel and a CLIPTokenizer from a vocabulary written to disk), so the whole path runs offline
in seconds: generate, label, unlearn, save, reload, score, detect."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from conftest import snapshot  # noqa: E402
from diffunlearn.cli import main  # noqa: E402
from diffunlearn.errors import UserError  # noqa: E402
from diffunlearn.model import state_hash  # noqa: E402
from diffunlearn.sd.detect import noise_gap_scores  # noqa: E402
from diffunlearn.sd.memorisation import label_images, pixel_features, read_prompt_data, rms_distance  # noqa: E402
from diffunlearn.sd.pipeline import FixedPromptUNet, guided_noise, load_sd  # noqa: E402
from diffunlearn.sd.quality import ClipIQA, LaplacianSharpness  # noqa: E402
from diffunlearn.sd.replica import _bytes_to_unicode  # noqa: E402

PROMPT = "the hippo and her mother"
ORIGINAL = "the hippo"
TEXT = dict(vocab_size=0, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16)


def write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """A CLIP BPE vocabulary of every byte (alone and word-final), a few merges, and the two special tokens."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = ["t h", "th e</w>", "h i", "p o</w>", "a n"]
    tokens += [m.replace(" ", "") for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def make_tiny_sd(root: Path, seed: int = 0) -> Path:
    """A Stable Diffusion v1-style directory: 8x8x4 latents, 16x16 RGB images, 32-dim text, PNDM schedule."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root.mkdir(parents=True)
    torch.manual_seed(seed)
    vocab, merges = write_tokenizer_files(root.parent)
    tok = CLIPTokenizer(str(vocab), str(merges), model_max_length=16)
    text = CLIPTextModel(CLIPTextConfig(**{**TEXT, "vocab_size": len(tok)}, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          steps_offset=1, set_alpha_to_one=False)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    text.save_pretrained(root / "text_encoder")
    tok.save_pretrained(root / "tokenizer")
    sched.save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None]}, indent=2))
    return root


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def sd(sd_dir):
    return load_sd(sd_dir)


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_fixed_prompt_wrapper_is_the_conditional_unet_with_that_embedding(sd):
    """``FixedPromptUNet(unet, c)(x, t) == unet(x, t, encoder_hidden_states=c).sample`` exactly, row by row, for
    per-row timesteps; the embedding is neither trained nor saved (the wrapper's parameters and state are the
    UNet's)."""
    emb = sd.encode_prompt(PROMPT)
    wrapped = FixedPromptUNet(sd.unet, emb)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn((3, *sd.latent_shape), generator=g), torch.tensor([10, 500, 999])
    with torch.no_grad():
        want = sd.unet(x, t, encoder_hidden_states=emb.expand(3, -1, -1)).sample
        got = wrapped(x, t)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in sd.unet.parameters()]
    assert all(k.startswith("unet.") for k in wrapped.state_dict())
    assert wrapped.config is sd.unet.config
    assert not torch.equal(emb, sd.encode_prompt(ORIGINAL))  # the prompt matters


def test_cached_latents_equal_encoding_again(sd):
    """Latents are the VAE posterior mean times ``scaling_factor`` (0.18215 for SD v1): encoding the same images
    again, by the VAE directly, gives exactly the cached values, so caching them once changes nothing."""
    images = torch.rand((5, *sd.image_shape), generator=torch.Generator().manual_seed(1)) * 2 - 1
    cached = sd.encode_images(images, batch_size=2)
    with torch.no_grad():
        again = sd.vae.encode(images).latent_dist.mean * sd.vae.config.scaling_factor
    assert sd.scaling_factor == pytest.approx(0.18215)
    assert cached.shape == (5, *sd.latent_shape)
    torch.testing.assert_close(cached, again, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sd.encode_images(images, batch_size=2), cached, rtol=0, atol=0)


def test_guidance_one_is_the_conditional_prediction(sd):
    """Classifier-free guidance ``eps_u + w (eps_c - eps_u)``: at ``w = 1`` it is exactly ``eps_c``; at ``w = 7.5``
    it matches the formula computed from two separate UNet calls."""
    cond, uncond = sd.encode_prompt(PROMPT), sd.encode_prompt("")
    x = torch.randn((2, *sd.latent_shape), generator=torch.Generator().manual_seed(2))
    t = torch.tensor(981)
    with torch.no_grad():
        eps_c = sd.unet(x, t, encoder_hidden_states=cond.expand(2, -1, -1)).sample
        eps_u = sd.unet(x, t, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
        torch.testing.assert_close(guided_noise(sd.unet, x, t, cond, uncond, 1.0), eps_c, rtol=0, atol=0)
        torch.testing.assert_close(guided_noise(sd.unet, x, t, cond, uncond, 7.5), eps_u + 7.5 * (eps_c - eps_u),
                                   rtol=1e-4, atol=1e-5)


def test_samples_are_seeded_per_image(sd):
    """Image i starts from generator (seed, i): the same images whatever the batch size, and ``start`` continues the
    sequence, so before/after samples line up one to one."""
    emb = sd.encode_prompt(PROMPT)
    a = sd.sample(emb, 3, seed=4, steps=2, batch_size=3)
    b = sd.sample(emb, 3, seed=4, steps=2, batch_size=1)
    c = sd.sample(emb, 2, seed=4, steps=2, start=1)
    assert a.shape == (3, *sd.image_shape) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a[1:], c, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a[0], a[1])


def test_kmeans_puts_an_injected_cluster_of_identical_images_into_A():
    """k-means on pixels: identical copies have zero spread, so they form the tighter cluster and are labelled
    memorised, both as a minority (5 copies among 20 varied images) and as a majority (20 copies, 5 varied): the rule
    is "tighter", not "smaller". The copies are at distance 0 from the reference and every other image above the
    threshold (even where pixel k-means alone pulls some unrelated images into the copies' cluster)."""
    g = torch.Generator().manual_seed(3)
    copy = torch.rand((3, 16, 16), generator=g) * 2 - 1
    for n_copies, n_other in ((5, 20), (20, 5)):
        others = torch.rand((n_other, 3, 16, 16), generator=g) * 2 - 1
        images = torch.cat([others[: n_other // 2], copy.expand(n_copies, -1, -1, -1), others[n_other // 2:]])
        truth = np.zeros(len(images), bool)
        truth[n_other // 2: n_other // 2 + n_copies] = True
        mask, rule, info = label_images(images)
        np.testing.assert_array_equal(mask, truth)
        d = rule.distances(images)
        assert d[truth].max() == 0 and d[~truth].min() > rule.threshold > 0
        assert info["sizes"]["memorised"] >= n_copies and info["spread"]["memorised"] < info["spread"]["other"]


def test_reference_labelling_uses_the_distance_threshold():
    """With a reference image, memorised iff the RMS pixel distance (pixels in [0, 1]) is <= the threshold: shifting
    every pixel of the reference by 0.05 gives distance 0.05 (memorised at 0.15), by 0.3 gives 0.3 (not)."""
    ref = torch.zeros((3, 16, 16))  # mid-grey: shifts stay inside [-1, 1]
    near, far = ref + 2 * 0.05, ref - 2 * 0.3
    mask, rule, _ = label_images(torch.stack([near, far, ref]), reference=ref, threshold=0.15)
    np.testing.assert_array_equal(mask, [True, False, True])
    np.testing.assert_allclose(rule.distances(torch.stack([near, far])), [0.05, 0.3], atol=1e-6)
    big = torch.rand((3, 128, 96)) * 2 - 1  # downsampled to at most 64 px a side before comparing
    assert pixel_features(big[None]).shape == (1, 3 * 64 * 48)
    assert rms_distance(pixel_features(big[None]), pixel_features(big[None])[0])[0] == 0


def test_pickle_only_weights_are_refused(sd_dir, tmp_path, capsys):
    """A UNet stored only as a pickle (.bin) is refused with a one-line error naming the risk, and the command
    writes nothing."""
    from safetensors.torch import load_file

    bad = tmp_path / "pickled-sd"
    shutil.copytree(sd_dir, bad)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), bad / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(UserError, match="pickle"):
        load_sd(bad)
    out = tmp_path / "data"
    rc, _, err = _run(capsys, "prompt", "build", "--model", bad, "--prompt", PROMPT, "--out", out, "--n", "4")
    assert rc == 2 and "pickle" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_whole_path_build_unlearn_save_reload_score_detect(sd_dir, tmp_path, capsys):
    """Through the CLI: ``prompt build`` writes images, labels.csv (file, label, distance; label = distance <=
    threshold) and the rule; ``prompt unlearn`` (SISS, gradient checkpointing) counts memorised samples before, at
    every step and after, on the trained and the original prompt, and saves a full SD directory in which only the
    UNet differs from the input (every other file byte-identical) and which reloads with the trained weights; the
    input directory is byte-for-byte unchanged; ``prompt score`` and ``detect`` run on the result."""
    before = snapshot(sd_dir)
    data = tmp_path / "data"
    rc, out, err = _run(capsys, "prompt", "build", "--model", sd_dir, "--prompt", PROMPT, "--out", data, "--n", "10",
                        "--sample-steps", "2", "--batch-size", "5")
    assert rc == 0, err
    rows = list(csv.DictReader(open(data / "labels.csv")))
    meta = json.loads((data / "memorisation.json").read_text())
    assert len(rows) == 10 and all((data / r["file"]).is_file() for r in rows)
    assert meta["prompt"] == PROMPT and meta["how"] == "kmeans"
    assert [r["label"] == "forget" for r in rows] == [float(r["distance"]) <= meta["threshold"] for r in rows]
    assert {r["label"] for r in rows} == {"forget", "keep"}

    run = tmp_path / "run"
    rc, out, err = _run(capsys, "prompt", "unlearn", "--model", sd_dir, "--data", data, "--out", run,
                        "--original-prompt", ORIGINAL, "--steps", "2", "--batch-size", "2", "--grad-accum", "1",
                        "--lr", "1e-3", "--eval-every", "1", "--eval-samples", "2", "--sample-steps", "2")
    assert rc == 0, err
    assert snapshot(sd_dir) == before
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["success"]) == {"prompt", "original_prompt"}
    assert [r["step"] for r in summary["curve"]["prompt"]] == [0, 1, 2]
    assert "proxy" in summary["quality_measure"] and "success" in summary["success"]["prompt"]
    assert len((run / "memorised.jsonl").read_text().splitlines()) == 6
    assert summary["hyperparameters"]["scaling_norm"] == 750.0  # the paper's SD setting
    after = snapshot(run / "model")
    unet_files = {k for k in after if k.startswith("unet/")}
    assert {k: v for k, v in after.items() if k not in unet_files} == {k: v for k, v in before.items()
                                                                       if not k.startswith("unet/")}
    assert after["unet/diffusion_pytorch_model.safetensors"] != before["unet/diffusion_pytorch_model.safetensors"]
    reloaded = load_sd(run)  # a run directory resolves to its model/
    assert state_hash(reloaded.unet) == summary["model_out"]["sha256"] != summary["model_in"]["sha256"]

    v = json.loads((run / "verification.json").read_text())  # the deletion verified by default (fast budget)
    assert v["kind"] == "prompt" and v["status"] == "ok" and v["budget"]["fresh"] == 400
    assert summary["verification"]["overall"] == v["overall"]["status"] and (run / "report.html").is_file()
    rc, out, err = _run(capsys, "prompt", "score", "--model", run, "--data", data, "--samples", "2",
                        "--sample-steps", "2", "--out", tmp_path / "score.json")
    assert rc == 0, err
    assert "of 2 samples memorised" in out
    assert json.loads((tmp_path / "score.json").read_text())["prompt"] == PROMPT

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\n{ORIGINAL}\na photo of a cat\n")
    rc, out, err = _run(capsys, "detect", "--model", run, "--prompts", prompts, "--seeds", "2", "--sample-steps", "2",
                        "--out", tmp_path / "detect.json")
    assert rc == 0, err
    scores = json.loads((tmp_path / "detect.json").read_text())["scores"]
    assert len(scores) == 3 and [s["score"] for s in scores] == sorted((s["score"] for s in scores), reverse=True)
    assert out.splitlines()[0].endswith(scores[0]["prompt"])


def test_detection_score_is_the_text_conditional_noise_gap(sd):
    """Wen et al.'s score ``mean_seeds ||eps(x_T, p) - eps(x_T, '')||``: exactly 0 for the empty prompt (conditional
    and unconditional predictions coincide), positive otherwise, and equal to a direct computation."""
    scores, t = noise_gap_scores(sd, ["", PROMPT], seeds=3, steps=50, batch_size=2)
    assert scores[0] == 0 and scores[1] > 0 and t == 981
    from diffunlearn.model.sampling import image_generators, initial_noise

    x = initial_noise(sd.latent_shape, image_generators(0, range(3)))
    with torch.no_grad():
        c = sd.unet(x, t, encoder_hidden_states=sd.encode_prompt(PROMPT).expand(3, -1, -1)).sample
        u = sd.unet(x, t, encoder_hidden_states=sd.encode_prompt("").expand(3, -1, -1)).sample
    assert scores[1] == pytest.approx(float((c - u).flatten(1).norm(dim=1).mean()), rel=1e-5)


def test_edited_labels_are_used_and_bad_labels_named(sd_dir, tmp_path, capsys):
    """The user's edits to labels.csv decide A and X \\ A; an unknown label, or a file with nothing to keep, is a
    one-line error and ``prompt unlearn`` then writes nothing."""
    data = tmp_path / "data"
    assert _run(capsys, "prompt", "build", "--model", sd_dir, "--prompt", PROMPT, "--out", data, "--n", "4",
                "--sample-steps", "1")[0] == 0
    rows = list(csv.reader(open(data / "labels.csv")))
    rows[1][1], rows[2][1], rows[3][1], rows[4][1] = "keep", "forget", "keep", "memorised"
    with open(data / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    pd = read_prompt_data(data)
    np.testing.assert_array_equal(pd.memorised, [False, True, False, True])
    assert pd.forget.shape[0] == 2 and pd.prompt == PROMPT

    rows[2][1] = "maybe"
    with open(data / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    run = tmp_path / "run"
    rc, _, err = _run(capsys, "prompt", "unlearn", "--model", sd_dir, "--data", data, "--out", run, "--steps", "1")
    assert rc == 2 and "line 3" in err and len(err.strip().splitlines()) == 1 and not run.exists()
    for r in rows[1:]:
        r[1] = "forget"
    with open(data / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    rc, _, err = _run(capsys, "prompt", "unlearn", "--model", sd_dir, "--data", data, "--out", run, "--steps", "1")
    assert rc == 2 and "keep" in err and not run.exists()
    rc, _, err = _run(capsys, "prompt", "unlearn", "--model", sd_dir, "--data", tmp_path, "--out", run)
    assert rc == 2 and "labels.csv" in err and not run.exists()
    rc, _, err = _run(capsys, "prompt", "unlearn", "--model", sd_dir, "--data", data, "--out", run,
                      "--method", "retrain")
    assert rc == 2 and not run.exists()
    rc, _, err = _run(capsys, "detect", "--model", sd_dir, "--prompts", tmp_path / "none.txt",
                      "--out", tmp_path / "d.json")
    assert rc == 2 and "prompts file" in err and not (tmp_path / "d.json").exists()


def test_quality_proxy_and_clip_iqa(tmp_path):
    """The weight-free proxy (Laplacian variance) falls when images are blurred and rises with added noise, and the
    relative check fails on either outside the band; CLIP-IQA from a local CLIP directory equals CLIP's own
    ``softmax(logits_per_image)`` over ("Good photo.", "Bad photo.")."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    g = torch.Generator().manual_seed(5)
    images = torch.rand((4, 3, 16, 16), generator=g) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(images, 3, 1, 1)
    noisy = (images + torch.randn(images.shape, generator=g)).clamp(-1, 1)
    proxy = LaplacianSharpness(band=2.0)
    base = proxy(images).mean()
    assert proxy(blurred).mean() < base / 2 and proxy(noisy).mean() > base
    assert proxy.check.holds(base * 1.5, base) and not proxy.check.holds(proxy(blurred).mean(), base)

    vocab, merges = write_tokenizer_files(tmp_path)
    tok = CLIPTokenizer(str(vocab), str(merges), model_max_length=16)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config={**TEXT, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                                             "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
                                vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                   num_attention_heads=4, image_size=16, patch_size=8),
                                projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    iqa = ClipIQA(str(tmp_path / "clip"))
    scores = iqa(images)
    pixels = (((images + 1) / 2) - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / \
        torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    ids = tok(["Good photo.", "Bad photo."], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = iqa.model(pixel_values=pixels, **ids).logits_per_image.softmax(-1)[:, 0]
    np.testing.assert_allclose(scores, want.double().numpy(), rtol=1e-5, atol=1e-6)
    assert "CLIP-IQA" in iqa.name and iqa.check.holds(0.35, 0.9) and not iqa.check.holds(0.34, 0.9)


def _memorised_at_seed_0(sd):
    """A rule under which ``sd``'s own UNet draws the memorised image at seed 0 and nowhere else: the reference is
    its seed-0 sample of PROMPT, the threshold far below the distance between two different samples."""
    from diffunlearn.sd.memorisation import MemorisationRule

    ref = sd.sample(sd.encode_prompt(PROMPT), 1, 0, 2, 7.5, indices=[0])[0]
    return MemorisationRule(ref, 1e-4, "reference")


def test_prompt_verification_certifies_only_a_deletion_that_acts(sd):
    """The verdicts of a prompt deletion: a model that did not change still draws the image at its targeted seed,
    so the deletion is "not removed", never certified; a model whose seed-0 sample moved away, with no memorised
    sample among the fresh ones and a bound below the target rate, is "removed"; the rates carry exact Clopper-Pearson
    intervals; reworded prompts the model before never drew the image from show no signal; a budget whose fresh
    samples cannot reach the target rate is refused."""
    import copy

    from diffunlearn.metrics.rates import binomial_ci
    from diffunlearn.sd.proof import PromptBudget, verify_prompt

    rule = _memorised_at_seed_0(sd)
    budget = PromptBudget("test", fresh=40, search_seeds=4, per_variant=2, detect_seeds=1)
    kw = dict(budget=budget, guidance=7.5, sample_steps=2, seed=0, batch_size=8, max_rate=0.1)
    same = verify_prompt(sd, copy.deepcopy(sd.unet), PROMPT, rule, **kw, controls=["a photo of a cat"],
                         quality=LaplacianSharpness(2.0))
    q = same["quality"]  # an unchanged model's samples of an unrelated prompt are the same images: quality kept
    assert q["status"] == "kept" and q["prompts"][0]["before"] == q["prompts"][0]["after"] and q["samples"] == 2
    targeted = same["verdicts"][0]
    assert targeted["hits_before"] == 1 and targeted["seeds_still"] == [0]
    assert same["overall"]["status"] == "not removed"
    moved_unet = copy.deepcopy(sd.unet)
    with torch.no_grad():
        for p in moved_unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = verify_prompt(sd, moved_unet, PROMPT, rule, **kw)
    targeted, fresh, *variants = moved["verdicts"]
    assert targeted["status"] == "removed" and fresh["count"] == 0 and fresh["n"] == 40
    assert fresh["ci95"][1] == pytest.approx(binomial_ci(0, 40)[1], abs=1e-6) and fresh["ci95"][1] <= 0.1
    assert {v["status"] for v in variants} == {"no signal"} and len(variants) == 5  # 3 token edits, 2 scales
    assert moved["overall"]["status"] == "removed"
    assert moved["images"]["targeted"]["seeds"] == [0]
    with pytest.raises(UserError, match="cannot bound the memorised rate"):
        verify_prompt(sd, moved_unet, PROMPT, rule, **{**kw, "max_rate": 0.01})


def test_prompt_unlearn_refuses_a_paraphrase_longer_than_the_text_encoder_takes(sd_dir, tmp_path, capsys):
    data = tmp_path / "data"
    assert _run(capsys, "prompt", "build", "--model", sd_dir, "--prompt", PROMPT, "--out", data, "--n", "6",
                "--sample-steps", "2", "--batch-size", "6")[0] == 0
    long = tmp_path / "paraphrases.txt"
    long.write_text("the hippo\n" + " ".join(["hippo"] * 40) + "\n")
    for extra in (["--paraphrases", long], ["--verify", "thorough"]):
        rc, _, err = _run(capsys, "prompt", "unlearn", "--model", sd_dir, "--data", data, "--out", tmp_path / "run",
                          "--steps", "1", *extra)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and ("tokens long" in lines[0] or "unknown verification budget" in
                                                lines[0]), lines
        assert not (tmp_path / "run").exists()


def test_verify_takes_a_prompt_deletion_of_a_stable_diffusion_model(sd_dir, tmp_path, capsys):
    """``diffunlearn verify --prompt`` judges a prompt deletion by the build folder's rule and writes the same
    verification.json and report.html as ``prompt unlearn``; image-only options with --prompt, and prompt-only
    options without it, are one line with nothing written."""
    data = tmp_path / "data"
    assert _run(capsys, "prompt", "build", "--model", sd_dir, "--prompt", PROMPT, "--out", data, "--n", "6",
                "--sample-steps", "2", "--batch-size", "6")[0] == 0
    base = ["verify", "--model", sd_dir, "--before", sd_dir, "--data", data, "--sample-steps", "2"]
    rc, out, err = _run(capsys, *base, "--prompt", PROMPT, "--out", tmp_path / "v")
    assert rc == 0, err
    v = json.loads((tmp_path / "v" / "verification.json").read_text())
    assert v["kind"] == "prompt" and v["prompt"] == PROMPT and (tmp_path / "v" / "report.html").is_file()
    assert v["overall"]["status"] in ("no signal", "not removed")  # the model verified against itself never passes
    chromium = Path("/usr/bin/chromium")
    if chromium.exists() or os.environ.get("DIFFUNLEARN_REQUIRE_BROWSER"):  # the report renders in a real browser
        import subprocess

        dom = subprocess.run([str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                              (tmp_path / "v" / "report.html").resolve().as_uri()],
                             capture_output=True, text=True, timeout=120)
        assert dom.returncode == 0 and "Verdicts" in dom.stdout and "targeted seeds" in dom.stdout
    for extra in (["--prompt", PROMPT, "--forget", "0"], ["--paraphrases", tmp_path / "p.txt"]):
        rc, _, err = _run(capsys, *base, *extra, "--out", tmp_path / "bad")
        assert rc == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists(), err

