"""Forgetting one training image, and many in sequence, with a deletion ledger: the noise-and-denoise similarity,
``unlearn --requests`` and ``diffunlearn ledger``, on a tiny random-weight 3-channel 16x16 UNet (nothing downloaded)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
import torch

from conftest import snapshot, tiny_model
from diffunlearn.cli import main
from diffunlearn.data import content_hash, load_data
from diffunlearn.errors import UserError
from diffunlearn.metrics.membership import denoising_losses, loss_auc
from diffunlearn.metrics.similarity import PixelCosine, load_similarity, noise_and_denoise, noise_and_denoise_similarity
from diffunlearn.model import load_model, save_model, state_hash
from diffunlearn.model.sampling import image_generators
from diffunlearn.runs.ledger import GENESIS, Ledger, line_hash, read_ledger, verify_ledger

SIZE, CH, SIM_T = 16, 3, 5
FAST = ["--steps", "2", "--batch-size", "4", "--similarity-t", str(SIM_T)]


def _run(capsys, *argv):
    argv = [*argv, "--verify", "off"] if argv and argv[0] == "unlearn" else argv  # verification is tested elsewhere
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny model, X as a folder of 10 random RGB PNGs, and 6 held-out images as an .npy."""
    from PIL import Image

    root = tmp_path_factory.mktemp("instance")
    save_model(tiny_model(size=SIZE, channels=CH), root / "base")
    rng = np.random.default_rng(0)
    (root / "faces").mkdir()
    for i in range(10):
        image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
        image.save(root / "faces" / f"face-{i:02d}.png")
    np.save(root / "held.npy", rng.integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8))
    return root


@pytest.fixture(scope="module")
def model():
    return tiny_model(size=SIZE, channels=CH)


def _images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, CH, SIZE, SIZE), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_pixel_similarity_of_an_image_with_itself_is_one():
    """The weight-free backend is the cosine of mean-centred pixel vectors (Pearson correlation): exactly 1 for an
    image and itself, and for any positive contrast/brightness change of it (so it compares structure, not level)."""
    x = _images()
    sim = PixelCosine()
    assert torch.allclose(sim(x, x), torch.ones(3), atol=1e-6)
    assert torch.allclose(sim(x, 0.5 * x + 0.2), torch.ones(3), atol=1e-6)
    assert torch.allclose(sim(x, -x), -torch.ones(3), atol=1e-6)
    assert float(sim(x[:1], x[1:2]).abs()) < 0.2  # unrelated noise images are nearly uncorrelated


def test_at_t_zero_noise_and_denoise_returns_the_input(model):
    """With steps counted as in Ho et al. (x_t has had t noising steps), t = 0 is no noise and no denoising step: the
    output is the input, so the similarity is 1; every result names its backend."""
    x = _images()
    assert torch.equal(noise_and_denoise(model, x, t=0), x)
    res = noise_and_denoise_similarity(model, x, t=0)
    assert res.to_dict()["similarity"] == "pixel-cosine" and res.similarity == "pixel-cosine"
    assert torch.allclose(res.scores, torch.ones(3), atol=1e-6)


def test_t_one_is_one_noising_step_and_one_ancestral_step(model):
    """t = 1 noises with the first noise level (diffusers timestep 0, abar_0 = 1 - beta_1) and takes the last
    ancestral step, which adds no noise: the output is the clipped x0-prediction (x_1 - sqrt(1 - abar_0) eps_theta) /
    sqrt(abar_0), with the forward noise drawn from the image's own seeded generator."""
    x = _images(2)
    abar = model.alphas_cumprod()[0]
    gens = image_generators(7, [int(content_hash(xi)[:12], 16) for xi in x])
    eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])
    x1 = abar.sqrt() * x + (1 - abar).sqrt() * eps
    with torch.no_grad():
        pred = model.unet(x1, torch.zeros(2, dtype=torch.long)).sample
    expected = ((x1 - (1 - abar).sqrt() * pred) / abar.sqrt()).clamp(-1, 1)
    assert torch.allclose(noise_and_denoise(model, x, t=1, seed=7), expected, atol=1e-5)


