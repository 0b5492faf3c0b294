"""Opening data that stays on disk: image folders, lists of image files, ``.npy`` and ``.npz`` arrays.

Nothing here decodes an image. A folder or list is checked from the files' headers (PIL's ``Image.open`` reads the
size and mode without the pixels): the first unreadable file, or the first whose size or colour mode differs from
the first file's, is named in a one-line error. An ``.npy`` is memory-mapped; an ``.npz`` member stored without
compression is mapped in place, a compressed one is decompressed once, streaming, into the cache (it cannot be read
at random otherwise). Only float and non-``uint8`` integer arrays are read through once, in bounded chunks, to check
their range (float in [0, 1]; integers in [0, 1] or [0, 255]) and that they hold no NaN or Inf.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from .arrays import CHUNK, FileImages, NumpyImages, bomb_message, file_stamp

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
#: PIL modes read as one grey channel (a palette image too, when every palette entry is grey)
GREY_MODES = {"L", "1", "I", "I;16", "I;16L", "I;16B"}


# ---------------------------------------------------------------- image files


def _mode_of(im) -> str:
    """``L`` or ``RGB``: what an image is converted to, from its header alone."""
    if im.mode in GREY_MODES:
        return "L"
    if im.mode == "P" and im.palette is not None and im.palette.mode == "RGB":
        p = np.frombuffer(bytes(im.palette.palette), np.uint8)
        p = p[: len(p) // 3 * 3].reshape(-1, 3)
        if (p == p[:, :1]).all():
            return "L"
    return "RGB"


def _describe(mode: str) -> str:
    return "greyscale (1 channel)" if mode == "L" else "colour (3 channels, RGB)"


def check_files(files: list[Path], where: str) -> tuple[str, tuple[int, int], list[str]]:
    """The common colour mode and (width, height) of image files, and each file's stamp, from headers only."""
    from PIL import Image, UnidentifiedImageError

    if not files:
        raise UserError(f"no images found in {where}")
    first = None
    stamps = []
    for p in files:
        try:
            with Image.open(p) as im:
                size, mode = im.size, _mode_of(im)
        except Image.DecompressionBombError as e:
            raise UserError(bomb_message(p, e)) from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UserError(f"cannot read image {p}: {e}; remove or fix the file") from None
        if first is None:
            first = (p, size, mode)
        else:
            p0, size0, mode0 = first
            if mode != mode0:
                raise UserError(f"images in {where} differ in colour mode: {p0} is {_describe(mode0)} but {p} is "
                                f"{_describe(mode)}; convert them all to one mode first (e.g. all RGB)")
            if size != size0:
                raise UserError(f"images in {where} differ in size: {p0} is {size0[0]}x{size0[1]} but {p} is "
                                f"{size[0]}x{size[1]}; resize them to one size first")
        stamps.append(file_stamp(p))
    return first[2], first[1], stamps


