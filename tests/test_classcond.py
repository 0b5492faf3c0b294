"""Class-conditional models: labels with the data, every method conditioning each row on its own label, SISS's
importance weights when the label is part of the sample, classifier-free guidance, and the bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffunlearn.data import ImageSet, load_data, resolve_forget
from diffunlearn.data.labels import split_labels
from diffunlearn.errors import UserError
from diffunlearn.methods import METHODS, make_method
from diffunlearn.methods.siss import labelled_weights
from diffunlearn.methods.weights import importance_weights, log_density_gap
from diffunlearn.model import DiffusionModel, build_scheduler, build_unet, load_model, save_model
from diffunlearn.model.sampling import ddpm_sample, guided_noise
from diffunlearn.model.schedule import predict_noise
from diffunlearn.trainer import TrainerConfig, unlearn

K = 3  # classes of the tiny model (embeddings: 3 classes + the null class)


def cond_model(seed: int = 0) -> DiffusionModel:
    torch.manual_seed(seed)
    unet = build_unet("tiny", 8, 1, num_classes=K)
    with torch.no_grad():  # diffusers initialises the class embedding like any layer; make labels matter clearly
        unet.class_embedding.weight.normal_(0, 1.0)
    return DiffusionModel(unet, build_scheduler(), classes=["a", "b", "c"])


def labelled_sets(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kept = torch.rand((12, 1, 8, 8), generator=g) * 2 - 1
    forget = torch.rand((3, 1, 8, 8), generator=g) * 2 - 1
    return kept, forget, (torch.arange(12) % 2, torch.full((3,), 2))


def test_labels_reach_the_network():
    m = cond_model()
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 500)
    e0, e1 = (predict_noise(m.unet, x, t, torch.zeros(4, dtype=torch.long)),
              predict_noise(m.unet, x, t, torch.ones(4, dtype=torch.long)))
    assert (e0 - e1).abs().max() > 1e-3
    assert m.conditional and m.null_class == K


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_conditions_on_each_rows_label(name):
    """Every method trains a class-conditional model, and what it learns depends on the labels: the same images,
    noise and timesteps with the forget set's label changed give other weights. With the labels given, the run is
    reproducible."""
    m = cond_model()
    kept, forget, labels = labelled_sets()
    cfg = TrainerConfig(steps=2, batch_size=4, lr=1e-3, seed=0)
    kw = {"inner_steps": 1} if name == "erasediff" else {}
    out1 = unlearn(m, kept, forget, make_method(name, **kw), cfg, labels=labels)
    out2 = unlearn(m, kept, forget, make_method(name, **kw), cfg, labels=labels)
    other = (labels[0], torch.ones(3, dtype=torch.long)) if name not in ("naive", "retrain") else \
        (1 - labels[0], labels[1])  # methods that never see A: change X \ A's labels instead
    out3 = unlearn(m, kept, forget, make_method(name, **kw), cfg, labels=other)
    p1, p2, p3 = (torch.cat([p.flatten() for p in o.unet.parameters()]) for o in (out1, out2, out3))
    assert torch.equal(p1, p2)
    assert (p1 - p3).abs().max() > 0
    assert out1.classes == m.classes and out1.conditional


def test_siss_weights_with_labels_are_unbiased():
    """With the label part of the sample, E_mixture[w_x f(m, y)] = E_{q(.|x)}[f(m, y_x)] and the same for a, whether
    the labels agree (the unconditional weights) or differ (each row feeds one term): checked by exact enumeration
    over the row's choice of x or a, with m drawn from the chosen source, against the direct expectation."""
    torch.manual_seed(0)
    n, lam = 20000, 0.3
    x, a = torch.full((1, 4), 0.2), torch.full((1, 4), -0.1)
    g, s = torch.tensor([[0.9]]), torch.tensor([[0.45]])
    f = lambda m, y: (m.sum(1) + 3.0 * y.float()) ** 2  # noqa: E731  any function of the sample and its label
    for y_x, y_a in ((1, 1), (1, 2)):
        eps = torch.randn(n, 4)
        from_a = torch.rand(n) < lam
        m = g * torch.where(from_a[:, None], a, x) + s * eps
        y = torch.where(from_a, y_a, y_x)
        u_x, u_a, _ = importance_weights(log_density_gap(m, x.expand(n, 4), a.expand(n, 4), g, s), lam)
        w_x, w_a = labelled_weights(u_x, u_a, from_a, torch.full((n,), y_x != y_a), lam)
        direct_x = f(g * x + s * eps, torch.full((n,), y_x)).mean()
        direct_a = f(g * a + s * eps, torch.full((n,), y_a)).mean()
        assert float((w_x * f(m, y)).mean()) == pytest.approx(float(direct_x), rel=0.05)
        assert float((w_a * f(m, y)).mean()) == pytest.approx(float(direct_a), rel=0.05)
        if y_x != y_a:  # the unconditional weights would be biased here: the check can tell the two apart
            assert abs(float((u_x * f(m, y)).mean()) / float(direct_x) - 1) > 0.2
    # where labels differ, a row drawn from a has no weight on x and the reverse, exactly
    w_x, w_a = labelled_weights(torch.ones(4), torch.ones(4), torch.tensor([True, False, True, False]),
                                torch.tensor([True, True, False, False]), 0.25)
    torch.testing.assert_close(w_x, torch.tensor([0.0, 4 / 3, 1.0, 1.0]))
    torch.testing.assert_close(w_a, torch.tensor([4.0, 0.0, 1.0, 1.0]))