def test_seeded_noise_and_denoise_is_deterministic_and_batch_independent(model):
    """Same seed, same output bit for bit; each image's noise is keyed by its content, so its result does not depend
    on its position or the batch size (up to the float rounding of batched convolutions): the same image measured
    before and after a request sees the same noise. Another seed gives another result."""
    x = _images(3)
    a = noise_and_denoise(model, x, t=SIM_T, seed=3)
    assert torch.equal(a, noise_and_denoise(model, x, t=SIM_T, seed=3))
    assert torch.allclose(a[[2, 0, 1]], noise_and_denoise(model, x[[2, 0, 1]], t=SIM_T, seed=3, batch_size=1),
                          atol=1e-5)
    assert not torch.equal(a, noise_and_denoise(model, x, t=SIM_T, seed=4))
    with pytest.raises(UserError, match="must lie in"):
        noise_and_denoise(model, x, t=model.num_train_timesteps + 1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_sscd_backend_from_a_local_torchscript_file(tmp_path):
    """The SSCD backend loads a local TorchScript file (here a stand-in network), resizes to 288, normalises and
    compares L2-normalised embeddings: an image's cosine with itself is 1 and the result names "sscd"; a missing
    or unreadable file is a one-line UserError, never a download."""

    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.shape[-1] == 288 and x.shape[-2] == 288
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    path = tmp_path / "sscd.pt"
    torch.jit.script(Net()).save(str(path))
    sim = load_similarity(str(path))
    x = _images(2)
    assert sim.name == "sscd" and torch.allclose(sim(x, x), torch.ones(2), atol=1e-5)
    with pytest.raises(UserError, match="not found"):
        load_similarity(str(tmp_path / "missing.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(UserError, match="cannot load SSCD"):
        load_similarity(str(tmp_path / "bad.pt"))


def test_one_request_unlearn_save_reload_reproduces_the_ledger_metrics(capsys, files, tmp_path):
    """Unlearn one image (a one-line requests file), save, reload: the input model is unchanged on disk, the saved
    model's state hash is the ledger's model_after, and the similarity, quality and membership AUC that the ledger
    records after the request are recomputed exactly from the reloaded model (the metrics are deterministic)."""
    base = files / "base"
    before = snapshot(base)
    (tmp_path / "one.txt").write_text("# a data subject's request\nface-04.png\n")
    out = tmp_path / "run"
    rc, _, err = _run(capsys, "unlearn", "--model", base, "--data", files / "faces", "--requests", tmp_path / "one.txt",
                      "--held-out", files / "held.npy", "--out", out, *FAST)
    assert rc == 0, err
    assert snapshot(base) == before
    entry = json.loads((out / "ledger.jsonl").read_text())
    new = load_model(out / "model")
    assert entry["model_after"] == state_hash(new.unet) != entry["model_before"] == state_hash(load_model(base).unet)
    target = load_data(str(files / "faces")).images[4:5]
    assert entry["removed"] == [{"index": 4, "name": "face-04.png", "sha256": content_hash(target[0])}]
    after = entry["metrics_after"]
    res = noise_and_denoise_similarity(new, target, t=SIM_T, seed=0)
    assert after["similarity"] == res.similarity == "pixel-cosine"
    assert after["similarity_mean"] == pytest.approx(float(res.scores[0]), abs=1e-6)
    held = load_data(str(files / "held.npy")).images
    ref = denoising_losses(new, held)
    assert after["quality_measure"] == "denoising-loss/held-out"
    assert after["quality"] == pytest.approx(float(ref.mean()), rel=1e-5)
    assert after["membership_auc"] == pytest.approx(loss_auc(denoising_losses(new, target), ref))
    assert (out / "strips.png").is_file() and json.loads((out / "summary.json").read_text())["requests"] == 1


def _chain_ok(lines: list[bytes]) -> bool:
    entries = [json.loads(line) for line in lines]
    prevs = [GENESIS] + [line_hash(line) for line in lines[:-1]]
    return [e["prev_sha256"] for e in entries] == prevs


def test_three_requests_write_a_chained_ledger_that_ends_at_the_saved_model(capsys, files, tmp_path):
    """Three requests (a YAML list) applied in turn: three ledger lines numbered 1..3, each holding the SHA-256 of
    the previous line; the model hashes link (after of k = before of k + 1), start at the input model and end at
    the saved model's state hash; X shrinks (kept = 10 - removed so far); the copy inside the model directory equals
    the run's ledger; ``diffunlearn ledger`` prints the table and verifies (exit 0)."""
    reqs = tmp_path / "requests.yaml"
    reqs.write_text("- face-00.png\n- [1, face-02.png]\n- '7'\n")
    out = tmp_path / "run"
    rc, _, err = _run(capsys, "unlearn", "--model", files / "base", "--data", files / "faces", "--requests", reqs,
                      "--method", "siss", "--lambda", "0.5", "--out", out, *FAST)
    assert rc == 0, err
    raw = (out / "ledger.jsonl").read_bytes()
    lines = raw.splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["request"] for e in entries] == [1, 2, 3] and _chain_ok(lines)
    assert [e["count"] for e in entries] == [1, 2, 1] and [e["kept"] for e in entries] == [9, 7, 6]
    assert [e["metrics_after"]["forgotten_so_far"]["count"] for e in entries] == [1, 3, 4]
    assert all(a["model_after"] == b["model_before"] for a, b in zip(entries, entries[1:]))
    assert entries[0]["model_before"] == state_hash(load_model(files / "base").unet)
    assert entries[-1]["model_after"] == state_hash(load_model(out / "model").unet)
    assert entries[0]["method"] == "siss" and entries[0]["settings"]["lam"] == 0.5
    assert entries[0]["metrics_after"]["quality_measure"] == "denoising-loss/kept"  # no held-out images given
    assert "membership_auc" not in entries[0]["metrics_after"]
    assert (out / "model" / "ledger.jsonl").read_bytes() == raw
    assert json.loads((out / "summary.json").read_text())["ledger_head"] == line_hash(lines[-1])
    rc, text, err = _run(capsys, "ledger", out)
    assert rc == 0, err
    assert "face-02.png" in text and entries[1]["removed"][1]["sha256"] in text and "verified: 3 requests" in text


def test_tampered_or_truncated_ledger_fails_verification(capsys, files, tmp_path):
    """Append-only and tamper-evident: changing a number in line 2 breaks the chain at line 3; dropping line 1 breaks
    it at the new first line; editing the last line (which no later line covers) makes the run's ledger differ from
    the copy inside the model; cutting the last line leaves a chain that no longer ends at the model's hash. Each is
    a one-line error and a non-zero exit."""
    (tmp_path / "r.txt").write_text("0\n1\n2\n")
    out = tmp_path / "run"
    rc, _, err = _run(capsys, "unlearn", "--model", files / "base", "--data", files / "faces", "--requests",
                      tmp_path / "r.txt", "--out", out, *FAST)
    assert rc == 0, err
    ledger = out / "ledger.jsonl"
    good = ledger.read_bytes()
    lines = good.splitlines(keepends=True)
    e2 = json.loads(lines[1])
    e2["seconds"] += 1.0
    cases = {"hash chain broken at line 3": lines[0] + json.dumps(e2).encode() + b"\n" + lines[2],
             "hash chain broken at line 1": lines[1] + lines[2],
             "differ": lines[0] + lines[1] + lines[2].replace(b'"count": 1', b'"count": 1 '),
             "does not describe this model": lines[0] + lines[1]}
    for message, text in cases.items():
        ledger.write_bytes(text)
        rc, _, err = _run(capsys, "ledger", out)
        assert rc == 2 and message in err and err.count("\n") == 1, (message, err)
    ledger.write_bytes(good)
    assert _run(capsys, "ledger", out)[0] == 0


def test_a_partial_last_line_is_reported_and_never_accepted(tmp_path):
    """A kill while a line is written can leave bytes after the last newline: the reader returns only the whole
    lines (which still verify) and flags the partial one; nothing may be appended after it; the command exits
    non-zero naming it."""
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    for k in range(2):
        ledger.append(ledger.next_line({"time": "t", "removed": [], "count": 0, "method": "m", "settings": {},
                                        "metrics_before": {}, "metrics_after": {}, "seconds": 0.0,
                                        "model_before": f"h{k}", "model_after": f"h{k + 1}"}))
    whole = path.read_bytes()
    path.write_bytes(whole + whole.splitlines()[-1][:25])
    read = read_ledger(path)
    assert len(read.entries) == 2 and "line 3" in read.torn and "incomplete" in read.torn
    verify_ledger(read)
    with pytest.raises(UserError, match="incomplete"):
        Ledger(path)
    assert main(["ledger", str(path)]) == 2


def test_a_run_killed_mid_request_leaves_whole_chained_lines(files, tmp_path):
    """SIGKILL a real run (a forked process) right after its first ledger line appears: the ledger holds only whole,
    chained lines; the saved model directory is self-consistent (its ledger copy verifies and ends at its state hash)
    and the run's ledger is a prefix of that copy (the model is saved before its line is appended)."""
    (tmp_path / "r.txt").write_text("0\n1\n2\n")
    out = tmp_path / "run"
    argv = ["unlearn", "--model", str(files / "base"), "--data", str(files / "faces"), "--requests",
            str(tmp_path / "r.txt"), "--out", str(out), "--steps", "20", "--batch-size", "4",
            "--similarity-t", str(SIM_T)]
    child = multiprocessing.get_context("fork").Process(target=main, args=(argv,))
    child.start()
    ledger = out / "ledger.jsonl"
    deadline = time.time() + 120
    while not (ledger.is_file() and b"\n" in ledger.read_bytes()):
        assert child.is_alive() and time.time() < deadline
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL and not (out / "summary.json").exists()  # killed before finishing
    read = read_ledger(ledger)
    assert read.torn is None and 1 <= len(read.entries) < 3
    verify_ledger(read)
    copy = (out / "model" / "ledger.jsonl").read_bytes()
    assert copy.startswith(ledger.read_bytes()) and len(copy.splitlines()) - len(read.lines) in (0, 1)
    assert main(["ledger", str(out / "model")]) == 0


def test_a_request_interrupted_part_way_resumes_from_its_checkpoint_to_the_uninterrupted_weights(
        capsys, files, tmp_path, monkeypatch):
    """Requests are trained on the single request's path, checkpoints included: interrupted at step 3 of request 2
    (of 3 steps), ``--resume`` keeps request 1, continues request 2 from its checkpoint of step 2 (not from its
    start), and ends with the weights, ledger chain and log of a run never interrupted; the checkpoint is gone once
    the request's model and line are saved. A plain rerun says to resume; a checkpoint of a request that the file
    now names otherwise is refused, nothing changed."""
    import diffunlearn.trainer as trainer_mod

    reqs = tmp_path / "requests.txt"
    reqs.write_text("0\n1,2\n")
    argv = ["unlearn", "--model", files / "base", "--data", files / "faces", "--requests", reqs, "--method", "naive",
            "--steps", "3", "--batch-size", "4", "--similarity-t", str(SIM_T), "--checkpoint-every", "1"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert _run(capsys, *argv, "--out", ref)[0] == 0
    real, calls = trainer_mod._step, [0]

    def interrupted(step, *a, **k):
        calls[0] += 1
        if calls[0] == 6:  # request 2, step 3
            raise KeyboardInterrupt
        return real(step, *a, **k)

    monkeypatch.setattr(trainer_mod, "_step", interrupted)
    assert main([str(a) for a in [*argv, "--out", out, "--verify", "off"]]) != 0
    assert "continue from the checkpoint of step 2" in capsys.readouterr().out
    assert len((out / "ledger.jsonl").read_text().splitlines()) == 1 and (out / "checkpoint-request-2.pt").is_file()
    monkeypatch.setattr(trainer_mod, "_step", real)
    rc, _, err = _run(capsys, *argv, "--out", out)  # a plain rerun: the run is there to be continued
    assert rc == 2 and "interrupted run with a checkpoint or finished deletion requests: pass --resume" in err
    before = snapshot(out)
    reqs.write_text("0\n1,3\n")  # request 2 changed since its checkpoint was written
    rc, _, err = _run(capsys, *argv, "--out", out, "--resume")
    assert rc == 2 and "checkpoint-request-2.pt was written for other images" in err and snapshot(out) == before
    reqs.write_text("0\n1,2\n")
    rc, _, err = _run(capsys, *argv, "--out", out, "--resume")
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_after_request"] == 1 and summary["resumed_at_step"] == 2
    want = load_model(ref / "model").unet.state_dict()
    got = load_model(out / "model").unet.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)

    def chain(run):
        return [(e["removed"], e["model_before"], e["model_after"]) for e in
                map(json.loads, (run / "ledger.jsonl").read_text().splitlines())]
    assert chain(ref) == chain(out)

    def steps(run):
        return [(r["request"], r["step"], r["loss_x"]) for r in
                map(json.loads, (run / "log.jsonl").read_text().splitlines())]
    assert steps(out) == steps(ref)
    assert not list(out.glob("checkpoint-request-*.pt"))


def test_bad_requests_are_one_line_errors_and_write_nothing(capsys, files, tmp_path):
    """Overlapping requests, a request removing everything, an unknown name, a missing SSCD file, or an option of
    the sequential mode without --requests: each a one-line error (exit 2) with nothing written to --out."""
    cases = {"0\n0,1\n": "already removed by request 1", "0-9\n": "whole data set", "nobody.png\n": "neither an index",
             "": "lists no deletion requests"}
    out = tmp_path / "out"
    for text, message in cases.items():
        (tmp_path / "r.txt").write_text(text)
        rc, _, err = _run(capsys, "unlearn", "--model", files / "base", "--data", files / "faces", "--requests",
                          tmp_path / "r.txt", "--out", out, *FAST)
        assert rc == 2 and message in err and err.count("\n") == 1 and not out.exists(), err
    (tmp_path / "r.txt").write_text("0\n")
    for extra, message in ((["--sscd", tmp_path / "no.pt"], "SSCD model file not found"),
                           (["--forget", "3"], "--forget does not apply")):
        rc, _, err = _run(capsys, "unlearn", "--model", files / "base", "--data", files / "faces", "--requests",
                          tmp_path / "r.txt", "--out", out, *FAST, *extra)
        assert rc == 2 and message in err and not out.exists(), err
    rc, _, err = _run(capsys, "unlearn", "--model", files / "base", "--data", files / "faces", "--forget", "0",
                      "--sscd", "x.pt", "--out", out, "--steps", "1")
    assert rc == 2 and "only with --requests" in err and not out.exists()
