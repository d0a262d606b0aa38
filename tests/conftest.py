import numpy as np
import pytest
import torch

import diffusion_utilities as du


@pytest.fixture
def schedule():
    return du.make_schedule(500)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return du.ContextUnet(n_feat=8).eval()


def _write_tiny_npz(folder, per_class=40):
    """The first per_class sprites of every class (fewer where a class has fewer), in the data file's format."""
    with np.load(du.DATA_FILE) as d:
        labels = d["labels"]
        idx = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(len(d["class_names"]))])
        path = folder / "tiny.npz"
        np.savez(path, **{k: d[k][idx] if d[k].shape[:1] == labels.shape else d[k] for k in d.files})
    return path


@pytest.fixture
def tiny_npz(tmp_path):
    """A 200-sprite slice of the real dataset (40 of each class), as a file: training tests run in seconds."""
    return _write_tiny_npz(tmp_path)


@pytest.fixture(scope="module")
def tiny_npz_module(tmp_path_factory):
    """tiny_npz, shared by a module's tests (for a run that several tests read)."""
    return _write_tiny_npz(tmp_path_factory.mktemp("tiny"))

