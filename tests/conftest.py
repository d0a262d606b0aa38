import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import diffusion_utilities as du  # noqa: E402


@pytest.fixture
def schedule():
    return du.make_schedule(500)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return du.ContextUnet(n_feat=8).eval()


def _write_tiny_npz(folder):
    with np.load(du.DATA_FILE) as d:
        idx = np.r_[0:40, 900:940, 1715:1735, 1800:1840, 2200:2240]
        path = folder / "tiny.npz"
        np.savez(path, **{k: d[k][idx] if d[k].shape[0] == 2718 else d[k] for k in d.files})
    return path


@pytest.fixture
def tiny_npz(tmp_path):
    """A 180-sprite slice of the real dataset (all five classes), as a file: training tests run in seconds."""
    return _write_tiny_npz(tmp_path)


@pytest.fixture(scope="module")
def tiny_npz_module(tmp_path_factory):
    """tiny_npz, shared by a module's tests (for a run that several tests read)."""
    return _write_tiny_npz(tmp_path_factory.mktemp("tiny"))

