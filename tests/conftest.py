import sys
from pathlib import Path

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
