"""Images that stay where they are: a data set's images as a lazy array, decoded only when indexed.

An :class:`ImageArray` has ``len()``, ``.shape`` (N, C, H, W) and ``.ndim``, and indexing by an int (one (C, H, W)
image), a slice, a list, a numpy or torch index array or a boolean mask ((n, C, H, W)); every index returns a float32
tensor in [-1, 1] (model space) holding only the images asked for. ``subset`` gives a lazy view of some rows,
``chunks`` walks the array a bounded number of images at a time, and ``load()`` materialises everything: callers
call it explicitly, where a whole set must be in memory. The kinds:

- :class:`TensorImages`: images already in memory (the built-in sets, tensors given to the Python API);
- :class:`NumpyImages`: an ``.npy`` through a memory map, an uncompressed ``.npz`` member mapped in place, or a
  cache file of latents (values used as they are);
- :class:`FileImages`: image files (a folder or a list file), one decoded with PIL per index.
"""

from __future__ import annotations

import abc
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

#: images per chunk when an array is walked through in order (``chunks``, ``load``)
CHUNK = 256


def unit_to_model(a: np.ndarray) -> np.ndarray:
    """float32 in [0, 1] -> float32 in [-1, 1] (the one rule every loader uses)."""
    return a * np.float32(2.0) - np.float32(1.0)


def uint8_to_unit(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) / np.float32(255.0)


def to_nchw(a: np.ndarray) -> np.ndarray:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) -> (N, C, H, W); ``C`` first when the last axis cannot be channels."""
    if a.ndim == 3:
        return a[:, None]
    if a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
        return a.transpose(0, 3, 1, 2)
    return a


class ImageArray(abc.ABC):
    """A data set's images, decoded on demand (see the module docstring). Subclasses define ``_rows`` and
    ``identity``."""

    ndim = 4
    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, n: int, item_shape: tuple[int, int, int]):
        self._n, self._item_shape = int(n), tuple(int(s) for s in item_shape)

    # ------------------------------------------------------------ the array interface

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._n, *self._item_shape))

    def __len__(self) -> int:
        return self._n

    @abc.abstractmethod
    def _rows(self, idx: np.ndarray) -> np.ndarray:
        """float32 (len(idx), C, H, W) in model space for valid, non-negative indices."""

    def __getitem__(self, key):
        scalar = torch.is_tensor(key) and key.ndim == 0 and not key.is_floating_point()
        if isinstance(key, (int, np.integer)) or scalar:
            i = int(key)
            if not -self._n <= i < self._n:
                raise IndexError(f"image index {i} is out of range for {self._n} images")
            return torch.from_numpy(np.ascontiguousarray(self._rows(np.array([i % self._n]))[0]))
        return torch.from_numpy(np.ascontiguousarray(self._rows(self.indices(key))))

    def indices(self, key) -> np.ndarray:
        """A slice, list, index array or boolean mask -> int64 indices in [0, N)."""
        if isinstance(key, slice):
            return np.arange(*key.indices(self._n), dtype=np.int64)
        if torch.is_tensor(key):
            key = key.detach().cpu().numpy()
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (self._n,):
                raise IndexError(f"a boolean mask over {self._n} images must have shape ({self._n},)")
            return np.flatnonzero(idx).astype(np.int64)
        if idx.size == 0:
            return np.zeros(0, np.int64)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"index images with an int, a slice or a 1-D integer array, got {idx.dtype} {idx.shape}")
        if idx.min() < -self._n or idx.max() >= self._n:
            raise IndexError(f"image index out of range for {self._n} images")
        return np.where(idx < 0, idx + self._n, idx).astype(np.int64)

    def subset(self, key) -> "ImageArray":
        """The rows ``key`` selects, as a lazy array (nothing is decoded)."""
        return SubsetImages(self, self.indices(key))

    def chunks(self, size: int = CHUNK):
        """``(start, images)`` for consecutive runs of at most ``size`` images."""
        for s in range(0, self._n, size):
            yield s, self[s:s + size]

    def __iter__(self):
        for _, chunk in self.chunks():
            yield from chunk

    def load(self) -> torch.Tensor:
        """Every image in memory, as one (N, C, H, W) tensor: the explicit way to materialise a data set."""
        out = torch.empty(tuple(self.shape), dtype=torch.float32)
        for s, chunk in self.chunks():
            out[s:s + len(chunk)] = chunk
        return out

    # ------------------------------------------------------------ where the images come from

    @abc.abstractmethod
    def identity(self) -> str:
        """A digest that changes whenever the images may have changed (keys caches such as latents)."""

    def file(self, i: int) -> Path | None:
        """The file image ``i`` is read from, for file-backed arrays."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self._n}, shape={tuple(self._item_shape)})"


