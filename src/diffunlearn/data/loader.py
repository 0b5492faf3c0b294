"""Fetching the images of a step's drawn rows: a ``torch.utils.data.DataLoader`` over lazy image arrays.

The trainer draws a step's row indices itself (from its one seeded generator, so batching, accumulation and the
number of processes never change them) and asks a :class:`RowFetcher` for exactly those images: the loader's batch
sampler yields only the indices of this step, split into one contiguous chunk per worker, and the chunks come back in
order. Nothing else is decoded. The workers (``data_workers``) persist for the whole run. In-memory images (tensors)
are indexed directly, without a loader; so is everything when an array is indexed outside a run.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from .arrays import ImageArray, as_tensor_or_lazy


class _Failed:
    """What a worker returns instead of raising a :class:`UserError`: the message crosses the process boundary
    intact and the main process raises it as one line (a raised error would arrive wrapped in the worker's
    traceback)."""

    def __init__(self, message: str):
        self.message = message


class _Rows(torch.utils.data.Dataset):
    """The images of several arrays under one index: array ``k``'s row ``i`` is ``offsets[k] + i``."""

    def __init__(self, arrays: list[ImageArray]):
        self.arrays = arrays
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._images([i])[0]

    def __getitems__(self, indices):
        try:
            return self._images(indices)
        except UserError as e:
            return _Failed(str(e))

    def _images(self, indices) -> torch.Tensor:
        idx = np.asarray(indices, dtype=np.int64)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        out = torch.empty((len(idx), *self.arrays[0].shape[1:]), dtype=torch.float32)
        for k in np.unique(which):
            sel = np.flatnonzero(which == k)
            out[torch.from_numpy(sel)] = self.arrays[k][idx[sel] - self.offsets[k]]
        return out


class _StepChunks(torch.utils.data.Sampler):
    """A batch sampler that yields the chunks of the current step, set before each pass."""

    def __init__(self):
        self.chunks: list[list[int]] = []

    def __iter__(self):
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


def _as_batch(x):
    return x


class RowFetcher:
    """``fetch(indices per array)`` -> the images of those rows, one tensor per array (None where no rows are asked
    for). Lazy arrays go through one DataLoader with ``workers`` worker processes (0: decoded in this process)."""

    def __init__(self, arrays: list, workers: int = 0):
        self.arrays = [as_tensor_or_lazy(a) for a in arrays]  # in-memory arrays as their tensors
        self.lazy = [k for k, a in enumerate(self.arrays) if isinstance(a, ImageArray)]
        self.workers = max(0, int(workers))
        self._loader = None
        self._chunks = _StepChunks()

    def _dataloader(self):
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                _Rows([self.arrays[k] for k in self.lazy]), batch_sampler=self._chunks, num_workers=self.workers,
                collate_fn=_as_batch, persistent_workers=self.workers > 0, pin_memory=torch.cuda.is_available(),
                generator=torch.Generator())  # its own generator: the loader never draws from torch's global one
        return self._loader

    def fetch(self, indices: list) -> list:
        out: list = [None] * len(self.arrays)
        flat, parts = [], []
        offset = 0
        for k, a in enumerate(self.arrays):
            idx = indices[k]
            if idx is not None and k not in self.lazy:
                out[k] = a[idx.to(a.device) if torch.is_tensor(idx) else idx]
            elif idx is not None:
                idx = np.asarray(idx.cpu() if torch.is_tensor(idx) else idx, dtype=np.int64)
                flat.append(idx + offset)
                parts.append((k, len(idx)))
            offset += len(a) if k in self.lazy else 0
        if not flat:
            return out
        flat = np.concatenate(flat)
        if len(flat):
            self._chunks.chunks = [c.tolist() for c in np.array_split(flat, max(1, min(self.workers, len(flat))))]
            try:
                chunks = list(self._dataloader())
            except RuntimeError as e:  # a worker killed (out of memory) or crashed outside our decoding
                if "DataLoader worker" not in str(e):
                    raise
                raise UserError(f"a data-loading worker failed ({str(e).splitlines()[0]}): rerun with fewer "
                                "--data-workers (0 decodes in the main process)") from None
            failed = next((c for c in chunks if isinstance(c, _Failed)), None)
            if failed is not None:
                raise UserError(failed.message)
            images = torch.cat(chunks)
        else:
            images = torch.empty((0, *self.arrays[self.lazy[0]].shape[1:]))
        start = 0
        for k, n in parts:
            out[k] = images[start:start + n]
            start += n
        return out

    def close(self) -> None:
        """Stop the worker processes."""
        it = getattr(self._loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._loader = None