def open_folder(path: Path) -> tuple[FileImages, list[str]]:
    """The images under ``path`` (recursively; hidden files and folders skipped), named by their relative paths
    (``cls_a/img_001.png``), sorted."""
    rels = sorted((p.relative_to(path) for p in path.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=lambda r: r.parts)
    rels = [r for r in rels if not any(part.startswith(".") for part in r.parts)]
    files = [path / r for r in rels]
    mode, size, stamps = check_files(files, f"folder {path}")
    return FileImages(files, mode, size, stamps, path), [r.as_posix() for r in rels]


def open_list(path: Path) -> tuple[FileImages, list[str]]:
    """A text file listing image files, one per line (blank lines and ``#`` comments skipped); relative paths are
    relative to the list file's folder. The names are the lines as written."""
    if not path.is_file():
        raise UserError(f"image list file not found: {path}")
    files, names, seen = [], [], {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        p = Path(name).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise UserError(f"{path}, line {n}: image {name} not found (relative paths are relative to "
                            f"{path.parent})")
        if name in seen:
            raise UserError(f"{path}, line {n}: {name} is listed twice (first on line {seen[name]}); list each "
                            "image once")
        seen[name] = n
        files.append(p)
        names.append(name)
    mode, size, stamps = check_files(files, f"list {path}")
    return FileImages(files, mode, size, stamps, path.parent), names


# ---------------------------------------------------------------- arrays


def _header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def _chunks(path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...], fortran: bool):
    """The array's rows in chunks, read with plain file reads (a scan must not keep the file mapped)."""
    if fortran:  # rows are not contiguous: go through a map that is dropped afterwards
        arr = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F")
        for s in range(0, shape[0], CHUNK):
            yield np.array(arr[s:s + CHUNK])
        del arr
        return
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    with open(path, "rb") as f:
        f.seek(offset)
        for s in range(0, shape[0], CHUNK):
            k = min(CHUNK, shape[0] - s)
            yield np.frombuffer(f.read(row * k), dtype).reshape(k, *shape[1:])


def _scale(path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> str:
    """How stored values become model space (see :class:`NumpyImages`), checking the range by one chunked pass."""
    if len(shape) not in (3, 4):
        raise UserError(f"{path}: expected images of shape (N, H, W) or (N, H, W, C), got {shape}")
    if dtype == np.uint8:
        return "u8"
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise UserError(f"{path}: unsupported array type {dtype}")
    lo, hi = np.inf, -np.inf
    for c in _chunks(path, offset, dtype, shape, fortran):
        c = c.astype(np.float32)
        if not np.isfinite(c).all():
            raise UserError(f"{path}: contains NaN or Inf values")
        if c.size:
            lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
    if lo >= 0.0 and hi <= 1.0:
        return "unit"
    if np.issubdtype(dtype, np.integer) and lo >= 0 and hi <= 255:
        return "u8"
    raise UserError(f"{path}: float images must lie in [0, 1] (found {lo:.3g}..{hi:.3g})")


def open_npy(path: Path) -> NumpyImages:
    try:
        with open(path, "rb") as f:
            shape, fortran, dtype = _header(f)
            offset = f.tell()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read array file {path}: {e}") from None
    return NumpyImages(path, _scale(path, offset, dtype, shape, fortran))


def _zip(path: Path) -> tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo]]:
    """An ``.npz`` opened, and its members by array name."""
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read array file {path}: {e}") from None
    return zf, {i.filename[:-4] if i.filename.endswith(".npy") else i.filename: i for i in zf.infolist()}


def open_npz(path: Path, cache: str | None = None) -> tuple[NumpyImages, list[str] | None]:
    """The ``images`` array of an ``.npz`` (or its only array) and its ``names``, if any."""
    zf, members = _zip(path)
    with zf:
        if "images" in members:
            key = "images"
        elif len(members) == 1:
            key = next(iter(members))
        else:
            raise UserError(f"{path}: an .npz needs an 'images' array (found {sorted(members)})")
        info = members[key]
        names = _small_member(path, zf, members, "names")
        names = None if names is None else [str(n) for n in names]
        if info.compress_type != zipfile.ZIP_STORED:
            return open_npy(_extract(path, zf, info, cache)), names
    try:
        with open(path, "rb") as f:  # the member's bytes start after its local header (30 bytes, name, extra)
            f.seek(info.header_offset)
            local = f.read(30)
            n_name, n_extra = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + n_name + n_extra)
            shape, fortran, dtype = _header(f)
            offset = f.tell()
    except (OSError, ValueError, struct.error) as e:
        raise UserError(f"cannot read array file {path}: {e}") from None
    scale = _scale(path, offset, dtype, shape, fortran)
    return NumpyImages(path, scale, offset=offset, dtype=dtype, shape=shape, fortran=fortran), names


def _small_member(path: Path, zf: zipfile.ZipFile, members: dict, key: str) -> np.ndarray | None:
    """A small array of an ``.npz`` (names, labels, class names) read whole, or None if absent."""
    if key not in members:
        return None
    try:
        with zf.open(members[key]) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except ValueError as e:
        raise UserError(f"{path}: cannot read its {key} array: {e}") from None


def npz_labels(path: Path) -> tuple[np.ndarray | None, list[str] | None]:
    """An ``.npz``'s ``labels`` (one class index or class name per image) and optional ``classes`` (one name per class
    index), unchecked: :class:`diffunlearn.data.ImageSet` checks them, and refuses them only where labels are used."""
    zf, members = _zip(path)
    with zf:
        labels = _small_member(path, zf, members, "labels")
        classes = _small_member(path, zf, members, "classes")
    return labels, None if classes is None else [str(c) for c in classes]


def _extract(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, cache: str | None) -> Path:
    """A compressed ``.npz`` member decompressed once (streaming) into the cache, as an ``.npy``."""
    from .cache import ensure_free_space, entry, locked, publish

    key = hashlib.sha256(f"{file_stamp(path)}|{info.filename}".encode()).hexdigest()
    out = entry("npz", key, cache)
    with locked(out):
        if out.is_file() and out.stat().st_size == info.file_size:
            return out
        ensure_free_space(out.parent, info.file_size, f"decompressing {path} (a compressed .npz)")
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        try:
            with zf.open(info) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 * 2 ** 20)
            publish(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return out
