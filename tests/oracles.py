"""Noise predictors with known answers: the samplers are checked against them."""
import torch

import diffusion_utilities as du


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


class GaussianOracle(torch.nn.Module):
    """The exact noise predictor for data whose pixels are independent N(mu, s^2): E[eps | x_t] is linear,

    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab). Its probability-flow ODE keeps
    z = (x_t - sqrt(ab_t) mu) / sqrt(ab_t s^2 + 1 - ab_t) fixed, so exact solutions are known in closed
    form (see ode_map): ODE solvers can be checked against them, and their errors shrink with steps.
    """

    def __init__(self, mu, s, schedule, height=4):
        super().__init__()
        self.mu, self.s, self.schedule = mu, s, schedule
        self.in_channels, self.height, self.n_cfeat, self.prediction = 3, height, 5, "eps"
        self.unused = torch.nn.Parameter(torch.zeros(1))  # samplers read the device from the parameters

    def forward(self, x, t, c=None):
        ab = self.schedule.ab_t[torch.round(t * self.schedule.T).long()].view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.s ** 2 + 1 - ab)

    def ode_map(self, x, t_from, t_to):
        """The exact ODE solution: x at step t_from carried to step t_to."""
        ab_f, ab_t = self.schedule.ab_t[t_from].double(), self.schedule.ab_t[t_to].double()
        z = (x.double() - ab_f.sqrt() * self.mu) / (ab_f * self.s ** 2 + 1 - ab_f).sqrt()
        return (ab_t.sqrt() * self.mu + (ab_t * self.s ** 2 + 1 - ab_t).sqrt() * z).float()