def test_guidance_is_the_cfg_combination():
    m = cond_model()
    x, t, y = torch.randn(3, 1, 8, 8), torch.full((3,), 300), torch.tensor([0, 1, 2])
    e_c = predict_noise(m.unet, x, t, y)
    e_u = predict_noise(m.unet, x, t, torch.full((3,), K))
    torch.testing.assert_close(guided_noise(m.unet, x, t, y, 1.0, K), e_c)
    torch.testing.assert_close(guided_noise(m.unet, x, t, y, 0.0, K), e_u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided_noise(m.unet, x, t, y, 3.0, K), e_u + 3.0 * (e_c - e_u), atol=1e-5, rtol=1e-5)


def test_sampling_per_class_matches_one_image_at_a_time():
    """Sample i of class y_i is the same whether drawn in a batch of mixed classes or alone."""
    m = cond_model()
    batch = ddpm_sample(m, 4, steps=3, seed=1, labels=[0, 2, 1, 2], guidance=2.0)
    alone = torch.cat([ddpm_sample(m, 1, steps=3, seed=1, start=i, labels=[c], guidance=2.0)
                       for i, c in enumerate([0, 2, 1, 2])])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    default = ddpm_sample(m, 4, steps=3, seed=1)  # default labels: the classes in turn
    torch.testing.assert_close(default, ddpm_sample(m, 4, steps=3, seed=1, labels=[0, 1, 2, 0]))
    # chosen samples by number keep their default classes: sample 3 is of class 0, sample 1 of class 1
    torch.testing.assert_close(ddpm_sample(m, 0, steps=3, seed=1, indices=[3, 1]), default[[3, 1]],
                               atol=1e-5, rtol=1e-5)


def test_bad_labels_and_guidance_fail_with_one_line():
    m = cond_model()
    kept, forget, labels = labelled_sets()
    with pytest.raises(UserError, match="has no class labels"):
        unlearn(m, kept, forget, make_method("naive"), TrainerConfig(steps=1, batch_size=2))
    with pytest.raises(UserError, match="must lie in 0..2"):
        unlearn(m, kept, forget, make_method("naive"), TrainerConfig(steps=1, batch_size=2),
                labels=(labels[0], torch.full((3,), 5)))
    with pytest.raises(UserError, match="guidance must be >= 0"):
        ddpm_sample(m, 1, steps=2, guidance=-1.0)
    uncond = DiffusionModel(build_unet("tiny", 8, 1), build_scheduler())
    with pytest.raises(UserError, match="not class-conditional"):
        unlearn(uncond, kept, forget, make_method("naive"), TrainerConfig(steps=1, batch_size=2), labels=labels)
    with pytest.raises(UserError, match="needs a class-conditional model"):
        ddpm_sample(uncond, 1, steps=2, guidance=2.0)


