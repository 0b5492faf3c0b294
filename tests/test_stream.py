"""Data that streams from disk: folders, lists and arrays are opened without decoding, each optimiser step decodes
exactly the rows it drew, and the results equal those of the same images held in memory."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import torch

from conftest import snapshot, tiny_model
from diffunlearn.data import content_hash, load_data, resolve_forget, split_kept, to_model_space
from diffunlearn.data.arrays import FileImages, NumpyImages
from diffunlearn.errors import UserError
from diffunlearn.methods import make_method
from diffunlearn.model import state_hash
from diffunlearn.trainer import RowSampler, TrainerConfig, unlearn


def _pixels(n: int, size: int = 8, channels: int = 1, seed: int = 0) -> np.ndarray:
    shape = (n, size, size) if channels == 1 else (n, size, size, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _folder(root, pixels: np.ndarray, classes: int = 2):
    """PNGs in ``classes`` class folders (``c0/img_000.png``, ...); returns the names in load order."""
    from PIL import Image

    names = []
    for i, px in enumerate(pixels):
        name = f"c{i % classes}/img_{i:03d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(px).save(root / name)
        names.append(name)
    return sorted(names, key=lambda n: n.split("/"))


@pytest.fixture
def counted(monkeypatch):
    """Counts image decodes, in this process and in data-loader workers (forked: the counter is shared memory):
    ``files`` counts FileImages.decode calls, ``pil`` every pixel decode PIL does."""
    from PIL import ImageFile

    counts = {"files": multiprocessing.Value("q", 0), "pil": multiprocessing.Value("q", 0)}

    def counting(fn, key):
        def wrapper(*a, **k):
            with counts[key].get_lock():
                counts[key].value += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(FileImages, "decode", counting(FileImages.decode, "files"))
    monkeypatch.setattr(ImageFile.ImageFile, "load", counting(ImageFile.ImageFile.load, "pil"))
    return lambda key="files": counts[key].value


def test_a_folder_is_opened_from_headers_and_decoded_only_where_indexed(tmp_path, monkeypatch, counted):
    """Listing a folder of class folders decodes no pixel; names are relative paths; a forget item may be a name,
    an index, or a path (relative to the working directory or absolute); hashing A decodes A alone; and the images
    equal what decoding the whole folder into memory gives."""
    pixels = _pixels(12)
    names = _folder(tmp_path / "imgs", pixels)
    data = load_data(str(tmp_path / "imgs"))
    assert counted("pil") == 0 and counted() == 0
    assert data.names == names and data.shape == (1, 8, 8) and isinstance(data.images, FileImages)
    monkeypatch.chdir(tmp_path)
    a = resolve_forget(f"c0/img_002.png,imgs/c1/img_005.png,{tmp_path / 'imgs' / 'c1' / 'img_011.png'},0", data)
    assert [data.names[i] for i in a] == ["c0/img_000.png", "c0/img_002.png", "c1/img_005.png", "c1/img_011.png"]
    with pytest.raises(UserError, match="neither"):
        resolve_forget(str(tmp_path / "elsewhere.png"), data)
    assert counted() == 0
    hashes = [content_hash(data.images[i]) for i in a]
    assert counted() == len(a) and len(set(hashes)) == len(a)
    order = [int(n.split("_")[1][:3]) for n in names]
    assert torch.equal(data.images.load(), to_model_space(pixels[order], "memory"))
    kept, forget = split_kept(data, a)
    assert len(kept) == 8 and torch.equal(forget[:], data.images[a])


@pytest.mark.parametrize("workers", [0, 2])
def test_each_step_decodes_exactly_the_rows_it_drew_and_matches_memory(tmp_path, counted, workers):
    """Three steps of 2 micro-batches of 4 rows: every step decodes 8 images of X \\ A and 8 of A (a row is a pair),
    not |X| = 40, with or without worker processes; EraseDiff's inner passes add only A's images. The weights equal,
    bit for bit, those of the same run on the images held in memory (and load_data decoded nothing)."""
    _folder(tmp_path / "imgs", _pixels(40))
    data = load_data(str(tmp_path / "imgs"))
    kept, forget = split_kept(data, [3, 17, 29])
    for name, per_step in (("siss", 16), ("erasediff", 16 + 2 * 4)):
        cfg = TrainerConfig(steps=3, batch_size=4, grad_accum=2, seed=1, lr=1e-3, data_workers=workers)
        ref = unlearn(tiny_model(), kept.load(), forget.load(), make_method(name), cfg)
        start, seen = counted(), []
        new = unlearn(tiny_model(), kept, forget, make_method(name), cfg,
                      callback=lambda step, _: seen.append(counted() - start))
        assert seen == [per_step, 2 * per_step, 3 * per_step], name
        assert state_hash(new.unet) == state_hash(ref.unet), name


def test_a_process_decodes_only_its_own_rows(tmp_path, counted):
    """Under several processes the step's rows are drawn once, sliced, then fetched: the second of two processes
    decodes its 4 pairs only, and they are the images the in-memory sets hold at the drawn indices."""
    _folder(tmp_path / "imgs", _pixels(20))
    kept, forget = split_kept(load_data(str(tmp_path / "imgs")), [0, 1])
    sampler = RowSampler(kept, forget, make_method("naive"), 0, 999, seed=0)
    rows = sampler.rows(8)
    assert rows.x is None and counted() == 0
    mine = sampler.fetch(rows.slice(slice(4, 8)))
    assert counted() == 8
    assert torch.equal(mine.x, kept.load()[rows.x_idx[4:]]) and torch.equal(mine.a, forget.load()[rows.a_idx[4:]])


def test_bad_folders_name_the_first_offending_file_from_headers(tmp_path, monkeypatch):
    """An unreadable file, a file of another size, a file of another colour mode: each is named with what to do,
    found from the headers (decoding is made to fail here, and the errors still come)."""
    from PIL import Image

    def no_decoding(*_):
        raise AssertionError("decoded")

    monkeypatch.setattr(FileImages, "decode", no_decoding)
    for case, odd, expect, absent in (("junk", None, "cannot read image", None),
                                      ("size", Image.new("L", (9, 8)), "differ in size", "colour"),
                                      ("mode", Image.new("RGB", (8, 8)), "differ in colour mode", "size")):
        root = tmp_path / case
        _folder(root, _pixels(5))
        bad = root / "c1" / "img_003.png"
        if odd is None:
            bad.write_bytes(b"not an image")
        else:
            odd.save(bad)
        with pytest.raises(UserError, match=expect) as e:
            load_data(str(root))
        assert str(bad) in str(e.value) and (absent is None or absent not in str(e.value).split(";")[0])
    assert "greyscale" in str(e.value) and "colour (3 channels" in str(e.value)


def test_arrays_are_mapped_not_loaded(tmp_path):
    """An .npy is memory-mapped; an .npz stored without compression is mapped in place (no copy written); a
    compressed one is decompressed once into the cache; a float .npy is range-checked by a chunked pass. All equal
    the in-memory conversion."""
    from diffunlearn.data.cache import cache_dir

    px = _pixels(9, channels=3)
    want = to_model_space(px, "memory")
    np.save(tmp_path / "x.npy", px)
    np.savez(tmp_path / "x.npz", images=px, names=np.array([f"n{i}" for i in range(9)]))
    np.savez_compressed(tmp_path / "c.npz", px)
    np.save(tmp_path / "f.npy", px.astype(np.float32) / 255)
    for name in ("x.npy", "x.npz", "f.npy"):
        d = load_data(str(tmp_path / name))
        assert isinstance(d.images, NumpyImages) and isinstance(d.images.array, np.memmap), name
        torch.testing.assert_close(d.images.load(), want, rtol=0, atol=1e-6)
    assert load_data(str(tmp_path / "x.npz")).names[:2] == ["n0", "n1"]
    assert not (cache_dir() / "npz").exists()  # nothing was extracted so far
    c = load_data(str(tmp_path / "c.npz"))
    assert torch.equal(c.images.load(), want) and len(list((cache_dir() / "npz").glob("*.npy"))) == 1
    stamp = next((cache_dir() / "npz").glob("*.npy")).stat().st_mtime_ns
    load_data(str(tmp_path / "c.npz"))
    assert next((cache_dir() / "npz").glob("*.npy")).stat().st_mtime_ns == stamp  # decompressed once
    bad = px.astype(np.float32) / 255
    bad[7, 1, 1, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(UserError, match="NaN or Inf"):
        load_data(str(tmp_path / "nan.npy"))


def test_a_list_file_names_images_anywhere(tmp_path, counted):
    """``@list.txt``: one image path per line, relative to the list's folder or absolute; names are the lines."""
    names = _folder(tmp_path / "imgs", _pixels(6))
    lst = tmp_path / "lists" / "x.txt"
    lst.parent.mkdir()
    lst.write_text(f"# two images\n../imgs/{names[1]}\n\n{tmp_path / 'imgs' / names[4]}\n")
    d = load_data(f"@{lst}")
    assert d.names == [f"../imgs/{names[1]}", str(tmp_path / "imgs" / names[4])] and counted("pil") == 0
    assert torch.equal(d.images.load(), load_data(str(tmp_path / "imgs")).images[[1, 4]])
    assert resolve_forget(str(tmp_path / "imgs" / names[4]), d) == [1]
    lst.write_text("../imgs/nothing.png\n")
    with pytest.raises(UserError, match="line 1: image ../imgs/nothing.png not found"):
        load_data(str(lst))


