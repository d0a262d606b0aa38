import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import diffusion_utilities as du  # noqa: E402


class OracleUnet(du.ContextUnet):
    """A 'network' that knows the data is the single image x0: it returns the exact noise.

    With the right eps, every correct sampler must land exactly on x0, whatever its step count.
    """

    def __init__(self, x0, schedule):
        super().__init__(in_channels=x0.shape[1], n_feat=8, n_cfeat=5, height=x0.shape[-1])
        self.x0, self.schedule = x0, schedule

    def forward(self, x, t, c=None):
        T = self.schedule.T
        t_int = torch.round(torch.as_tensor(t).reshape(-1) * T).long().expand(x.shape[0])
        ab = self.schedule.ab_t[t_int].view(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()


@pytest.fixture
def schedule():
    return du.make_schedule(500)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return du.ContextUnet(n_feat=8).eval()


@pytest.fixture
def tiny_npz(tmp_path):
    """A 180-sprite slice of the real dataset (all five classes), as a file: training tests run in seconds."""
    with np.load(du.DATA_FILE) as d:
        idx = np.r_[0:40, 900:940, 1715:1735, 1800:1840, 2200:2240]
        path = tmp_path / "tiny.npz"
        np.savez(path, **{k: d[k][idx] if d[k].shape[0] == 2718 else d[k] for k in d.files})
    return path

