"""The committed sprite dataset and its loaders."""
import hashlib

import numpy as np
import pytest
import torch

import diffusion_utilities as du

IMAGES_SHA256 = "32b6e21aa1c47bd99bb406e5daa8a7891d1fec07ed9cebcab3a292c26befe33c"


def test_committed_dataset():
    images, labels, names = du.load_sprites()
    assert images.shape == (2718, 16, 16, 3) and images.dtype == np.uint8
    assert labels.shape == (2718,) and labels.dtype == np.int64
    assert names == ["hero", "non-hero", "food", "spell", "item"]
    assert np.bincount(labels).tolist() == [800, 915, 48, 348, 607]
    assert hashlib.sha256(images.tobytes()).hexdigest() == IMAGES_SHA256
    with np.load(du.DATA_FILE) as d:
        assert d["alpha"].shape == (2718, 16, 16)
        assert len(d["sources"]) == 2718 and str(d["sources"][0]).startswith("doll:")
        # where the sprite covers nothing, the pixel is pure white
        assert (d["images"][d["alpha"] == 0] == 255).all()
    # no exact duplicates
    assert len(np.unique(images.reshape(len(images), -1), axis=0)) == len(images)


def test_relative_path_resolves_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # e.g. a notebook running in notebooks/
    images, _, _ = du.load_sprites("data/sprites16.npz")
    assert len(images) == 2718


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here.npz.*build_sprites.py"):
        du.load_sprites(tmp_path / "nothing_here.npz")


def test_flip_only_mirrors():
    base = torch.rand(200, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = du.augment_batch(base, generator=torch.Generator().manual_seed(0))
    same = (out == base).flatten(1).all(1)
    mirrored = (out == base.flip(-1)).flatten(1).all(1)
    assert torch.all(same | mirrored) and 60 < mirrored.sum() < 140


def test_sprite_batches_draw_classes_by_their_weights():
    images, labels, names = du.load_sprites()
    counts = np.bincount(labels)
    batches = du.sprite_batches(images, labels, batch_size=512, class_balance=0.0, n_cfeat=len(names),
                                generator=torch.Generator().manual_seed(0))
    drawn = sum(next(batches)[1].sum(0) for _ in range(10)) / 5120  # one-hot rows: class shares
    assert torch.allclose(drawn, torch.full((len(names),), 1 / len(names)), atol=0.03)  # balanced despite counts
    assert counts.max() > 5 * counts.min()
    x, c = next(batches)
    assert x.shape == (512, 3, 16, 16) and x.min() >= -1 and x.max() <= 1 and c.shape == (512, len(names))


def test_class_sampling_weights():
    labels = np.array([0] * 900 + [1] * 100)
    w = du.class_sampling_weights(labels, 0.5)
    assert w.sum() == pytest.approx(1)
    p1 = w[labels == 1].sum()
    assert p1 == pytest.approx(10 / (30 + 10))  # sqrt(100) / (sqrt(900) + sqrt(100))
    assert du.class_sampling_weights(labels, 1.0)[labels == 1].sum() == pytest.approx(0.1)