def test_chunked_nearest_neighbours_equal_brute_force(monkeypatch):
    """ReTrack's neighbour search over chunks of kept images gives the brute-force k nearest (ties to the lower
    index), for a tensor and for a lazy array, however small the chunks."""
    import diffunlearn.methods.retrack as rt
    from diffunlearn.data.arrays import TensorImages

    g = torch.Generator().manual_seed(0)
    kept = torch.rand((50, 1, 4, 4), generator=g)
    kept[31] = kept[7]  # an exact tie
    forget = torch.cat([kept[7:8] + 1e-3, torch.rand((3, 1, 4, 4), generator=g)])
    d = torch.cdist(forget.flatten(1).double(), kept.flatten(1).double())
    want = torch.sort(d, dim=1, stable=True).indices[:, :5]
    for elements in (16, 48, 10 ** 6):
        monkeypatch.setattr(rt, "NN_CHUNK_ELEMENTS", elements)
        assert torch.equal(rt.nearest_kept(forget, kept, 5), want)
        assert torch.equal(rt.nearest_kept(TensorImages(forget).subset(slice(None)), TensorImages(kept), 5), want)
    assert want[0, 0] == 7 and want[0, 1] == 31


def _latent_folder(tmp_path, n: int = 6):
    _folder(tmp_path / "faces", _pixels(n, size=16, channels=3))
    return tmp_path / "faces"


