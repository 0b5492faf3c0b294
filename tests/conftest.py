"""Shared fixtures: tiny random-weight diffusers models and small data sets built in code (nothing downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffunlearn.models import DiffusionModel, build_scheduler, build_unet, save_model

torch.set_num_threads(1)  # tiny models gain nothing from threads, and oversubscribed threads stall


def tiny_model(seed: int = 0, size: int = 8, channels: int = 1, timesteps: int = 1000) -> DiffusionModel:
    torch.manual_seed(seed)
    return DiffusionModel(build_unet("tiny", size, channels), build_scheduler(timesteps))


def random_sets(n_kept: int = 24, n_forget: int = 3, size: int = 8, channels: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kept = torch.rand((n_kept, channels, size, size), generator=g) * 2 - 1
    forget = torch.rand((n_forget, channels, size, size), generator=g) * 2 - 1
    return kept, forget


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    """Latent and .npz caches go to a temporary folder, never to the user's ~/.cache."""
    monkeypatch.setenv("DIFFUNLEARN_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def model() -> DiffusionModel:
    return tiny_model()


@pytest.fixture
def sets():
    return random_sets()


@pytest.fixture
def model_dir(tmp_path):
    return save_model(tiny_model(), tmp_path / "base")


@pytest.fixture
def data_file(tmp_path):
    """30 random 8x8 uint8 images as an .npz with names img-00..img-29."""
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, images=rng.integers(0, 256, (30, 8, 8), dtype=np.uint8),
             names=np.array([f"img-{i:02d}" for i in range(30)]))
    return path


def snapshot(path) -> dict:
    """Every file under ``path`` with its bytes: to show that nothing on disk changed."""
    from pathlib import Path

    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
