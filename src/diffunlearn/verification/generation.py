"""The generation test: does the model still draw A? (the rules are in :mod:`.verdicts`).

- :func:`search`: the model before's samples at seeds ``0 .. N-1``, each sample's L2 distance to every distinct item
  of A. Cached under the cache folder (``verify-search/``), keyed by the model's weight hash, A's content hashes and
  the sampler, and written batch by batch: a search that was interrupted resumes where it stopped, and later
  verifications and sequential requests of the same model and A reuse it.
- :func:`draw_distances`: a model's samples at chosen seed numbers (the targeted seeds, or fresh seeds never
  searched: ``N ..``), with their distances to A's items.

Sample ``i`` always uses generator ``(seed, i)`` (:func:`diffunlearn.model.sampling.ddpm_sample`), so a seed drawn again
under another model starts from the same noise.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..data import content_hash
from ..metrics.rates import pixel_distances

SEARCH_BATCH = 64
SEARCH_KIND = "verify-search"  # the cache folder of searches (diffunlearn.data.cache.entry)


def model_fingerprint(model) -> str:
    """What besides the weights decides a model's samples: its noise schedule and sample shape."""
    return hashlib.sha256(model.alphas_cumprod().double().numpy().tobytes()
                          + repr((tuple(model.sample_shape), model.scheduler.config.get("prediction_type"),
                                  model.scheduler.config.get("variance_type"))).encode()).hexdigest()[:16]


def search_key(model_hash: str, items: torch.Tensor, labels: torch.Tensor | None, sampler: str, steps: int,
               seed: int, schedule: str = "") -> str:
    """The cache key of a search: the model before's weights and schedule (``schedule``:
    :func:`model_fingerprint`), A's distinct items (and labels), the sampler."""
    spec = {"model": model_hash, "schedule": schedule, "items": [content_hash(x) for x in items],
            "labels": None if labels is None else [int(y) for y in labels], "sampler": sampler, "steps": int(steps),
            "seed": int(seed), "format": 1}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def draw_distances(model, items: torch.Tensor, indices: list[int], sampler: str, steps: int, seed: int,
                   labels_of=None, keep: bool = False) -> tuple[np.ndarray, torch.Tensor | None]:
    """Samples of ``model`` at seed numbers ``indices``; returns their distances (len(indices), len(items)) to the
    items of A and, with ``keep``, the samples themselves. ``labels_of(indices)``: the class of each sample."""
    from ..model.sampling import ddpm_sample

    if not indices:
        return np.zeros((0, len(items)), dtype=np.float32), (items[:0] if keep else None)
    x = ddpm_sample(model, 0, steps, seed, sampler=sampler, indices=indices,
                    labels=None if labels_of is None else labels_of(indices))
    return pixel_distances(x, items).numpy().astype(np.float32), (x if keep else None)


def search(model, model_hash: str, items: torch.Tensor, n: int, sampler: str, steps: int, seed: int,
           labels: torch.Tensor | None = None, labels_of=None, cache: str | os.PathLike | None = None,
           log=None) -> dict:
    """The model before's distances to A at seeds ``0 .. n-1`` (cached; resumed batch by batch). Returns ``{seeds,
    distances (n, U), cached: seeds found in the cache, path}``."""
    from ..data.cache import entry, locked

    key = search_key(model_hash, items, labels, sampler, steps, seed, model_fingerprint(model))
    path = entry(SEARCH_KIND, key, cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        have = np.load(path) if path.is_file() else np.zeros((0, len(items)), dtype=np.float32)
        if len(have) < n:  # a shipped model may carry its search (the same key: the same weights, A and sampler)
            shipped = shipped_search(key)
            if shipped is not None and len(shipped) > len(have):
                have = shipped
        cached = min(len(have), n)
        rows = [have[:n]]
        done = cached
        while done < n:
            idx = list(range(done, min(n, done + SEARCH_BATCH)))
            d, _ = draw_distances(model, items, idx, sampler, steps, seed, labels_of)
            rows.append(d)
            done += len(idx)
            if done > len(have):  # every finished batch is kept: an interrupted search resumes here
                _save(path, np.concatenate(rows))
            if log is not None:
                log(f"  targeted search under the model before: {done}/{n} seeds")
    return {"seeds": n, "distances": np.concatenate(rows)[:n], "cached": cached, "path": str(path), "key": key}


def shipped_search(key: str) -> np.ndarray | None:
    """A search shipped beside a model in the package (``pretrained/<name>/verify-search/<key>.npy``), or None. The
    key holds the weights' hash, A's content hashes, the sampler, its steps and the seed, so a shipped search is used
    only for exactly the search it was made by (the shipped model's own README says how)."""
    from ..pretrained import pretrained_root

    root = pretrained_root()
    found = sorted(root.glob(f"*/{SEARCH_KIND}/{key}.npy")) if root.is_dir() else []
    return np.load(found[0]) if found else None


def _save(path: Path, arr: np.ndarray) -> None:
    """Write the search so far atomically (the cache's own fsync-and-rename)."""
    from ..data.cache import publish

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    publish(tmp, path)


def searched_so_far(model_hash: str, items: torch.Tensor, labels, sampler: str, steps: int, seed: int,
                    cache=None, schedule: str = "") -> int:
    """How many seeds of a search are in the cache (0 when none): what an interrupted verification keeps."""
    from ..data.cache import entry

    path = entry(SEARCH_KIND, search_key(model_hash, items, labels, sampler, steps, seed, schedule), cache)
    try:
        return len(np.load(path, mmap_mode="r"))
    except (OSError, ValueError):
        return 0