class TensorImages(ImageArray):
    """Images already in memory; indexing is the tensor's own (a 2-D index gives (n, k, C, H, W))."""

    def __init__(self, images: torch.Tensor):
        if images.ndim != 4:
            raise UserError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        super().__init__(len(images), tuple(images.shape[1:]))
        self.tensor = images

    @property
    def device(self):
        return self.tensor.device

    def _rows(self, idx):
        return self.tensor[torch.from_numpy(idx)].detach().cpu().float().numpy()

    def __getitem__(self, key):
        return self.tensor[key]

    def subset(self, key) -> "TensorImages":
        return TensorImages(self.tensor[torch.from_numpy(self.indices(key))])

    def load(self) -> torch.Tensor:
        """The tensor itself (no copy)."""
        return self.tensor

    def identity(self) -> str:
        h = hashlib.sha256(str(tuple(self.tensor.shape)).encode())
        h.update(self.tensor.detach().cpu().float().contiguous().numpy().tobytes())
        return h.hexdigest()


def as_tensor_or_lazy(images):
    """What the trainer works with: in-memory images as a tensor, anything else as the lazy array it is."""
    if isinstance(images, TensorImages):
        return images.tensor
    if torch.is_tensor(images) or isinstance(images, ImageArray):
        return images
    raise TypeError(f"images must be a tensor or an ImageArray, got {type(images).__name__}")


class SubsetImages(ImageArray):
    """Some rows of another array, in a given order, decoded from it on demand."""

    def __init__(self, base: ImageArray, idx: np.ndarray):
        super().__init__(len(idx), tuple(base.shape[1:]))
        self.base, self.idx = base, np.asarray(idx, np.int64)

    def _rows(self, idx):
        return self.base._rows(self.idx[idx])

    def subset(self, key) -> "SubsetImages":
        return SubsetImages(self.base, self.idx[self.indices(key)])

    def identity(self) -> str:
        return hashlib.sha256(self.base.identity().encode() + self.idx.tobytes()).hexdigest()

    def file(self, i):
        return self.base.file(int(self.idx[i]))


def file_stamp(path: Path) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"