def test_latents_are_encoded_once_into_the_disk_cache(tmp_path, monkeypatch):
    """A latent model encodes a folder chunk by chunk into a memory-mapped .npy in the cache, keyed by the
    autoencoder's weights and the data's identity; the latents equal the in-memory encoding, a second run reads
    them back without encoding, and touching an image file makes a new entry."""
    from test_latent import _latent_model

    model = _latent_model("vae")
    data = load_data(str(_latent_folder(tmp_path)))
    cache = tmp_path / "cache"
    calls = []
    real = model.codec._encode
    monkeypatch.setattr(model.codec, "_encode", lambda x: calls.append(len(x)) or real(x))
    model.codec.batch_size = 4
    z = model.encode(data.images, "data", cache)
    assert isinstance(z, NumpyImages) and z.shape == (6, 4, 8, 8) and calls == [4, 2]
    assert len(list((cache / "latents").glob("*.npy"))) == 1
    torch.testing.assert_close(z.load(), model.codec._encode(data.images.load()), rtol=1e-5, atol=1e-6)
    calls.clear()
    z2 = model.encode(data.images, "data", cache)
    assert calls == [] and z2.path == z.path
    f = data.images.file(0)
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10 ** 9))
    model.encode(load_data(str(f.parent.parent)).images, "data", cache)
    assert len(list((cache / "latents").glob("*.npy"))) == 2


def test_a_cache_that_does_not_fit_or_sits_in_the_data_stops_before_writing(tmp_path, monkeypatch, capsys):
    """Too little free disk: a one-line error before anything is written. A cache folder inside the data folder:
    refused, the data folder unchanged (input data are never written to)."""
    import shutil
    from collections import namedtuple

    from diffunlearn.cli import main
    from diffunlearn.model import save_model
    from test_latent import _latent_model

    faces = _latent_folder(tmp_path)
    model_dir = save_model(_latent_model("vae"), tmp_path / "ldm")
    before = snapshot(faces)
    usage = namedtuple("usage", "total used free")
    argv = ["unlearn", "--model", str(model_dir), "--data", str(faces), "--forget", "0", "--steps", "1",
            "--batch-size", "2", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    with monkeypatch.context() as m:
        m.setattr(shutil, "disk_usage", lambda _: usage(10 ** 9, 10 ** 9, 10 ** 6))
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "caching the latents of 6 images needs" in err and "MB are free" in err
    assert not (tmp_path / "run").exists() and not list((tmp_path / "cache").rglob("*.npy"))
    assert main(argv[:-1] + [str(faces / "cache")]) == 2
    assert "inside the data folder" in capsys.readouterr().err
    assert snapshot(faces) == before
    assert main(argv) == 0 and (tmp_path / "run" / "model" / "vae").is_dir()


def test_training_and_the_sequential_reference_decode_only_what_they_use(tmp_path, counted, monkeypatch):
    """``diffunlearn train`` on a folder decodes batch x steps images and trains the same weights as on the same
    pixels in an .npy; the sequential requests' quality reference (at most QUALITY_IMAGES, here 8, of the images no
    request removes) decodes those 8 images alone."""
    import diffunlearn.commands.requests as seq
    from diffunlearn.model import load_model
    from diffunlearn.scratch import TrainConfig, train

    pixels = _pixels(20)
    names = _folder(tmp_path / "imgs", pixels)
    np.save(tmp_path / "x.npy", pixels[[int(n.split("_")[1][:3]) for n in names]])
    weights = []
    for spec in (tmp_path / "imgs", tmp_path / "x.npy"):
        start = counted()
        out = tmp_path / f"train-{spec.name}"
        train(TrainConfig(data=str(spec), out=str(out), arch="tiny", steps=3, batch_size=5, warmup=1, threads=1,
                          data_workers=0, log_every=3))
        weights.append(state_hash(load_model(out / "model").unet))
        assert counted() - start == (15 if spec.suffix != ".npy" else 0)
    assert weights[0] == weights[1]
    monkeypatch.setattr(seq, "QUALITY_IMAGES", 8)
    data = load_data(str(tmp_path / "imgs"))
    start = counted()
    images, held, labels = seq._reference(None, 0, data, {0, 1})  # no --held-out, an unconditional model
    assert counted() - start == 8 and images.shape == (8, 1, 8, 8) and not held and labels is None