def test_class_names_round_trip(tmp_path):
    m = cond_model()
    loaded = load_model(save_model(m, tmp_path / "m"))
    assert loaded.classes == ["a", "b", "c"] and loaded.null_class == K
    x, t, y = torch.randn(2, 1, 8, 8), torch.full((2,), 10), torch.tensor([2, 3])
    torch.testing.assert_close(predict_noise(loaded.unet, x, t, y), predict_noise(m.unet, x, t, y))


def test_labels_from_class_folders_and_npz(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in (("cat", 3), ("dog", 2)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    d = load_data(str(tmp_path / "imgs"))
    assert d.classes == ["cat", "dog"] and d.labels.tolist() == [0, 0, 0, 1, 1]
    assert resolve_forget("class=dog", d) == [3, 4]
    kept_y, forget_y = split_labels(d.labels, [3, 4])
    assert kept_y.tolist() == [0, 0, 0] and forget_y.tolist() == [1, 1]
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8),
             labels=np.array([0, 1, 2, 1, 0, 2]), classes=np.array(["x", "y", "z"]))
    d = load_data(str(tmp_path / "d.npz"))
    assert resolve_forget("class=y,2", d) == [1, 2, 3, 5] and d.classes == ["x", "y", "z"]
    with pytest.raises(UserError, match="is not a class of the data"):
        resolve_forget("class=w", d)
    np.savez(tmp_path / "names.npz", images=rng.integers(0, 256, (3, 8, 8), dtype=np.uint8),
             labels=np.array(["dog", "cat", "dog"]))
    d = load_data(str(tmp_path / "names.npz"))
    assert d.classes == ["cat", "dog"] and d.labels.tolist() == [1, 0, 1]
    # labels that cannot be used (floats, -1 for "unlabelled") do not stop unconditional use; using them fails clearly
    np.savez(tmp_path / "bad.npz", images=rng.integers(0, 256, (3, 8, 8), dtype=np.uint8),
             labels=np.array([0, -1, 1]))
    d = load_data(str(tmp_path / "bad.npz"))
    assert d.labels is None and resolve_forget("0", d) == [0]
    with pytest.raises(UserError, match="labels must be >= 0"):
        resolve_forget("class=1", d)
    np.savez(tmp_path / "nolabels.npz", images=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8))
    with pytest.raises(UserError, match="needs labelled data"):
        resolve_forget("class=1", load_data(str(tmp_path / "nolabels.npz")))
    with pytest.raises(UserError, match="has no images"):
        resolve_forget("class=2", ImageSet(torch.zeros(3, 1, 8, 8), ["p", "q", "r"], labels=[0, 1, 0],
                                           classes=["a", "b", "c"]))


def test_noise_kl_is_the_gaussian_kl_of_the_prediction():
    """A network predicting ``mu + sd * z`` with z standardised per image has KL (sd^2 + mu^2 - 1 - log sd^2) / 2
    from N(0, 1) at every (t, eps), exactly; a perfect N(0, 1)-like prediction has KL near 0."""
    from diffunlearn.metrics.classes import noise_kl

    z = torch.randn(1, 1, 8, 8)
    z = (z - z.mean()) / z.std(unbiased=False)

    class Fixed(torch.nn.Module):
        def __init__(self, mu, sd):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.mu, self.sd = mu, sd

        def forward(self, x, t, class_labels=None):
            return (self.mu + self.sd * z).expand_as(x) + 0 * self.w

    for mu, sd in ((0.0, 1.0), (0.3, 0.5), (-1.0, 2.0)):
        m = DiffusionModel(Fixed(mu, sd), build_scheduler())
        kl = noise_kl(m, torch.zeros(3, 1, 8, 8), n_draws=2)
        expected = 0.5 * (sd ** 2 + mu ** 2 - 1 - np.log(sd ** 2))
        torch.testing.assert_close(kl, torch.full((3,), expected, dtype=torch.float64), atol=1e-5, rtol=1e-5)