def check_unchanged(path: Path, stamp: str) -> None:
    """A file is read as it was when the data set was listed: one replaced, rewritten or deleted since is refused
    (a run must not train on a mix of two versions of its data)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"cannot decode image {path}: {e.strerror} (it was there when the data set was listed); put "
                        "it back, or start the run again without it") from None
    _, size, mtime = stamp.rsplit("|", 2)
    if (str(st.st_size), str(st.st_mtime_ns)) != (size, mtime):
        raise UserError(f"image {path} changed on disk since the data set was listed (its size or modification time "
                        "differ): put the original back, or start the run again")


def bomb_message(path: Path, e: Exception) -> str:
    return (f"image {path} refused: {str(e).rstrip('.')} (PIL's guard against decompression bombs); remove the file "
            "or resize it")


class NumpyImages(ImageArray):
    """An array on disk read through a memory map: ``np.load(path, mmap_mode="r")``, or ``np.memmap`` at an offset
    inside another file (an uncompressed ``.npz`` member). ``scale`` turns stored values into model space: ``"u8"``
    (v / 255), ``"unit"`` (float in [0, 1]), ``"raw"`` (used as they are: cached latents). The map is reopened
    after pickling (data-loader workers), never copied."""

    def __init__(self, path: str | Path, scale: str, offset: int | None = None, dtype=None, shape=None,
                 fortran: bool = False, stamp: str = ""):
        self.path, self.scale, self.offset = Path(path), scale, offset
        self._spec = (np.dtype(dtype) if dtype is not None else None, tuple(shape) if shape else None, fortran)
        self._array = None
        arr = self.array
        if arr.ndim not in (3, 4):
            raise UserError(f"{self.path}: expected images of shape (N, H, W) or (N, H, W, C), got {arr.shape}")
        if scale == "raw" and arr.ndim != 4:
            raise UserError(f"{self.path}: expected an array of shape (N, C, H, W), got {arr.shape}")
        layout = arr.shape[1:] if scale == "raw" else to_nchw(np.empty((1, *arr.shape[1:]), np.uint8)).shape[1:]
        super().__init__(len(arr), layout)
        self.stamp = stamp or file_stamp(self.path)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            dtype, shape, fortran = self._spec
            if self.offset is None:
                self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            else:
                self._array = np.memmap(self.path, dtype=dtype, mode="r", offset=self.offset, shape=shape,
                                        order="F" if fortran else "C")
        return self._array

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def _rows(self, idx):
        a = np.asarray(self.array[idx])
        if self.scale == "raw":
            return a.astype(np.float32)
        a = to_nchw(a)
        if self.scale == "u8":
            return unit_to_model(uint8_to_unit(a))
        return unit_to_model(a.astype(np.float32))

    def identity(self) -> str:
        return hashlib.sha256(f"{self.stamp}|{self.offset}|{self.scale}".encode()).hexdigest()


class FileImages(ImageArray):
    """Image files decoded with PIL on demand, each converted to ``mode`` (``L`` or ``RGB``); ``root`` is the folder
    relative names refer to. The files' sizes and modes were checked from their headers when the set was listed."""

    def __init__(self, files: list[Path], mode: str, size: tuple[int, int], stamps: list[str], root: Path | None):
        w, h = size
        super().__init__(len(files), (1 if mode == "L" else 3, h, w))
        self.files, self.mode, self.stamps, self.root = list(files), mode, stamps, root

    def decode(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 (C, H, W)."""
        from PIL import Image

        p = self.files[i]
        check_unchanged(p, self.stamps[i])
        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert(self.mode))
        except Image.DecompressionBombError as e:
            raise UserError(bomb_message(p, e)) from None
        except (OSError, ValueError) as e:  # PIL raises these for unreadable, truncated and vanished files
            raise UserError(f"cannot decode image {p}: {e}; replace it with a readable copy of the same "
                            "image") from None
        if a.shape[:2] != tuple(self._item_shape[1:]):
            raise UserError(f"image {p} changed size on disk since the data set was listed: restart the run")
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    def _rows(self, idx):
        out = np.empty((len(idx), *self._item_shape), np.float32)
        for j, i in enumerate(idx):
            out[j] = unit_to_model(uint8_to_unit(self.decode(int(i))))
        return out

    def identity(self) -> str:
        h = hashlib.sha256(f"{self.mode}|{self._item_shape}".encode())
        for s in self.stamps:
            h.update(s.encode() + b"\n")
        return h.hexdigest()

    def file(self, i):
        return self.files[i]


def check_decodes(images: ImageArray) -> int:
    """Decode every file of a file-backed set once, before any work: a bad file is then found in seconds, not at its
    first draw hours into a run. Raises one line naming the bad files; returns how many files were decoded (0 for
    arrays in memory or on a memory map, which hold no files to decode)."""
    base, idx = (images.base, images.idx) if isinstance(images, SubsetImages) else (images, None)
    if not isinstance(base, FileImages):
        return 0
    rows = range(len(base.files)) if idx is None else idx
    bad = []
    for i in rows:
        try:
            base.decode(int(i))
        except UserError as e:
            bad.append(str(e))
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"{len(bad)} of {len(rows)} images cannot be used: {bad[0]}{more}")
    return len(rows)