def test_weight_distance_and_class_accuracy():
    from diffunlearn.metrics.classes import class_accuracy, class_rate, weight_distance

    a, b = cond_model(0), cond_model(0)
    assert weight_distance(a.unet, b.unet)["l2"] == 0.0
    p = next(b.unet.parameters())
    with torch.no_grad():
        p.add_(0.5)
    norm_b = float(torch.sqrt(sum((q.detach().double() ** 2).sum() for q in b.unet.parameters())))
    wd = weight_distance(a.unet, b.unet)
    assert wd["l2"] == pytest.approx(0.5 * p.numel() ** 0.5) and wd["relative"] == pytest.approx(wd["l2"] / norm_b)
    acc = class_accuracy(torch.tensor([7, 7, 1, 1, 1, 2]), torch.tensor([7, 7, 7, 1, 1, 1]))
    assert acc[7]["correct"] == 2 and acc[7]["n"] == 3 and acc[1]["accuracy"] == pytest.approx(2 / 3)
    r = class_rate(torch.tensor([7, 3, 7, 0]), 7)
    assert (r["count"], r["n"]) == (2, 4) and r["ci95"][0] < 0.5 < r["ci95"][1]


def test_class_conditional_round_trip_through_the_commands(tmp_path):
    """train --class-conditional -> sample --class -> unlearn --forget class=c -> verify, on labelled .npz data (the
    bad inputs are cases of the fault suite, tests/test_faults.py)."""
    import json

    from diffunlearn.cli import main

    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, images=rng.integers(0, 256, (24, 8, 8), dtype=np.uint8), labels=np.arange(24) % 3,
             classes=np.array(["a", "b", "c"]))
    assert main(["train", "--data", str(data), "--class-conditional", "--arch", "tiny", "--out", str(tmp_path / "tr"),
                 "--steps", "3", "--batch-size", "8", "--warmup", "1"]) == 0
    model = load_model(tmp_path / "tr")
    assert model.conditional and model.classes == ["a", "b", "c"] and model.null_class == 3
    assert main(["sample", "--model", str(tmp_path / "tr"), "--out", str(tmp_path / "s"), "--n", "4", "--steps", "2",
                 "--class", "c", "--guidance", "2"]) == 0
    assert np.load(tmp_path / "s" / "labels.npy").tolist() == [2, 2, 2, 2]
    assert main(["unlearn", "--model", str(tmp_path / "tr"), "--data", str(data), "--forget", "class=b", "--method",
                 "siss", "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "un")]) == 0
    summary = json.loads((tmp_path / "un" / "summary.json").read_text())
    assert summary["forget"] == 8 and summary["forget_classes"] == {"b": 8}
    v = json.loads((tmp_path / "un" / "verification.json").read_text())
    assert v["status"] == "ok" and "class b" in v["reference"]["words"]
    held = tmp_path / "held.npz"  # labelled held-out images: the reference is those of the forgotten class
    np.savez(held, images=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), labels=np.array([0, 1, 1, 2, 1, 0]),
             classes=np.array(["a", "b", "c"]))
    assert main(["verify", "--model", str(tmp_path / "un"), "--before", str(tmp_path / "tr"), "--data", str(data),
                 "--forget", "class=b", "--held-out", str(held), "--out", str(tmp_path / "v")]) == 0
    ref = json.loads((tmp_path / "v" / "verification.json").read_text())["reference"]
    assert ref["kind"] == "held-out" and ref["indices"] == [1, 2, 4]


def test_class_protocol_measures_each_class_on_its_own_samples():
    """The conditional protocol samples ``per_class`` images of every class in order, scores class 7's samples as
    the forgotten class and the nine others as remaining, and compares the training 7s with the held-out 7s."""
    from diffunlearn.protocols.classes import ClassProtocol

    torch.manual_seed(0)
    m = DiffusionModel(build_unet("tiny", 28, 1, num_classes=10), build_scheduler(),
                       classes=[str(i) for i in range(10)])
    p = ClassProtocol.load(7, "mnist")
    met, samples, labels = p.evaluate(m, per_class=2, sample_steps=1, measure_images=3)
    assert labels.tolist() == [c for c in range(10) for _ in range(2)] and len(samples) == 20
    assert met["accuracy_forgotten"]["n"] == 2 and sorted(met["accuracy_remaining"]["per_class"]) == \
        [str(c) for c in range(10) if c != 7]
    assert met["membership_auc"]["held_out"] == int((p.held_out_labels == 7).sum()) > 0
    assert len(p.forget_idx) == int((p.labels == 7).sum()) and all(p.labels[i] == 7 for i in p.forget_idx)


def test_bench_class_unconditional_smoke_and_resume(tmp_path, capsys):
    from diffunlearn.bench.classes import ClassBenchConfig, run_class_bench

    cfg = ClassBenchConfig(out=str(tmp_path / "b"), variant="unconditional", rows="pretrained,retrain", n_samples=12,
                           sample_steps=1, measure_images=2, threads=1)
    table = run_class_bench(cfg)
    assert list(table) == ["pretrained"]  # the unconditional variant has no retrained model: its row is skipped
    rate = table["pretrained"]["class_rate"]
    cell = __import__("json").loads((tmp_path / "b" / "cells" / "pretrained-seed0" / "result.json").read_text())
    assert rate["n"] == 12 and rate["count"] == len(cell["metrics"]["class_rate"]["indices"])
    assert sum(cell["metrics"]["predicted_histogram"]) == 12
    capsys.readouterr()
    run_class_bench(cfg)
    assert "0 cell(s) to run, 1 cached" in capsys.readouterr().out
    with pytest.raises(UserError, match="variant"):
        run_class_bench(ClassBenchConfig(out=str(tmp_path / "c"), variant="both"))



def test_retrack_neighbours_share_the_forget_items_class_when_it_has_enough_kept_images():
    from diffunlearn.methods.retrack import nearest_kept, nearest_kept_by_class

    kept, forget, _ = labelled_sets()
    kept_y = torch.arange(12) % 2  # classes 0 and 1, six kept images each
    nb = nearest_kept_by_class(forget, kept, kept_y, torch.tensor([0, 1, 2]), 3)
    assert (kept_y[nb[0]] == 0).all() and (kept_y[nb[1]] == 1).all()
    for i, c in ((0, 0), (1, 1)):  # the same as the plain search among that class's images
        pool = torch.nonzero(kept_y == c).flatten()
        assert nb[i].tolist() == pool[nearest_kept(forget[i:i + 1], kept[pool], 3)[0]].tolist()
    assert nb[2].tolist() == nearest_kept(forget[2:3], kept, 3)[0].tolist()  # class 2 has no kept image: any class


def test_siss_at_lambda_0_or_1_refuses_differing_labels():
    m = cond_model()
    kept, forget, labels = labelled_sets()
    for lam in (0.0, 1.0):
        with pytest.raises(UserError, match="choose 0 < lambda < 1"):
            unlearn(m, kept, forget, make_method("siss", lam=lam), TrainerConfig(steps=1, batch_size=2), labels=labels)
    same = (torch.full((12,), 2), torch.full((3,), 2))  # one class everywhere: the unconditional weights, any lambda
    unlearn(m, kept, forget, make_method("siss", lam=0.0), TrainerConfig(steps=1, batch_size=2), labels=same)


def test_deletion_requests_on_a_class_conditional_model_condition_every_row_on_its_label(tmp_path):
    """``--requests`` on a class-conditional model: each request trains every row under its own label, as a single
    request does. One request of class b is bitwise the single ``--forget class=b`` run; two requests chain."""
    import json

    from diffunlearn.cli import main
    from diffunlearn.faults import (
        _class_model,  # a tiny model of classes a, b, c and 12 labelled images beside it
        same_unet,
    )

    model, data = _class_model(tmp_path), tmp_path / "labelled.npz"
    (tmp_path / "one.txt").write_text("class=b\n")
    (tmp_path / "two.txt").write_text("class=b\nclass=c\n")
    common = ["unlearn", "--model", str(model), "--data", str(data), "--steps", "2", "--batch-size", "4",
              "--verify", "off"]
    assert main(common + ["--requests", str(tmp_path / "one.txt"), "--out", str(tmp_path / "seq")]) == 0
    assert main(common + ["--forget", "class=b", "--out", str(tmp_path / "single")]) == 0
    assert same_unet(tmp_path / "seq", tmp_path / "single")
    assert main(common + ["--requests", str(tmp_path / "two.txt"), "--out", str(tmp_path / "seq2")]) == 0
    entries = [json.loads(x) for x in (tmp_path / "seq2" / "ledger.jsonl").read_text().splitlines()]
    assert [e["classes"] for e in entries] == [{"b": 4}, {"c": 4}]
